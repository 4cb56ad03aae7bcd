"""The bundle's profiler overlay finds what the precompute CLI wrote: same fingerprint, same keys, no miss.

Uses the tiny offline Qwen2.5-VL of tests/conftest.py as a *local model folder*, which is the documented way to
point bundle/configs/profiler_qwen2_5_vl_3b.yaml at a model (`--qwen_model <folder>`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> str:
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen_bundle") / "data"
    _run([sys.executable, "-m", "monai_vlmfilm.data.synthetic", "--out", str(out), "--n-train", "2", "--n-val", "1",
          "--n-test", "1", "--size", "64", "--seed", "5"])  # fmt: skip
    return out / "datalist.json"


def _attach_transforms(overlays: list[str], overrides: dict):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(REPO / "bundle/configs/train.yaml"), *(str(REPO / o) for o in overlays)])
    p.update(overrides)
    # LoadImaged, EnsureGrayscale2Dd, AttachVLMProfiled: the training pipeline up to the profile
    return p.get_parsed_content("train#deterministic_transforms")[:3], p


def test_qwen_overlay_reads_cli_precompute(tiny_qwen_dir, small_data, tmp_path):
    from monai.transforms import Compose

    from monai_vlmfilm.data.datalist import load_split
    from monai_vlmfilm.transforms import AttachVLMProfiled

    cache = tmp_path / "cache"
    out = _run([sys.executable, "-m", "monai_vlmfilm.profiles", "precompute", "--datalist", str(small_data),
                "--cache-dir", str(cache), "--profiler", "qwen", "--model", str(tiny_qwen_dir), "--mode", "scored",
                "--dtype", "bfloat16", "--batch-size", "2", "--no-progress"])  # fmt: skip
    assert "new 4" in out
    transforms, parser = _attach_transforms(
        ["configs/flow_vlm.yaml", "bundle/configs/profiler_qwen2_5_vl_3b.yaml"],
        {"qwen_model": str(tiny_qwen_dir), "profile_cache_dir": str(cache), "profile_on_missing": "error"},
    )
    attach = transforms[2]
    assert isinstance(attach, AttachVLMProfiled)
    assert parser.get_parsed_content("profiler").model_name == str(tiny_qwen_dir)
    pipeline = Compose(transforms)
    for split in ("training", "validation"):
        for item in load_split(small_data, split):
            d = pipeline(item)
            assert d["vlm_profile"].shape == (7,) and float(d["vlm_profile"][-1]) == 0.0  # not a fallback
    stats = attach.stats()
    assert stats["hits"] == 3 and stats["misses"] == 0
    assert attach.profiler.model is None  # a hit never loads the VLM


def test_heuristic_overlay_matches_cli(small_data, tmp_path):
    cache = tmp_path / "cache"
    _run([sys.executable, "-m", "monai_vlmfilm.profiles", "precompute", "--datalist", str(small_data),
          "--cache-dir", str(cache), "--profiler", "heuristic", "--no-progress"])  # fmt: skip
    transforms, _ = _attach_transforms(
        ["configs/flow_vlm.yaml", "bundle/configs/profiler_heuristic.yaml"],
        {"profile_cache_dir": str(cache), "profile_on_missing": "error"},
    )
    from monai.transforms import Compose

    from monai_vlmfilm.data.datalist import load_split

    pipeline = Compose(transforms)
    for item in load_split(small_data, "training"):
        pipeline(item)
    assert transforms[2].stats()["hits"] == 2
