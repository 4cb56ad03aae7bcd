#!/usr/bin/env bash
# Second 4-GPU device call (< 9.5 min), after benchmarks/gpu_call_4gpu.sh:
#   t=0     GPUs 0+1: 1-GPU vs torchrun 2-GPU precompute on a quiet host (item 2; the first call's 1-GPU run
#                     overlapped the ablation and its ratio was inflated)
#           GPU 2:    FiLM ON/OFF overhead with the fused addcmul modulation (items 3, 5)
#           GPU 3:    few-step sweep with Euler ensembles (item 4), then the DCA1 bar with multi-sample flow rows
#   t~150   GPUs 0-3: DCA1 5-fold cross-validation ablation, 3 seeds, off / on / shuffle / on.norm (issue 7)
source "$(dirname "$0")/device_preamble.sh" || exit 1

( CUDA_VISIBLE_DEVICES=2 timeout 150 python3 benchmarks/gpu_film_overhead.py --skip-few-step --out $P/overhead \
    > $P/overhead.log 2>&1; echo "overhead rc=$? at $(el) s" ) &
( export CUDA_VISIBLE_DEVICES=3
  timeout 300 python3 benchmarks/gpu_film_overhead.py --skip-overhead --out $P/fewstep --train-seconds 90 --workers 4 \
      > $P/fewstep.log 2>&1; echo "few-step rc=$? at $(el) s"
  timeout 240 python3 benchmarks/dca1_unet_baseline.py --out $P/dca1 --train-seconds 60 --flow-seconds 60 \
      --flow-settings euler1,euler4,heun4,euler1x8,euler4x8 --datalist .carry/dca1/datalist.json > $P/dca1.log 2>&1
  echo "dca1 rc=$? at $(el) s" ) &
PG3=$!
( export CUDA_VISIBLE_DEVICES=0,1 OUT=$P/scaling WORK=$P/scaling_work MODEL_DIR=$P/qwen3b N_IMAGES=2048 BATCH=64
  timeout 240 bash benchmarks/gpu_precompute_scaling.sh > $P/scaling.log 2>&1; echo "scaling rc=$? at $(el) s" )

( timeout $(( 555 - $(el) )) python3 -m monai_vlmfilm.ablation --datalist .carry/dca1/datalist.json --out /tmp/abl_dca1 \
    --modes off,on,shuffle --seeds 0,1,2 --folds 5 --max-iterations 800 --image-size 128 --override batch_size=8 \
    --gpus 0,1,2,3 --jobs-per-gpu 15 --job-timeout 330 --time-budget 60 --no-progress \
    --variant "norm@on:profile_norm=train" \
    --title "FiLM ablation: DCA1 (80 real angiograms), 5-fold CV, 3 seeds, heuristic profiles" \
    > /tmp/abl_dca1.log 2>&1; echo "dca1 ablation rc=$? at $(el) s" ) &
PAB=$!
wait $PG3; wait $PAB
tar czf "$OUT/perf.tgz" --exclude='*.safetensors' --exclude=images --exclude=c1 --exclude=c2 -C /tmp perf
tar czf "$OUT/ablation_dca1.tgz" --exclude='*.pt' --exclude=tensorboard -C /tmp abl_dca1 abl_dca1.log
grep -c " ok on" /tmp/abl_dca1.log; grep -h "FAILED" /tmp/abl_dca1.log | head -3
grep -A3 "Verdicts" /tmp/abl_dca1/report.md 2>/dev/null; grep "MET" /tmp/abl_dca1.log | head -20
for f in overhead fewstep dca1 scaling; do echo "== $f"; tail -22 $P/$f.log 2>/dev/null; done
echo "total $(el) s"
