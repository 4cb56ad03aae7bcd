#!/usr/bin/env bash
# Third 4-GPU device call (< 9 min):
#   GPU 0:    few-step sweep on a GPU of its own, flow network trained longer (200 s), Euler ensembles (item 4)
#   GPUs 1-3: DCA1 5-fold x 3 seeds ablation resumed from the second call's finished jobs (carried in
#             .carry/abl_dca1: identical commands are skipped), adding the variants nogate (on, shuffle) and coarse
#             (FiLM on the deepest decoder stage only)
source "$(dirname "$0")/device_preamble.sh" || exit 1
( export CUDA_VISIBLE_DEVICES=0
  timeout 420 python3 benchmarks/gpu_film_overhead.py --skip-overhead --out $P/fewstep --train-seconds 200 --workers 6 \
      --ensembles 1x4,1x8,1x16,2x8,4x8 > $P/fewstep.log 2>&1; echo "few-step rc=$? at $(el) s" ) &
PFS=$!
cp -r .carry/abl_dca1 /tmp/abl_dca1
( timeout 480 python3 -m monai_vlmfilm.ablation --datalist .carry/dca1/datalist.json --out /tmp/abl_dca1 \
    --modes off,on,shuffle --seeds 0,1,2 --folds 5 --max-iterations 800 --image-size 128 --override batch_size=8 \
    --gpus 1,2,3 --jobs-per-gpu 15 --job-timeout 330 --time-budget 60 --no-progress \
    --variant "norm@on:profile_norm=train" --variant "nogate@on+shuffle:use_difficulty_gate=False" \
    --variant "coarse@on:network_def#film_stages=[0]" \
    --title "FiLM ablation: DCA1 (80 real angiograms), 5-fold CV, 3 seeds, heuristic profiles" \
    > /tmp/abl_dca1.log 2>&1; echo "dca1 ablation rc=$? at $(el) s" ) &
PAB=$!
wait $PFS; wait $PAB
tar czf "$OUT/perf.tgz" -C /tmp perf
tar czf "$OUT/ablation_dca1.tgz" --exclude='*.pt' --exclude=tensorboard -C /tmp abl_dca1 abl_dca1.log
grep -c " ok on" /tmp/abl_dca1.log; grep -c "skipped" /tmp/abl_dca1.log; grep -h "FAILED" /tmp/abl_dca1.log | head -3
grep "MET" /tmp/abl_dca1.log | head -30
tail -30 $P/fewstep.log
echo "total $(el) s"
