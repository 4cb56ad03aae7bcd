#!/usr/bin/env bash
# One device call (2 GPUs, < 10 min): the synthetic ablation (GPU 0), the DCA1 5-fold ablation (GPU 1) and the
# shipped checkpoint (bundle training on DCA1's 60 training images, evaluated on its 20 validation images and on the
# synthetic test split), all at once. Results land in $OUT as tarballs (no checkpoints except the shipped model.pt).
#   needs: .whl/ (monai, ignite, nibabel, fire, termcolor wheels) and .carry/dca1 (copy of ../shared/data/dca1)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-./out}; mkdir -p "$OUT"
nvidia-smi -L; python3 -c "import torch, monai, transformers; print(torch.__version__, monai.__version__, transformers.__version__)"
T0=$(date +%s)
python3 -m monai_vlmfilm.data.synthetic --out /tmp/synth --n-train 300 --n-val 40 --n-test 240 --size 128 --seed 0 >/tmp/synth_gen.log 2>&1

( python3 -m monai_vlmfilm.ablation --datalist /tmp/synth/datalist.json --out /tmp/abl_synth \
    --modes off,on,shuffle,oracle --seeds 0,1,2 --max-iterations 1200 --image-size 128 --override batch_size=8 \
    --gpus 0,1 --jobs-per-gpu 3 --job-timeout 200 --time-budget 300 --no-progress \
    --title "FiLM ablation: synthetic XCA, 300 train / 240 test, 128 px" > /tmp/abl_synth.log 2>&1 ) &
P1=$!
( python3 -m monai_vlmfilm.ablation --datalist .carry/dca1/datalist.json --out /tmp/abl_dca1 \
    --modes off,on,shuffle --seeds 0,1 --folds 5 --max-iterations 800 --image-size 128 --override batch_size=8 \
    --gpus 0,1 --jobs-per-gpu 4 --job-timeout 180 --time-budget 320 --no-progress \
    --title "FiLM ablation: DCA1 (80 real angiograms), 5-fold CV, heuristic profiles" > /tmp/abl_dca1.log 2>&1 ) &
P2=$!
# the shipped checkpoint: the bundle's own training command, FiLM on, heuristic profiles
( set -x
  B="--bundle_root /tmp/ship --dataset_dir $PWD/.carry/dca1 --profile_cache_dir /tmp/ship/profiles"
  mkdir -p /tmp/ship && cp -r bundle/configs /tmp/ship/ && \
  CUDA_VISIBLE_DEVICES=1 python3 -m monai.bundle run training \
    --config_file "['bundle/configs/train.yaml','configs/flow_vlm.yaml']" $B \
    --seed 0 --epochs 300 --batch_size 8 --val_interval 50 && \
  for split in validation; do
    CUDA_VISIBLE_DEVICES=1 python3 -m monai.bundle run evaluating \
      --config_file "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml','configs/flow_vlm.yaml']" $B \
      --ckpt_path /tmp/ship/models/model.pt --data_split $split --output_dir /tmp/ship/eval_dca1
  done && \
  CUDA_VISIBLE_DEVICES=1 python3 -m monai.bundle run evaluating \
      --config_file "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml','configs/flow_vlm.yaml']" \
      --bundle_root /tmp/ship --dataset_dir /tmp/synth --profile_cache_dir /tmp/ship/profiles \
      --ckpt_path /tmp/ship/models/model.pt --data_split test --output_dir /tmp/ship/eval_synth
) > /tmp/ship.log 2>&1 &
P3=$!
wait $P3; echo "ship rc=$? after $(( $(date +%s) - T0 )) s"
wait $P1; echo "synthetic ablation rc=$? after $(( $(date +%s) - T0 )) s"
wait $P2; echo "dca1 ablation rc=$? after $(( $(date +%s) - T0 )) s"
cp /tmp/ship/models/model.pt "$OUT/model.pt" 2>/dev/null
tar czf "$OUT/ship.tgz" --exclude='*.pt' -C /tmp ship ship.log 2>/dev/null
tar czf "$OUT/ablation_synthetic.tgz" --exclude='*.pt' --exclude=tensorboard -C /tmp abl_synth abl_synth.log
tar czf "$OUT/ablation_dca1.tgz" --exclude='*.pt' --exclude=tensorboard -C /tmp abl_dca1 abl_dca1.log
tail -5 /tmp/ship.log; grep -iE "dice|MET" /tmp/abl_synth/report.md | head -20; grep -iE "dice|MET" /tmp/abl_dca1/report.md | head -20
ls -la "$OUT"
