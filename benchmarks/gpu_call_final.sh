#!/usr/bin/env bash
# One device call on 2 GPUs (< 9 min): GPU 0 runs the performance chain (3B profiler throughput, FiLM overhead,
# few-step inference: benchmarks/run_gpu_perf.sh), GPU 1 runs the reduced ablations (synthetic: 4 modes x 2 seeds;
# DCA1: off/on/shuffle x 2 seeds on its fixed 60/20 split). Thread pools are capped: an earlier call with 15
# concurrent training processes and default OpenMP pools oversubscribed the 32 cores and every job timed out.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
OUT=${OUT:-./out}; mkdir -p "$OUT"; T0=$(date +%s)
nvidia-smi -L
( CUDA_VISIBLE_DEVICES=0 PARALLEL=0 STEPS="prepare profiler film" BUDGET_S=470 bash benchmarks/run_gpu_perf.sh > /tmp/perf_chain.log 2>&1 ) &
PA=$!
python3 -m monai_vlmfilm.data.synthetic --out /tmp/synth --n-train 200 --n-val 20 --n-test 120 --size 128 --seed 0 >/dev/null 2>&1
( CUDA_VISIBLE_DEVICES=1 python3 -m monai_vlmfilm.ablation --datalist /tmp/synth/datalist.json --out /tmp/abl_synth \
    --modes off,on,shuffle,oracle --seeds 0,1 --max-iterations 800 --image-size 128 --override batch_size=8 \
    --gpus 0 --jobs-per-gpu 8 --job-timeout 330 --time-budget 60 --no-progress \
    --title "FiLM ablation: synthetic XCA, 200 train / 120 test, 128 px" > /tmp/abl_synth.log 2>&1 ) &
PB=$!
( CUDA_VISIBLE_DEVICES=1 python3 -m monai_vlmfilm.ablation --datalist .carry/dca1/datalist.json --out /tmp/abl_dca1 \
    --modes off,on,shuffle --seeds 0,1 --max-iterations 800 --image-size 128 --override batch_size=8 \
    --gpus 0 --jobs-per-gpu 6 --job-timeout 330 --time-budget 60 --no-progress \
    --title "FiLM ablation: DCA1 (80 real angiograms), fixed 60/20 split, heuristic profiles" > /tmp/abl_dca1.log 2>&1 ) &
PC=$!
wait $PB; echo "synthetic ablation rc=$? after $(( $(date +%s) - T0 )) s"
wait $PC; echo "dca1 ablation rc=$? after $(( $(date +%s) - T0 )) s"
tar czf "$OUT/ablation_synthetic.tgz" --exclude='*.pt' --exclude=tensorboard -C /tmp abl_synth abl_synth.log
tar czf "$OUT/ablation_dca1.tgz" --exclude='*.pt' --exclude=tensorboard -C /tmp abl_dca1 abl_dca1.log
wait $PA; echo "perf chain rc=$? after $(( $(date +%s) - T0 )) s"
cp /tmp/perf_chain.log "$OUT/perf_chain.log"
grep -h " ok on\|FAILED" /tmp/abl_synth.log /tmp/abl_dca1.log | tail -30
tail -30 /tmp/perf_chain.log
