#!/usr/bin/env bash
# Profile precompute scaling (issue 8, item 2): `python -m monai_vlmfilm.profiles precompute` on 1 GPU vs
# `torchrun --nproc_per_node=2` on 2 GPUs, scored mode, Qwen2.5-VL-3B architecture with random weights.
#
#   benchmarks/gpu_precompute_scaling.sh            # 2-GPU machine: about 2.5 min (model build included)
#   benchmarks/gpu_precompute_scaling.sh --smoke    # tiny model, 24 small images, CPU is fine
#
# Steps: build the checkpoint once (reused when MODEL_DIR already holds a complete one), write N synthetic
# PNGs, run the 1-process and the N-process precompute into fresh caches C1 and C2 (wall clock of each whole
# command recorded), then benchmarks/precompute_scaling.py report: steady images/s from the cache entries'
# timestamps (model load and the first batch left out), the CLI's own figures (model load included), the
# ratio (target >= 1.8), and a check that C1 and C2 hold identical keys, one per image.
# Writes gpu_precompute_scaling.md / .json to $OUT (default ./out); logs and caches stay under $WORK.
# Environment: PYTHON (python3), WORK (/tmp/vlmfilm_scaling), MODEL_DIR ($WORK/qwen3b), N_IMAGES (2048),
# IMAGE_SIZE (512), BATCH (32), NPROC (2), EXTRA_ARGS (more precompute arguments, e.g. --no-fsync).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-./out}
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
if [[ $SMOKE == 1 ]]; then
  WORK=${WORK:-/tmp/vlmfilm_scaling_smoke}
  ARCH=tiny; N=${N_IMAGES:-24}; SIZE=${IMAGE_SIZE:-64}; BATCH=${BATCH:-4}; MODEL=${MODEL_DIR:-$WORK/tiny_qwen}
  DESC="tiny Qwen2.5-VL (smoke)"
  export OMP_NUM_THREADS=1  # as torchrun sets it for its workers: the CPU comparison stays like for like
else
  WORK=${WORK:-/tmp/vlmfilm_scaling}
  ARCH=3b; N=${N_IMAGES:-2048}; SIZE=${IMAGE_SIZE:-512}; BATCH=${BATCH:-32}; MODEL=${MODEL_DIR:-$WORK/qwen3b}
  DESC="Qwen2.5-VL-3B architecture, random weights"
fi
NPROC=${NPROC:-2}
EXTRA=${EXTRA_ARGS:-}
mkdir -p "$WORK" "$OUT"
WORK=$(cd "$WORK" && pwd)

$PY benchmarks/precompute_scaling.py prepare --model-dir "$MODEL" --arch $ARCH --images "$WORK/images" --n "$N" --size "$SIZE"
rm -rf "$WORK/c1" "$WORK/c2"
common=(precompute --images "$WORK/images" --profiler qwen --model "$MODEL" --mode scored --batch-size "$BATCH" --no-progress)
# shellcheck disable=SC2206
common+=($EXTRA)

now() { date +%s%N; }
since() { local ms=$(( ($(now) - $1) / 1000000 )); printf '%d.%03d' $((ms / 1000)) $((ms % 1000)); }
echo "== 1 process: python -m monai_vlmfilm.profiles ${common[*]} --cache-dir C1"
t0=$(now)
$PY -m monai_vlmfilm.profiles "${common[@]}" --cache-dir "$WORK/c1" 2>&1 | tee "$WORK/run1.log"
wall1=$(since "$t0")
start1=$t0

if command -v torchrun >/dev/null 2>&1 && [[ -z "${PYTHON:-}" ]]; then TR=(torchrun); else TR=($PY -m torch.distributed.run); fi
echo "== $NPROC processes: ${TR[*]} --nproc_per_node=$NPROC -m monai_vlmfilm.profiles ... --cache-dir C2"
t0=$(now)
"${TR[@]}" --standalone --nproc_per_node="$NPROC" -m monai_vlmfilm.profiles "${common[@]}" --cache-dir "$WORK/c2" 2>&1 | tee "$WORK/run2.log"
wall2=$(since "$t0")
start2=$t0

$PY benchmarks/precompute_scaling.py report --images "$WORK/images" --size "$SIZE" --cache1 "$WORK/c1" --cache2 "$WORK/c2" \
  --log1 "$WORK/run1.log" --log2 "$WORK/run2.log" --wall1 "$wall1" --wall2 "$wall2" --start1-ns "$start1" --start2-ns "$start2" --batch "$BATCH" --nproc "$NPROC" \
  --model-desc "$DESC" --command "gpu_precompute_scaling.sh${1:+ $1} (N=$N, size $SIZE, batch $BATCH${EXTRA:+, $EXTRA})" \
  --out "$OUT"
