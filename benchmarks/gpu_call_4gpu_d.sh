#!/usr/bin/env bash
# Fourth 4-GPU device call (< 6 min): the synthetic ablation of the first call resumed (its finished jobs carried in
# .carry/abl_synth; the data set is regenerated bit for bit from its seed), adding decoder-stage, encoder-width and
# combined variants in the on and oracle modes.
source "$(dirname "$0")/device_preamble.sh" || exit 1
python3 -m monai_vlmfilm.data.synthetic --out /tmp/synth --n-train 300 --n-val 20 --n-test 240 --size 128 --seed 0 >/dev/null 2>&1
cp -r .carry/abl_synth /tmp/abl_synth
timeout 400 python3 -m monai_vlmfilm.ablation --datalist /tmp/synth/datalist.json --out /tmp/abl_synth \
    --modes off,on,shuffle,oracle --seeds 0,1,2 --calibration train --max-iterations 800 --image-size 128 \
    --override batch_size=8 --override num_workers=2 --gpus 0,1,2,3 --jobs-per-gpu 8 --job-timeout 330 \
    --time-budget 60 --no-progress \
    --variant "norm@on+shuffle+oracle:profile_norm=train" --variant "nogate@on+oracle:use_difficulty_gate=False" \
    --variant "dca1cal@on:calibration=default" \
    --variant "coarse@on+oracle:network_def#film_stages=[0]" --variant "fine@on+oracle:network_def#film_stages=[2]" \
    --variant "wide@on+oracle:network_def#cond_dim=256;network_def#film_hidden_dim=256" \
    --variant "norm+nogate@on+oracle:profile_norm=train;use_difficulty_gate=False" \
    --title "FiLM ablation: synthetic XCA, 300 train / 240 test, 128 px, 3 seeds, variants" \
    > /tmp/abl_synth.log 2>&1; echo "synthetic ablation rc=$? at $(el) s"
tar czf "$OUT/ablation_synthetic.tgz" --exclude='*.pt' --exclude=tensorboard -C /tmp abl_synth abl_synth.log
grep -c " ok on" /tmp/abl_synth.log; grep -c "skipped" /tmp/abl_synth.log; grep -h "FAILED" /tmp/abl_synth.log | head -3
grep "MET" /tmp/abl_synth.log | grep -v Betti | head -40
echo "total $(el) s"
