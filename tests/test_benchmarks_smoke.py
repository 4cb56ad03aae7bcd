"""Smoke test of the GPU benchmark script ``benchmarks/gpu_film_overhead.py`` (its ``--smoke`` mode runs on CPU).

The script builds the bundle's network from ``bundle/configs/train.yaml`` ON and OFF, times them, trains the ON
network for a second on generated synthetic images and evaluates few-step inference; a change in the bundle
config, the network, the prepare-batch or the inferer that breaks the GPU measurement shows up here first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_film_overhead_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # the CPU path, whatever the machine
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_film_overhead.py"), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "gpu_film_overhead.json").read_text())
    ov = res["overhead"]
    # FiLM ON adds the profile encoder and heads: more parameters than the plain DiffusionModelUNet
    assert ov["params"]["on"] > ov["params"]["off"] > 0
    for kind in ("train", "infer"):
        row = ov[kind]
        assert row["off_ms"] > 0 and row["on_ms"] > 0
        assert abs(row["ratio_of_medians"] - row["on_ms"] / row["off_ms"]) < 0.01 * row["ratio_of_medians"]
    fs = res["few_step"]
    assert fs["training"]["steps"] >= 1
    settings = [r["setting"] for r in fs["rows"]]
    assert settings == ["euler 1", "euler 2", "heun 1", "heun 2", "euler 1 x 2 samples", "euler 2 x 2 samples"]
    for r in fs["rows"]:
        assert 0.0 <= r["dice"] <= 100.0 and r["images_per_s"] > 0
        assert r["nfe_per_image"] == r["steps"] * r["samples"] * (2 if r["solver"] == "heun" else 1)
    assert len(fs["sliding_window"]) == 2 and all(r["images_per_s"] > 0 for r in fs["sliding_window"])
    # the bundle's network does not use SDPA attention yet: the overhead is also measured with it
    if not ov["bundle_use_flash_attention"]:
        assert set(ov["variants"]) == {"bundle", "sdpa"}
        assert ov["variants"]["sdpa"]["params"] == ov["params"]  # same parameters, other attention kernels
    md = (tmp_path / "gpu_film_overhead.md").read_text()
    assert "| train step (fwd+bwd+AdamW) |" in md and "| euler 2 x 2 samples |" in md
