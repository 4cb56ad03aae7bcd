#!/usr/bin/env bash
# The main job on the embedded default: synthetic XCA data -> heuristic profiles -> bundle training with
# use_vlm_film true -> inference on the test split -> evaluation; prints Dice / clDice and where everything went.
# Everything is written under $DEMO_OUT (default demo_out); the shipped bundle/models/model.pt is not touched.
# Sizes (override through the environment): DEMO_EPOCHS, DEMO_SIZE (image side), DEMO_PATCH (training crop),
# DEMO_N_TRAIN, DEMO_N_VAL, DEMO_N_TEST, DEMO_VAL_INTERVAL, DEMO_CHANNELS / DEMO_ATTENTION (the network's levels).
# The demo trains the 0.2 bundle's smaller network (channels [32, 64, 64], 1.2 M parameters) so that it finishes in a
# few minutes on a 2-core CPU; DEMO_CHANNELS="[32,64,128,256]" DEMO_ATTENTION="[False,False,False,False]" trains the
# shipped one (10.1 M). The brief CPU training is then compared with the shipped bundle/models/model.pt (trained on
# real angiograms on a GPU) on the same synthetic test images.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
OUT=${DEMO_OUT:-demo_out}
EPOCHS=${DEMO_EPOCHS:-60}
SIZE=${DEMO_SIZE:-128}
# 48x48 crops: on the 2-core CPU the same 360 steps as 64x64 crops cost 0.34 instead of 0.55 s each, and the model
# reaches the same test Dice as 40 epochs of 64x64 crops (0.72; benchmarks/BENCHMARKS.md section 11)
PATCH=${DEMO_PATCH:-48}
N_TRAIN=${DEMO_N_TRAIN:-48}
N_VAL=${DEMO_N_VAL:-8}
N_TEST=${DEMO_N_TEST:-8}
VAL_INTERVAL=${DEMO_VAL_INTERVAL:-5}
NET=(--network_def#channels "${DEMO_CHANNELS:-[32,64,64]}" --network_def#attention_levels "${DEMO_ATTENTION:-[False,False,False]}")
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}  # keep the console readable; errors still surface

DATA="$OUT/data"
DATALIST="$DATA/datalist.json"
CACHE="$OUT/profiles"
TRAIN_DIR="$OUT/train"
MODEL="$TRAIN_DIR/models/model.pt"
INFER_DIR="$OUT/inference"
EVAL_DIR="$OUT/eval"
SHIPPED=bundle/models/model.pt
SHIPPED_EVAL_DIR="$OUT/eval_shipped"
mkdir -p "$OUT"
rm -rf "$TRAIN_DIR" "$INFER_DIR" "$EVAL_DIR" "$SHIPPED_EVAL_DIR"  # idempotent: every run trains and evaluates afresh

t_start=$(date +%s)
step() { echo; echo "==== [$1] $2  (t=$(($(date +%s) - t_start)) s)"; }
# the bundle's own log lines, without the argument dump and security notice MONAI prints before every run
quiet() { grep --line-buffered -v -E "^\s*$|> [a-zA-Z_#]+: |^---$|Default logging file|parsing config_file|_target_|Not all config files|input summary of" || true; }

step 1/5 "synthetic angiograms: $N_TRAIN train / $N_VAL val / $N_TEST test, ${SIZE}x${SIZE} -> $DATA"
"$PY" -m monai_vlmfilm.data.synthetic --out "$DATA" --n-train "$N_TRAIN" --n-val "$N_VAL" --n-test "$N_TEST" \
  --size "$SIZE" --seed 0 --preview "$DATA/preview.png"

step 2/5 "profiles by the heuristic profiler (the embedded default; Qwen2.5-VL takes its place on a GPU) -> $CACHE"
"$PY" -m monai_vlmfilm.profiles precompute --datalist "$DATALIST" --cache-dir "$CACHE" --profiler heuristic --no-progress
"$PY" -m monai_vlmfilm.profiles stats --datalist "$DATALIST" --cache-dir "$CACHE" --profiler heuristic 2>&1 | head -12 || true

