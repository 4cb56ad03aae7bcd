#!/usr/bin/env bash
# Run one benchmark on a GPU machine that has torch but not this project's other dependencies.
#
#   bash benchmarks/run_gpu.sh benchmarks/gpu_film_overhead.py --skip-few-step --out "$OUT"
#   bash benchmarks/run_gpu.sh -m monai_vlmfilm.ablation --datalist D --out DIR --gpus 0,1 ...
#   bash benchmarks/run_gpu.sh benchmarks/run_gpu_perf.sh          # a shell script runs with bash
#
# 1. installs the wheels carried in .whl/ (MONAI, ignite, nibabel, fire, ... built where pip can reach an index:
#    `pip download --only-binary=:all: -d .whl monai pytorch-ignite nibabel fire`) into $TARGET, without touching
#    the machine's torch; nothing is installed when .whl/ is absent;
# 2. puts $TARGET and the repository on PYTHONPATH (this checkout's monai_vlmfilm is the one imported);
# 3. caps the OpenMP / MKL pools at $THREADS per process: several training processes share the host, and default
#    pools oversubscribe it (an earlier run with 15 concurrent jobs timed out every one of them);
# 4. records the cards (nvidia-smi) and the library versions in $OUT/cards.txt;
# 5. runs the given python script (or `-m module`, or a .sh script) with its arguments; its exit code is returned.
#
# Environment: OUT (./out), TARGET (/tmp/site), THREADS (2), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
OUT=${OUT:-./out}
TARGET=${TARGET:-/tmp/site}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" .whl/*.whl || exit 1
fi
export PYTHONPATH="$TARGET:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
{
  date -u +%FT%TZ
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import torch, monai; print("torch", torch.__version__, "monai", monai.__version__)' 2>&1
} | tee "$OUT/cards.txt"
if [[ $# -eq 0 ]]; then
  echo "usage: bash benchmarks/run_gpu.sh (SCRIPT.py | -m MODULE | SCRIPT.sh) [ARGS...]" >&2
  exit 2
fi
if [[ $1 == *.sh ]]; then
  exec bash "$@"
fi
exec "$PY" "$@"
