#!/usr/bin/env bash
# One device call on a 4-GPU machine (< 9.5 min): issue 8's missing measurements on GPUs 0-1 and the synthetic
# ablation (issue 7) on GPUs 2-3.
#   t=0    GPU 0: FiLM ON/OFF overhead at 320 px batch 8 (items 3, 5) while the host is still quiet
#   then   GPU 0: 3B checkpoint + scaling images, then the DCA1 BasicUNet bar and the flow network (same budget);
#          GPU 1: few-step Dice vs steps and images/s at 512 px (item 4);
#          GPUs 0+1: 1-GPU vs torchrun 2-GPU precompute (item 2)
#   GPUs 2-3: python -m monai_vlmfilm.ablation on 300/240 synthetic images with variants (command below)
# Thread pools are capped (many concurrent training processes). Results land in $OUT as a few tarballs + logs.
source "$(dirname "$0")/device_preamble.sh" || exit 1

# ---- GPU 0 first: the overhead timing on a quiet host
( CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/gpu_film_overhead.py --skip-few-step --out $P/overhead \
    > $P/overhead.log 2>&1; echo "overhead rc=$? at $(el) s" ) &
POV=$!
python3 -m monai_vlmfilm.data.synthetic --out /tmp/synth --n-train 300 --n-val 20 --n-test 240 --size 128 --seed 0 >/dev/null 2>&1
echo "synthetic data at $(el) s"
wait $POV

# ---- GPUs 2-3: the ablation (its job queue spreads jobs over both GPUs)
( python3 -m monai_vlmfilm.ablation --datalist /tmp/synth/datalist.json --out /tmp/abl_synth \
    --modes off,on,shuffle,oracle --seeds 0,1,2 --calibration train --max-iterations 800 --image-size 128 \
    --override batch_size=8 --override num_workers=2 --gpus 2,3 --jobs-per-gpu 15 --job-timeout 330 \
    --time-budget 150 --no-progress \
    --variant "norm@on+shuffle+oracle:profile_norm=train" --variant "nogate@on+oracle:use_difficulty_gate=False" \
    --variant "dca1cal@on:calibration=default" \
    --title "FiLM ablation: synthetic XCA, 300 train / 240 test, 128 px, 3 seeds, variants" \
    > /tmp/abl_synth.log 2>&1; echo "synthetic ablation rc=$? at $(el) s" ) &
PAB=$!

# ---- GPU 1: few-step sweep (trains its own flow network on synthetic data first)
( CUDA_VISIBLE_DEVICES=1 timeout 330 python3 benchmarks/gpu_film_overhead.py --skip-overhead --out $P/fewstep \
    --train-seconds 90 --workers 6 --save-checkpoint $P/film_flow_synthetic.pt > $P/fewstep.log 2>&1
  echo "few-step rc=$? at $(el) s" ) &
PFS=$!
# ---- GPU 0: 3B checkpoint + images, then the DCA1 bar
( export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 benchmarks/precompute_scaling.py prepare --model-dir $P/qwen3b --arch 3b \
      --images $P/scaling_work/images --n 2048 --size 512 > $P/prepare.log 2>&1; echo "prepare rc=$? at $(el) s"
  timeout 200 python3 benchmarks/dca1_unet_baseline.py --out $P/dca1 --train-seconds 60 --flow-seconds 60 \
      --datalist .carry/dca1/datalist.json > $P/dca1.log 2>&1; echo "dca1 rc=$? at $(el) s" ) &
PG0=$!
wait $PFS; wait $PG0
# ---- GPUs 0+1: precompute scaling
if (( $(el) < 440 )); then
  ( export CUDA_VISIBLE_DEVICES=0,1 OUT=$P/scaling WORK=$P/scaling_work MODEL_DIR=$P/qwen3b N_IMAGES=2048 BATCH=64
    timeout $(( 560 - $(el) )) bash benchmarks/gpu_precompute_scaling.sh > $P/scaling.log 2>&1; echo "scaling rc=$? at $(el) s" )
else
  echo "scaling skipped: $(el) s used"
fi
wait $PAB
tar czf "$OUT/perf.tgz" --exclude='*.safetensors' --exclude=images --exclude=c1 --exclude=c2 --exclude='*.pt' -C /tmp perf
tar czf "$OUT/ablation_synthetic.tgz" --exclude='*.pt' --exclude=tensorboard -C /tmp abl_synth abl_synth.log
grep -h " ok on\|FAILED" /tmp/abl_synth.log | tail -5
tail -12 /tmp/abl_synth.log
for f in overhead fewstep dca1 scaling; do echo "== $f"; tail -25 $P/$f.log 2>/dev/null; done
echo "total $(el) s"
