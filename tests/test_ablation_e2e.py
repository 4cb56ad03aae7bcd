"""The ablation command end to end: real bundle training + evaluation subprocesses on tiny synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from monai_vlmfilm.data.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--image-size", "32",
    "--override", "network_def#channels=[8,16,16]",
    "--override", "network_def#attention_levels=[False,False,False]",
    "--override", "network_def#norm_num_groups=8",
    "--override", "network_def#cond_dim=16",
    "--override", "network_def#film_hidden_dim=16",
    "--override", "num_inference_steps=2",
    "--override", "batch_size=3",
    "--override", "cache_rate=0",
]  # fmt: skip


def _run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai_vlmfilm.ablation", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip


@pytest.mark.e2e
def test_ablation_off_on_writes_report_and_plots(tmp_path):
    datalist = generate_dataset(tmp_path / "data", n_train=6, n_val=2, n_test=6, size=32, seed=1)
    out = tmp_path / "abl"
    args = ["--datalist", str(datalist), "--out", str(out), "--modes", "off,on", "--seeds", "0", "--max-iterations", "2",
            "--gpus", "cpu", "--cpu-jobs", "2", "--n-boot", "200", "--no-progress", *TINY,
            "--variant", "norm:profile_norm=train;network_def#film_stages=[0]", "--variant-modes", "on"]  # fmt: skip
    proc = _run(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = (out / "report.md").read_text()
    res = json.loads((out / "results.json").read_text())
    assert [j["status"] for j in res["jobs"]] == ["ok", "ok", "ok"]
    assert [(j["n_train"], j["epochs"]) for j in res["jobs"]] == [(6, 1)] * 3  # 2 iterations of batch 3
    assert res["card"] == "CPU" and res["eval_split"] == "test"
    assert res["difficulty_source"].startswith("factors.difficulty")
    # every test image evaluated once per mode, with all five metrics and its ground-truth difficulty
    test_items = json.loads(datalist.read_text())["test"]
    for mode in ("off", "on", "on.norm"):
        recs = [r for r in res["records"] if r["mode"] == mode]
        assert len(recs) == len(test_items)
        assert all({"dice", "cldice", "betti0_error", "betti1_error", "hd95"} <= set(r) for r in recs)
        assert all(0.0 <= r["dice"] <= 1.0 for r in recs)
    diffs = sorted(r["difficulty"] for r in res["records"] if r["mode"] == "off")
    assert diffs == pytest.approx(sorted(it["factors"]["difficulty"] for it in test_items))
    # paired comparison and verdict lines are in the report; FiLM magnitudes come from the trained ON checkpoint
    assert "### on − off" in report and "Verdicts" in report
    assert any(v["name"].startswith("on − off") for v in res["verdicts"])
    assert all(("MET" in v["text"]) or ("NO DATA" in v["text"]) for v in res["verdicts"])
    assert [f["mode"] for f in res["film"]] == ["on", "on.norm"] and set(res["film"][0]["stages"]) == {"0", "1", "2"}
    # the variant: its own settings reached the bundle (one FiLM stage; the training set's profile statistics
    # inside the trained checkpoint) and it is compared against off like any mode
    assert set(res["film"][1]["stages"]) == {"0"} and "### on.norm − off" in report
    import torch

    from monai_vlmfilm.profiles.normalization import load_profile_norm

    sd = torch.load(out / "jobs" / "on.norm_seed0" / "train" / "checkpoint_final.pt", weights_only=True)
    sd = sd.get("model", sd)
    mean, std = load_profile_norm(out / "profiles" / "norm" / "heuristic_main.json")
    assert torch.allclose(sd["profile_encoder.feature_std"], torch.tensor(std))
    assert not torch.equal(sd["profile_encoder.feature_mean"], torch.zeros(len(mean)))
    assert "python -m monai_vlmfilm.ablation" in report and "card: CPU" in report
    for png in ("dice_on_vs_off.png", "metric_vs_difficulty.png", "film_magnitude.png", "profile_features.png",
                "paired_dice.png"):  # fmt: skip
        assert (out / png).stat().st_size > 1000, png
        assert png in report
    # jobs run with profile_on_missing=error, so the finished ON job read every profile from the prepared store
    assert "--profile_on_missing error" in (out / "jobs" / "on_seed0" / "train.log").read_text().splitlines()[0]
    assert (out / "jobs" / "on_seed0" / "train" / "checkpoint_final.pt").is_file()


@pytest.mark.e2e
def test_mixed_site_ablation_reports_each_site(tmp_path):
    """Two tiny synthetic sites trained together (real bundle jobs): every test image evaluated once per mode, with
    its site, and the report's per-site tables."""
    a = generate_dataset(tmp_path / "siteA", n_train=4, n_val=1, n_test=3, size=32, seed=5)
    b = generate_dataset(tmp_path / "siteB", n_train=3, n_val=1, n_test=3, size=32, seed=6)
    out = tmp_path / "abl"
    args = ["--datalist", str(a), "--datalist", f"other={b}", "--out", str(out), "--modes", "off,on", "--seeds", "0",
            "--max-iterations", "2", "--gpus", "cpu", "--cpu-jobs", "2", "--n-boot", "200", "--no-progress", *TINY]  # fmt: skip
    proc = _run(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [j["status"] for j in res["jobs"]] == ["ok", "ok"] and res["setting"] == "mixed-site"
    assert [j["n_train"] for j in res["jobs"]] == [4 + 3] * 2
    for mode in ("off", "on"):
        recs = [r for r in res["records"] if r["mode"] == mode]
        assert sorted((r["site"], Path(r["image"]).name) for r in recs) == sorted(
            [("siteA", f"test_{i:04d}.png") for i in range(3)] + [("other", f"test_{i:04d}.png") for i in range(3)]
        )
    assert set(res["analysis"]["sites"]) == {"siteA", "other"}
    assert res["analysis"]["sites"]["other"]["paired"]["on"]["overall"]["dice"]["n"] == 3
    report = (out / "report.md").read_text()
    assert "### Site `siteA`" in report and "### Site `other`" in report and "| on − off | 3 |" in report
