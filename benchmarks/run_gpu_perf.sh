#!/usr/bin/env bash
# All GPU performance measurements of issue 8 (and the DCA1 baseline) in one call on a 2-GPU machine.
#
#   bash benchmarks/run_gpu.sh benchmarks/run_gpu_perf.sh   # 2 x H100: about 7.5 min, bounded by BUDGET_S (540 s)
#   bash benchmarks/run_gpu_perf.sh --smoke                 # the whole chain with tiny sizes on the CPU (about 4 min)
#   STEPS="film dca1" bash benchmarks/run_gpu.sh benchmarks/run_gpu_perf.sh   # a subset (prepare profiler dca1 scaling film)
#
# (benchmarks/run_gpu.sh installs the carried wheels, sets PYTHONPATH and the thread caps, and records the cards.)
# Steps: prepare (3B checkpoint built once + the scaling images), gpu_profiler_throughput.py (item 1),
# precompute_scaling.py run (item 2, both GPUs), gpu_film_overhead.py (items 3-5), dca1_unet_baseline.py.
# PARALLEL=1 (default with 2 GPUs) runs two one-GPU chains side by side, GPU 0: prepare -> profiler and
# GPU 1: film -> dca1 (+ the flow network on DCA1 for DCA1_FLOW_S=45 s), then the 2-GPU scaling step; each
# timing is taken on a GPU of its own (the chains share only the host's 32 cores). PARALLEL=0 runs them one
# after the other in the order above (more than BUDGET_S at full settings: split STEPS over two calls).
# Each step runs under `timeout`, its limit cut to what is left of BUDGET_S after the time kept for later
# steps; the FiLM training budget shrinks when time is short. A failed step does not stop the others.
# $OUT gets few files: gpu_perf.md (every table), gpu_perf.json ({step: results}), gpu_perf.log (all logs)
# and film_flow_synthetic.pt (the flow network trained by gpu_film_overhead.py). Work files stay in $WORK.
# Environment: OUT (./out), WORK (/tmp/gpu_perf), PYTHON (python3), BUDGET_S (540), PARALLEL (1),
# N_IMAGES (2048), FILM_TRAIN_S (90), DCA1_TRAIN_S (60), DCA1_FLOW_S (flow network on DCA1 for that many
# seconds; default 45 when it runs beside the profiler, 0 = none otherwise),
# FILM_ARGS / DCA1_ARGS / PROFILER_ARGS (extra arguments), DCA1_DATALIST (.carry/dca1/datalist.json).
cd "$(dirname "$0")/.." || exit 1
set -u
export PYTHONPATH=${PYTHONPATH:-}:$PWD PYTHONUNBUFFERED=1
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
PY=${PYTHON:-python3}
OUT=${OUT:-./out}
WORK=${WORK:-/tmp/gpu_perf}
BUDGET=${BUDGET_S:-540}
PARALLEL=${PARALLEL:-1}
STEPS=${STEPS:-prepare profiler dca1 scaling film}
N=${N_IMAGES:-2048}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
WORK=$(cd "$WORK" && pwd)
MODEL=$WORK/qwen3b
START=$(date +%s)
if [[ $SMOKE == 1 ]]; then
  export OMP_NUM_THREADS=1  # a small shared CPU box: no spinning thread pools
  MODEL=$WORK/tiny_qwen
  N=${N_IMAGES:-24}
fi
GPUS=$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [[ $PARALLEL == force ]]; then PARALLEL=1; elif [[ $GPUS -lt 2 ]]; then PARALLEL=0; fi  # force: test the chains on CPU
LOG=$OUT/gpu_perf.log
: >"$LOG"
echo "run_gpu_perf: $(date -u +%FT%TZ) smoke=$SMOKE gpus=$GPUS budget=${BUDGET}s parallel=$PARALLEL steps='$STEPS'" | tee -a "$LOG"
[[ $GPUS -gt 0 ]] && command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"

declare -A RC SECS
left() { echo $((BUDGET - ($(date +%s) - START))); }
want() { [[ " $STEPS " == *" $1 "* ]]; }
# run NAME CAP RESERVE CMD...: timeout = min(CAP, time left - RESERVE kept for the later steps)
run() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local t=$(($(left) - reserve))
  ((t > cap)) && t=$cap
  if ((t < 20)); then
    echo "== $name: skipped, ${t}s left for it" | tee -a "$LOG"
    RC[$name]=skipped
    return
  fi
  echo "== $name (timeout ${t}s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout -k 10 "$t" "$@" >"$WORK/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$(($(date +%s) - t0))
  echo "== $name: exit ${RC[$name]} after ${SECS[$name]}s" | tee -a "$LOG"
}

