# Two commands (see README.md): `make demo` (the main job) and `make test` (the test suite).
# Each does its own idempotent set-up in .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
# pytest-xdist workers (the test extra installs it), one test file per worker at a time (module / session fixtures
# built once per file), the slowest files first (tests/conftest.py, SLOW_MODULES_FIRST; xdist's own reordering by test
# count is turned off). On the 2-core machine the suite took 4.6-6 min with 2 workers, about 8.5-9 min in one
# process (benchmarks/BENCHMARKS.md section 11). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: setup demo test lint e2e-monailabel clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	@VENV=$(VENV) DEMO_OUT=$(DEMO_OUT) bash scripts/demo.sh

# pytest exits 5 when it collected no tests: that is a broken suite, not a pass.
test: setup
	@$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: setup
	@$(PY) -m ruff check monai_vlmfilm tests benchmarks scripts

e2e-monailabel: setup
	@bash scripts/e2e_monailabel.sh

clean:
	rm -rf $(DEMO_OUT) runs
