# Sourced by benchmarks/gpu_call_4gpu*.sh at the start of a device call: installs the carried wheels (MONAI, ignite,
# nibabel, fire, transformers; the GPU machine has none of the first four), caps OpenMP pools (many concurrent
# training processes share the host), records the cards, and defines OUT, T0, el (seconds since T0) and P (work dir).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
OUT=${OUT:-./out}; mkdir -p "$OUT"; T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$OUT/cards.txt"
P=/tmp/perf; mkdir -p $P