# ---------------------------------------------------------------- the commands
if [[ $SMOKE == 1 ]]; then ARCH=tiny; SIZE=64; else ARCH=3b; SIZE=512; fi
PREP_CMD=($PY benchmarks/precompute_scaling.py prepare --model-dir "$MODEL" --arch $ARCH
  --images "$WORK/scaling_work/images" --n "$N" --size $SIZE)
PROF_CMD=($PY benchmarks/gpu_profiler_throughput.py --model-dir "$MODEL" --out "$WORK/profiler" ${PROFILER_ARGS:-})
[[ $SMOKE == 1 ]] && PROF_CMD+=(--tiny)
# the flow network on DCA1 too when the GPUs run two chains (it is then off the critical path only partly)
if [[ $PARALLEL == 1 ]]; then DCA1_FLOW_S=${DCA1_FLOW_S:-45}; else DCA1_FLOW_S=${DCA1_FLOW_S:-0}; fi
DCA1_CMD=($PY benchmarks/dca1_unet_baseline.py --out "$WORK/dca1" --train-seconds "${DCA1_TRAIN_S:-60}"
  --flow-seconds "$DCA1_FLOW_S" ${DCA1_DATALIST:+--datalist "$DCA1_DATALIST"} ${DCA1_ARGS:-})
[[ $SMOKE == 1 ]] && DCA1_CMD+=(--smoke --flow-seconds 2)
film_cmd() {  # $1: seconds this step may take; the training budget shrinks to leave ~85 s for the rest
  local train=${FILM_TRAIN_S:-90}
  (($1 - 85 < train)) && train=$(($1 - 85 > 20 ? $1 - 85 : 20))
  FILM_CMD=($PY benchmarks/gpu_film_overhead.py --out "$WORK/film" --train-seconds "$train"
    --save-checkpoint "$OUT/film_flow_synthetic.pt" ${FILM_ARGS:-})
  [[ $SMOKE == 1 ]] && FILM_CMD+=(--smoke)
}
scaling_cmd() {
  local batch
  batch=$($PY - "$WORK/profiler/gpu_profiler_throughput.json" <<'PYEOF' 2>/dev/null || echo 32
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["config"] == "scored, packed vision attn"]
print(max(rows, key=lambda r: r["images_per_s"])["batch"] if rows else 32)
PYEOF
)
  [[ $SMOKE == 1 ]] && batch=4
  SC=($PY benchmarks/precompute_scaling.py run --out "$WORK/scaling" --work "$WORK/scaling_work" --model-dir "$MODEL"
    --n "$N" --batch "$batch")
  [[ $SMOKE == 1 ]] && SC+=(--smoke)
}
SCALING_RESERVE=150  # kept for the scaling step, which needs both GPUs and runs last in parallel mode

if [[ $PARALLEL == 1 ]]; then
  # two chains, one per GPU, then the 2-GPU step:  GPU 0: prepare -> profiler;  GPU 1: film -> dca1;  then scaling
  echo "== parallel: GPU 0 prepare+profiler, GPU 1 film+dca1, then scaling on both" | tee -a "$LOG"
  (
    export CUDA_VISIBLE_DEVICES=1
    if want film; then
      film_cmd $(($(left) - SCALING_RESERVE - 110))
      run film 280 $((SCALING_RESERVE + 110)) "${FILM_CMD[@]}"
    fi
    want dca1 && run dca1 220 $SCALING_RESERVE "${DCA1_CMD[@]}"
    for n in film dca1; do echo "$n ${RC[$n]:-not-run} ${SECS[$n]:-0}"; done >"$WORK/gpu1.rc"
  ) &
  GPU1_PID=$!
  export CUDA_VISIBLE_DEVICES=0
  want prepare && run prepare 150 $((SCALING_RESERVE + 120)) "${PREP_CMD[@]}"
  want profiler && run profiler 300 $SCALING_RESERVE "${PROF_CMD[@]}"
  wait "$GPU1_PID"
  unset CUDA_VISIBLE_DEVICES
  while read -r n rc secs; do RC[$n]=$rc; SECS[$n]=$secs; done <"$WORK/gpu1.rc"
  if want scaling; then scaling_cmd; run scaling 220 0 "${SC[@]}"; fi
