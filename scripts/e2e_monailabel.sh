#!/usr/bin/env bash
# End-to-end: our bundle inside a real MONAI Label 0.8.5 server (monaibundle app), nothing mocked.
#
#   bash scripts/e2e_monailabel.sh            # or: make e2e-monailabel
#
# 1. a separate virtual env for MONAI Label (its pins differ from ours, e.g. pydicom and numpy), created once
#    and reused (stamp file): torch/torchvision first (a matching pair), then monailabel==0.8.5 with
#    pydicom<3 (pydicom-seg breaks on pydicom 3), then this
#    package (editable) with only the dependencies that env still lacks (every installed package is pinned
#    as a constraint so nothing of MONAI Label's is up- or downgraded);
# 2. scripts/e2e_monailabel.py: synthetic studies, app + two bundle copies (use_vlm_film on/off), server on
#    127.0.0.1 offline, /infer on both, hostile uploads, one-epoch /train, stop by process group, check nothing
#    is left.
#
# Environment: MONAILABEL_VENV (default ~/.cache/monai-vlmfilm/monailabel-venv), PYTHON (python3 >= 3.10),
# ML_TORCH_SPEC (default "torch==2.14.1 torchvision==0.29.1"; empty to let pip choose), E2E_WORKDIR
# (default a fresh temp dir, removed on success unless KEEP_WORKDIR=1), E2E_ARGS (extra args for the .py),
# E2E_SCRIPT (default scripts/e2e_monailabel.py; benchmarks/reliability_monailabel.py runs the load and hostile-upload
# campaign against the same server set-up in the same env).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${MONAILABEL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/monai-vlmfilm/monailabel-venv}
PY=${PYTHON:-python3}
# torch and torchvision must be one build: the local index's torchvision wheels are CUDA builds, which do not load
# against the CPU-only torch 2.13.0 wheel ("operator torchvision::nms does not exist" at server start-up), so
# this env takes the CUDA torch 2.14.1 (runs on CPU too; about 8 GB on disk).
ML_TORCH_SPEC=${ML_TORCH_SPEC-"torch==2.14.1 torchvision==0.29.1"}
MONAILABEL_SPEC=${MONAILABEL_SPEC:-monailabel==0.8.5}
# pydicom-seg (a monailabel dependency) imports pydicom._storage_sopclass_uids, gone in pydicom 3: the server
# does not even import with pydicom 3 (pip then takes pynetdicom 2.x / dicomweb-client 0.60 to match)
ML_EXTRA_SPEC=${ML_EXTRA_SPEC-"pydicom<3"}
t_all=$(date +%s)

pipq() {  # pip, quiet, without this machine's "Location ... is ignored" index warnings
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

stamp="$VENV/.e2e-installed-$(cat pyproject.toml scripts/e2e_monailabel.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  t0=$(date +%s)
  if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
    pipq install -q --upgrade pip
  fi
  if [ -n "$ML_TORCH_SPEC" ]; then
    echo "[e2e] installing $ML_TORCH_SPEC"
    # shellcheck disable=SC2086
    pipq install -q $ML_TORCH_SPEC
  fi
  echo "[e2e] installing $MONAILABEL_SPEC (a few minutes)"
  # shellcheck disable=SC2086
  pipq install -q "$MONAILABEL_SPEC" $ML_EXTRA_SPEC $ML_TORCH_SPEC
  echo "[e2e] installing monai-vlmfilm (editable) with only the missing dependencies"
  cons="$VENV/.e2e-constraints.txt"
  "$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -E '^(-e |#)| @ ' > "$cons"
  pipq install -q -e "$REPO" -c "$cons"
  "$VENV/bin/python" -c "import torchvision.ops, monailabel.transform.post, monai_vlmfilm, monai, torch; import monailabel; print('[e2e] monailabel', monailabel.__version__, '| monai', monai.__version__, '| torch', torch.__version__)"
  rm -f "$VENV"/.e2e-installed-*
  touch "$stamp"
  echo "[e2e] install took $(( $(date +%s) - t0 )) s"
else
  # the editable install follows the checkout; re-point it if this is another clone
  if ! "$VENV/bin/python" -c "import monai_vlmfilm, sys, pathlib; sys.exit(pathlib.Path(monai_vlmfilm.__file__).resolve().parents[1] != pathlib.Path('$REPO').resolve())"; then
    pipq install -q --no-deps -e "$REPO"
  fi
  echo "[e2e] reusing $VENV"
fi

if [ -n "${E2E_WORKDIR:-}" ]; then
  WORK=$E2E_WORKDIR
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d -t monailabel-e2e.XXXXXX)
fi
rc=0
# shellcheck disable=SC2086
"$VENV/bin/python" "${E2E_SCRIPT:-scripts/e2e_monailabel.py}" --workdir "$WORK" ${E2E_ARGS:-} || rc=$?
if [ "$rc" -eq 0 ] && [ -z "${E2E_WORKDIR:-}" ] && [ "${KEEP_WORKDIR:-0}" != "1" ]; then
  rm -rf "$WORK"
else
  echo "[e2e] work folder kept: $WORK"
fi
echo "[e2e] total wall time $(( $(date +%s) - t_all )) s (install included), exit $rc"
exit "$rc"
