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


def test_flow_vs_unet_smoke(tmp_path):
    """The flow-vs-UNet benchmark end to end on CPU (about a minute): two jobs on real DCA1 images, then its tables
    rebuilt from the per-image results alone."""
    import pytest
    from shared_data import DCA1, find_shared, looked_in

    xcad = find_shared("data/xcad")
    if not (DCA1 / "datalist.json").is_file() or not (xcad / "datalist.json").is_file():
        pytest.skip(f"needs the shared DCA1 and XCAD data: looked in {looked_in('data')}")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "flow_vs_unet.py"), "--smoke", "--settings", "dca1_cv",
           "--data", str(DCA1.parent), "--out", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    jobs = [json.loads(line) for line in (tmp_path / "run" / "jobs.jsonl").read_text().splitlines()]
    assert sorted(j["model"] for j in jobs) == ["flow-s", "unet"] and not any("error" in j for j in jobs)
    for j in jobs:
        assert j["setting"] == "dca1_cv" and j["n_train"] == 64 and len(j["records"]) == 2
        assert set(j["thr_scores"]) and j["threshold"] in [float(t) for t in j["thr_scores"]]
        for r in j["records"]:
            assert r["site"] == "dca1" and 0.0 <= r["dice"] <= 1.0 and r["b0_err"] >= 0
    flow, unet = (next(j for j in jobs if j["model"] == m) for m in ("flow-s", "unet"))
    assert [r["image"] for r in flow["records"]] == [r["image"] for r in unet["records"]]  # paired over images
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["summary"]
    assert set(summary["dca1_cv"]["dca1"]) == {"flow-s", "unet", "flow-s - unet"}
    # topology is compared as users get it too: Betti-0 after the bundle's small-component removal, and Betti-1
    assert set(summary["dca1_cv"]["dca1"]["flow-s - unet"]) == {
        "dice",
        "cldice",
        "b0_err",
        "b0_err_cc",
        "b1_err",
        "seeds",
    }
    rebuilt = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "flow_vs_unet.py"), "--summarise",
         str(tmp_path / "run" / "jobs.jsonl"), "--out", str(tmp_path / "again")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "summary.json").read_text())["summary"]
    assert again == summary


def test_flow_vs_unet_prior_jobs_run_first_and_are_reused(tmp_path):
    """+p (issue 14 item 5) end to end on CPU: the prior UNets run before the job that needs them, their maps are
    stored once, and a second run reuses them instead of training again."""
    import pytest
    from shared_data import DCA1

    if not (DCA1 / "datalist.json").is_file():
        pytest.skip("needs the shared DCA1 data")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "flow_vs_unet.py"), "--smoke", "--plan", "dca1_cv=flow-s+p:off",
           "--folds", "0", "--max-train", "8", "--data", str(DCA1.parent), "--out", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "jobs.jsonl").read_text().splitlines()]
    priors, flows = [r for r in rows if r["setting"] == "prior"], [r for r in rows if r["setting"] == "dca1_cv"]
    assert len(flows) == 1 and rows[-1] is flows[0] and not any("error" in r for r in rows)  # the +p job ran last
    flow = flows[0]
    assert flow["info"]["prior"] and flow["n_train"] == 8 and len(flow["records"]) == 2
    # the flow also started from its prior at intermediate times (FlowSegInferer(start_time=s, init=prior))
    starts = ["dice_start0.5"]  # --smoke runs the middle of flow_vs_unet.PRIOR_START_TIMES only
    assert all(0.0 <= rec[k] <= 1.0 for rec in flow["records"] for k in starts)
    assert sorted(flow["prior_keys"]) == sorted(r["prior_key"] for r in priors) and "records" not in priors[0]
    # one UNet per training fold present plus the one for the test images, each map stored
    assert sum(r["n_pred"] for r in priors) == 8 + 2
    stored = {p.name for p in (tmp_path / "run" / "priors").iterdir()}
    assert stored == {f"prior_{r['prior_key']}.npz" for r in priors}
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 UNet(s) to train" in again.stdout, again.stdout[-2000:]
    rows2 = [json.loads(line) for line in (tmp_path / "run" / "jobs.jsonl").read_text().splitlines()]
    assert len(rows2) == len(rows) + 1 and rows2[-1]["prior_keys"] == flow["prior_keys"]