else
  # one after the other, in the issue's order
  # (all of it at full settings takes longer than BUDGET_S: later steps get what is left; or split STEPS)
  want prepare && run prepare 150 400 "${PREP_CMD[@]}"
  want profiler && run profiler 240 330 "${PROF_CMD[@]}"
  if want scaling; then scaling_cmd; run scaling 200 210 "${SC[@]}"; fi
  if want film; then film_cmd $(($(left) - 90)); run film 260 90 "${FILM_CMD[@]}"; fi
  want dca1 && run dca1 150 0 "${DCA1_CMD[@]}"
fi

# ---------------------------------------------------------------- collect: one markdown, one JSON, one log
for name in prepare profiler dca1 scaling film; do
  [[ -f $WORK/$name.log ]] && { echo "########## $name (exit ${RC[$name]:-?})"; cat "$WORK/$name.log"; } >>"$LOG"
done
STATUS=""
for name in prepare profiler dca1 scaling film; do STATUS+="$name=${RC[$name]:-not-run}:${SECS[$name]:-0} "; done
$PY - "$WORK" "$OUT" "$STATUS" "$(($(date +%s) - START))" <<'EOF'
import json, sys
from pathlib import Path

work, out, status, total = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
parts = {
    "profiler": "profiler/gpu_profiler_throughput",
    "scaling": "scaling/gpu_precompute_scaling",
    "film": "film/gpu_film_overhead",
    "dca1": "dca1/dca1_unet_baseline",
}
steps = {}
for item in status.split():
    name, rest = item.split("=", 1)
    rc, secs = rest.rsplit(":", 1)
    steps[name] = {"exit": rc, "seconds": int(secs)}
doc, md = {"steps": steps, "total_s": int(total)}, ["# GPU performance run (benchmarks/run_gpu_perf.sh)", ""]
md.append("| step | exit | seconds |")
md.append("|---|---|---:|")
md += [f"| {k} | {v['exit']} | {v['seconds']} |" for k, v in steps.items()]
md += ["", f"Total {total} s.", ""]
for name, stem in parts.items():
    j, m = work / f"{stem}.json", work / f"{stem}.md"
    doc[name] = json.loads(j.read_text()) if j.is_file() else None
    md.append(m.read_text() if m.is_file() else f"## {name}: no results (exit {steps.get(name, {}).get('exit')})\n")
(out / "gpu_perf.json").write_text(json.dumps(doc, indent=1))
(out / "gpu_perf.md").write_text("\n".join(md))

# the short table, printed last
def g(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d

rows = []
p = doc.get("profiler")
if p:
    best = max((r for r in p["rows"] if r["mode"] == "scored"), key=lambda r: r["images_per_s"], default=None)
    if best:
        rows.append(("1 profiler scored img/s (best batch)", f"{best['images_per_s']} (b={best['batch']})", ">= 60"))
    rows.append(("1 scored vs stock recipe", g(p, "speedup_best_scored_vs_stock"), ">= 20x"))
s = doc.get("scaling")
if s:
    rows.append(("2 precompute 2 GPU / 1 GPU (steady)", g(s, "ratio_steady"), ">= 1.8"))
    rows.append(("2 caches identical keys", g(s, "keys", "identical"), "True"))
f = doc.get("film")
if f:
    for v, label in (("bundle", "bundle attention"), ("sdpa", "SDPA attention")):
        for kind in ("train", "infer"):
            r = g(f, "overhead", "variants", v, kind)
            if r:
                rows.append((f"3 FiLM {kind} ON/OFF, {label} (ms OFF/ON)", f"{r['median_round_ratio']} ({r['off_ms']}/{r['on_ms']})", "<= 1.03"))
    t = g(f, "few_step", "targets") or {}
    rows.append(("4 Heun4 - Heun32 Dice points", t.get("heun4_minus_heun32_dice_points"), ">= -0.5"))
    rows.append(("4 fastest within 0.5 of 30x5: speedup", f"{t.get('its_speedup_vs_reference')} ({t.get('fastest_within_0.5_of_reference')})", ">= 10x"))
    rows.append(("5 peak GiB train OFF/ON", f"{g(f, 'overhead', 'train', 'peak_gib_off')}/{g(f, 'overhead', 'train', 'peak_gib_on')}", ""))
d = doc.get("dca1")
if d:
    rows.append(("DCA1 BasicUNet Dice / clDice", f"{g(d, 'unet', 'dice')} / {g(d, 'unet', 'cldice')}", "~80 published"))
    for r in g(d, "flow", "rows") or []:
        rows.append((f"DCA1 flow {r['setting']} Dice / clDice", f"{r['dice']} / {r['cldice']}", ""))
print("\n| measurement | value | target |\n|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} |")
print(f"\nsteps: {status}; total {total} s; files in {out}: {sorted(x.name for x in out.iterdir())}")
EOF