step 3/5 "training from scratch, use_vlm_film true, $EPOCHS epochs on ${PATCH}x${PATCH} crops -> $TRAIN_DIR"
"$PY" -m monai.bundle run --bundle_root bundle \
  --config_file "['bundle/configs/train.yaml','configs/flow_vlm.yaml']" \
  --datalist "$DATALIST" --profile_cache_dir "$CACHE" --use_vlm_film True --epochs "$EPOCHS" \
  --patch_size "[$PATCH,$PATCH]" --batch_size 8 --learning_rate 0.002 --val_interval "$VAL_INTERVAL" \
  --log_iter_interval 30 --log_epoch_interval "$VAL_INTERVAL" --film_log_every 60 --ckpt_interval "$VAL_INTERVAL" \
  --ckpt_dir "$TRAIN_DIR/models" --output_dir "$TRAIN_DIR" "${NET[@]}" 2>&1 | quiet

step 4/5 "inference on the test split -> $INFER_DIR"
"$PY" -m monai.bundle run --bundle_root bundle --config_file bundle/configs/inference.yaml \
  --datalist "$DATALIST" --data_split test --profile_cache_dir "$CACHE" --ckpt_path "$MODEL" \
  --output_dir "$INFER_DIR" "${NET[@]}" 2>&1 | quiet

step 5/5 "evaluation on the test split (the demo model, then the shipped one) -> $EVAL_DIR"
evaluate() { # $1 checkpoint, $2 output folder, then network overrides
  "$PY" -m monai.bundle run --bundle_root bundle \
    --config_file "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']" \
    --datalist "$DATALIST" --profile_cache_dir "$CACHE" --use_vlm_film True --ckpt_path "$1" \
    --eval_dir "$2" "${@:3}" 2>&1 | quiet
}
evaluate "$MODEL" "$EVAL_DIR" "${NET[@]}"
summaries=("$EVAL_DIR/summary.json")
if [ -f "$SHIPPED" ]; then
  evaluate "$SHIPPED" "$SHIPPED_EVAL_DIR"
  summaries+=("$SHIPPED_EVAL_DIR/summary.json")
fi

"$PY" - "$EPOCHS" "${summaries[@]}" <<'PYEOF'
import json, sys
epochs, paths = sys.argv[1], sys.argv[2:]
names = [f"this demo ({epochs} epochs, CPU)", "shipped model.pt (real XCA, GPU)"]
rows = (("dice", "Dice"), ("cldice", "clDice"), ("betti0_error", "Betti-0 error"), ("betti1_error", "Betti-1 error"),
        ("hd95", "HD95 (px)"))
sums = [json.load(open(p)) for p in paths]
print()
print(f"==== result on {sums[0]['num_images']} synthetic test images, use_vlm_film="
      f"{sums[0]['extra']['use_vlm_film']} (mean over images)")
print("   " + " " * 14 + "".join(f"{n:>33s}" for n in names[: len(sums)]))
for key, label in rows:
    vals = [s["metrics"].get(key) for s in sums]
    print(f"   {label:14s}" + "".join(f"{v:33.4f}" if v is not None else f"{'n/a':>33s}" for v in vals))
PYEOF

echo
echo "==== outputs"
echo "   data + preview          $DATA  ($DATA/preview.png)"
echo "   profile cache           $CACHE"
echo "   checkpoints             $TRAIN_DIR/models  (model.pt = best validation Dice, checkpoint_final.pt = resumable)"
echo "   TensorBoard             $TRAIN_DIR/tensorboard  (tensorboard --logdir $TRAIN_DIR/tensorboard)"
echo "   masks + overlays        $INFER_DIR  (*_seg.nii.gz, *_overlay.png)"
echo "   metrics                 $EVAL_DIR  (summary.json, metrics.csv, <metric>_raw.csv per image)"
if [ -f "$SHIPPED" ]; then echo "   metrics, shipped model  $SHIPPED_EVAL_DIR"; fi
echo "==== demo finished in $(($(date +%s) - t_start)) s"
