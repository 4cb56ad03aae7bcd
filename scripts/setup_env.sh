#!/usr/bin/env bash
# Idempotent set-up: a virtual env in $VENV (default .venv) with this package and its test extras.
#
# torch: where the interpreter already has torch (e.g. a GPU machine), the venv is created with
# --system-site-packages and that torch is used as it is. Otherwise $TORCH_SPEC (default
# torch==2.13.0, a CPU wheel on this project's machines) is installed *before* the package, so the
# package's plain "torch>=2.4" requirement is already met and pip never pulls a multi-GB CUDA build.
# Elsewhere, point pip at a CPU index with e.g. TORCH_PIP_ARGS="--index-url <your CPU wheel index>".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] interpreter already has torch: venv sees the system site-packages"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
stamp="$VENV/.installed-$(cat pyproject.toml scripts/setup_env.sh | sha1sum | cut -c1-12)-$EXTRAS"
if [ -f "$stamp" ]; then
  exit 0
fi
start=$(date +%s)
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" ${TORCH_PIP_ARGS:-}
fi
echo "[setup] installing monai-vlmfilm[$EXTRAS] (editable)"
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "[setup] done in $(( $(date +%s) - start )) s"
