#!/usr/bin/env bash
# The main job on the embedded default: synthetic XCA data -> heuristic profiles -> bundle training with
# use_vlm_film true -> inference on the test split -> evaluation; prints Dice / clDice and where everything went.
# Everything is written under $DEMO_OUT (default demo_out); the shipped bundle/models/model.pt is not touched.
# Sizes (override through the environment): DEMO_EPOCHS, DEMO_SIZE, DEMO_N_TRAIN, DEMO_N_VAL, DEMO_N_TEST.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
OUT=${DEMO_OUT:-demo_out}
EPOCHS=${DEMO_EPOCHS:-8}
SIZE=${DEMO_SIZE:-128}
N_TRAIN=${DEMO_N_TRAIN:-48}
N_VAL=${DEMO_N_VAL:-8}
N_TEST=${DEMO_N_TEST:-8}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}  # keep the console readable; errors still surface

DATA="$OUT/data"
DATALIST="$DATA/datalist.json"
CACHE="$OUT/profiles"
TRAIN_DIR="$OUT/train"
MODEL="$TRAIN_DIR/models/model.pt"
INFER_DIR="$OUT/inference"
EVAL_DIR="$OUT/eval"
mkdir -p "$OUT"
rm -rf "$TRAIN_DIR" "$INFER_DIR" "$EVAL_DIR"  # idempotent: every run trains and evaluates afresh

t_start=$(date +%s)
step() { echo; echo "==== [$1] $2  (t=$(( $(date +%s) - t_start )) s)"; }
# show the bundle's own log lines, without the config dump MONAI prints before every run
quiet() { grep --line-buffered -v -E "^\s*$|> [a-z_#]+: |^---$|Default logging file|parsing config_file|any \`\"_target_\"\`" || true; }

step 1/5 "synthetic angiograms: $N_TRAIN train / $N_VAL val / $N_TEST test, ${SIZE}x${SIZE} -> $DATA"
"$PY" -m monai_vlmfilm.data.synthetic --out "$DATA" --n-train "$N_TRAIN" --n-val "$N_VAL" --n-test "$N_TEST" \
  --size "$SIZE" --seed 0 --preview "$DATA/preview.png"

step 2/5 "profiles with the heuristic profiler (embedded default; a Qwen2.5-VL takes its place on a GPU) -> $CACHE"
"$PY" -m monai_vlmfilm.profiles precompute --datalist "$DATALIST" --cache-dir "$CACHE" --profiler heuristic --no-progress
"$PY" -m monai_vlmfilm.profiles stats --datalist "$DATALIST" --cache-dir "$CACHE" --profiler heuristic 2>&1 | head -20 || true

step 3/5 "training, use_vlm_film true, $EPOCHS epochs: python -m monai.bundle run training ... -> $TRAIN_DIR"
set -o pipefail
"$PY" -m monai.bundle run training --bundle_root bundle \
  --config_file "['bundle/configs/train.yaml','configs/flow_vlm.yaml']" \
  --datalist "$DATALIST" --profile_cache_dir "$CACHE" --use_vlm_film True --epochs "$EPOCHS" \
  --patch_size "[$SIZE,$SIZE]" --ckpt_dir "$TRAIN_DIR/models" --output_dir "$TRAIN_DIR" 2>&1 | quiet

step 4/5 "inference on the test split: python -m monai.bundle run inference ... -> $INFER_DIR"
"$PY" -m monai.bundle run inference --bundle_root bundle --config_file bundle/configs/inference.yaml \
  --datalist "$DATALIST" --data_split test --profile_cache_dir "$CACHE" --ckpt_path "$MODEL" \
  --patch_size "[$SIZE,$SIZE]" --output_dir "$INFER_DIR" 2>&1 | quiet

step 5/5 "evaluation on the test split: python -m monai.bundle run evaluating ... -> $EVAL_DIR"
"$PY" -m monai.bundle run evaluating --bundle_root bundle \
  --config_file "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']" \
  --datalist "$DATALIST" --profile_cache_dir "$CACHE" --use_vlm_film True --ckpt_path "$MODEL" \
  --patch_size "[$SIZE,$SIZE]" --eval_dir "$EVAL_DIR" 2>&1 | quiet

"$PY" - "$EVAL_DIR/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
m, p = s["metrics"], s["per_metric"]
print()
print(f"==== result on {s['num_images']} synthetic test images (use_vlm_film={s['extra']['use_vlm_film']}):")
for k, label in (("dice", "Dice"), ("cldice", "clDice"), ("betti0_error", "Betti-0 error"),
                 ("betti1_error", "Betti-1 error"), ("hd95", "HD95 (px)")):
    if m.get(k) is not None:
        sd = p.get(k, {}).get("std")
        print(f"   {label:14s} {m[k]:8.4f}" + (f"   (std {sd:.4f})" if sd is not None else ""))
EOF
echo
echo "==== outputs"
echo "   data + preview          $DATA  ($DATA/preview.png)"
echo "   profile cache           $CACHE"
echo "   checkpoints             $TRAIN_DIR/models  (model.pt = best validation Dice, checkpoint_final.pt = resumable)"
echo "   TensorBoard             $TRAIN_DIR/tensorboard  (tensorboard --logdir $TRAIN_DIR/tensorboard)"
echo "   masks + overlays        $INFER_DIR  (*_seg.nii.gz, *_overlay.png)"
echo "   metrics                 $EVAL_DIR  (summary.json, metrics.csv, <metric>_raw.csv per image)"
echo "==== demo finished in $(( $(date +%s) - t_start )) s"
