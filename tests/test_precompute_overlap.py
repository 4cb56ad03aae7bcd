"""precompute reads ahead and loads the model in the background: same cache as reading one batch at a time."""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from monai_vlmfilm.profiles.cli import main, precompute
from monai_vlmfilm.profiles.qwen import QwenVLProfiler
from monai_vlmfilm.profiles.store import ProfileStore


def _pngs(folder, n: int, dup: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, size=(48 + 8 * (i % 3), 64), dtype=np.uint8)).save(p)
        paths.append(str(p))
    for i in range(dup):  # the same pixels under another name, in a later batch
        q = folder / f"zz_copy_{i}.png"
        shutil.copy(paths[i], q)
        paths.append(str(q))
    return paths


def _entries(cache) -> dict[str, dict]:
    store = ProfileStore(cache)
    return {k: p.to_json_dict() for k, p in store.items()}


def test_prefetch_and_background_load_give_the_same_cache(tiny_qwen_dir, tmp_path):
    paths = _pngs(tmp_path / "img", 9, dup=2)
    results = {}
    for prefetch in (0, 3):
        prof = QwenVLProfiler(tiny_qwen_dir, mode="scored", batch_size=4)
        timing: dict = {}
        res = precompute(
            paths, ProfileStore(tmp_path / f"c{prefetch}"), prof, 4, progress=False, prefetch=prefetch, timing=timing
        )
        assert res["new"] == 9 and res["cached"] == 2 and not res["unreadable"]
        assert timing["first_batch_at"] > 0
        # with read-ahead the model was loaded on the background thread, timed
        assert (getattr(prof, "load_seconds", None) is not None) == (prefetch > 0)
        results[prefetch] = _entries(tmp_path / f"c{prefetch}")
    assert results[0].keys() == results[3].keys() and len(results[0]) == 9
    for k in results[0]:
        a, b = results[0][k], results[3][k]
        assert a["difficulty"] == b["difficulty"] and a["focus"] == b["focus"]


def test_cli_reports_start_up_separately(tiny_qwen_dir, tmp_path, capsys):
    _pngs(tmp_path / "img", 5)
    argv = ["precompute", "--images", str(tmp_path / "img"), "--cache-dir", str(tmp_path / "c"), "--profiler"]
    argv += ["qwen", "--model", str(tiny_qwen_dir), "--batch-size", "2", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "summary: total 5, cached 0, new 5" in out
    assert "start-up: main at" in out and "in the background" in out and "first batch written at" in out
    assert main([*argv, "--prefetch", "0"]) == 0  # all cached now
    out = capsys.readouterr().out
    assert "cached 5, new 0" in out
