#!/usr/bin/env bash
# The main job on the embedded default (synthetic XCA data, heuristic profiles, use_vlm_film on).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
OUT=${DEMO_OUT:-demo_out}
mkdir -p "$OUT"
echo "== 1/1 synthetic data -> $OUT/data"
"$PY" -m monai_vlmfilm.data.synthetic --out "$OUT/data" --n-train 48 --n-val 8 --n-test 8 --size 128 --seed 0 \
  --preview "$OUT/data/preview.png"
