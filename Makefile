# Two commands (see README.md): `make demo` (the main job) and `make test` (the test suite).
# Each does its own idempotent set-up in .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: setup demo test lint e2e-monailabel clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	@VENV=$(VENV) DEMO_OUT=$(DEMO_OUT) bash scripts/demo.sh

# pytest exits 5 when it collected no tests: that is a broken suite, not a pass.
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: setup
	@$(PY) -m ruff check monai_vlmfilm tests benchmarks scripts

e2e-monailabel: setup
	@bash scripts/e2e_monailabel.sh

clean:
	rm -rf $(DEMO_OUT) runs
