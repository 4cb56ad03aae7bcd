"""python -m monai_vlmfilm.profiles precompute / stats on a small folder of PNGs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_vlmfilm.profiles import HeuristicProfiler, OracleProfiler, ProfileStore
from monai_vlmfilm.profiles.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _write_pngs(folder: Path, n: int = 6) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:40, :40]
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        img = np.full((40, 40), 190.0) - (30 + 25 * i) * np.exp(-((yy - 20 - 0.3 * xx + 4 * i) ** 2) / 3.0)
        img += rng.normal(0, 3 + 4 * i, img.shape)
        p = folder / f"img{i}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
        out.append(p)
    return out


def _summary(out: str) -> dict[str, int]:
    line = next(x for x in out.splitlines() if "summary:" in x)
    parts = dict(p.strip().rsplit(" ", 1) for p in line.split("summary:")[1].split(",")[:5])
    return {k: int(v) for k, v in parts.items()}


def test_precompute_then_all_hits_and_stats(tmp_path, capsys):
    files = _write_pngs(tmp_path / "imgs")
    cache = str(tmp_path / "cache")
    args = ["precompute", "--images", str(tmp_path / "imgs"), "--cache-dir", cache, "--no-progress"]
    assert main(args) == 0
    assert _summary(capsys.readouterr().out) == {"total": 6, "cached": 0, "new": 6, "fallback": 0, "unreadable": 0}
    assert main(args) == 0
    assert _summary(capsys.readouterr().out) == {"total": 6, "cached": 6, "new": 0, "fallback": 0, "unreadable": 0}
    store = ProfileStore(cache)
    fp = HeuristicProfiler().fingerprint
    assert len(store) == 6 and all(store.get(str(f), fp).source == "heuristic" for f in files)
    png = tmp_path / "hist.png"
    assert main(["stats", "--cache-dir", cache, "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "6 profiles" in out and "difficulty" in out and "clutter" in out
    assert Image.open(png).size[0] > 100
    # a datalist selection (paths relative to the datalist's folder) sees the same entries
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"training": [{"image": f"imgs/{f.name}"} for f in files[:4]], "test": [str(files[4])]}))
    assert main(["stats", "--cache-dir", cache, "--datalist", str(dl), "--profiler", "heuristic"]) == 0
    assert "5 profiles" in capsys.readouterr().out
    # --section training --norm-out: normalisation statistics of the training images' profiles only
    norm = tmp_path / "norm.json"
    argv = ["stats", "--cache-dir", cache, "--datalist", str(dl), "--profiler", "heuristic", "--section", "training"]
    assert main(argv + ["--norm-out", str(norm)]) == 0
    assert "4 profiles" in capsys.readouterr().out
    doc = json.loads(norm.read_text())
    vecs = np.stack([store.get(str(f), fp).to_vector() for f in files[:4]])
    np.testing.assert_allclose(doc["mean"][:6], vecs.mean(0)[:6], atol=1e-6)
    np.testing.assert_allclose(doc["std"][:6], np.maximum(vecs.std(0), 0.02)[:6], atol=1e-6)
    assert doc["images"] == 4 and doc["fingerprint"] == fp
    with pytest.raises(SystemExit, match="validation"):
        main(argv[:-1] + ["validation"])


def test_flat_field_warning(tmp_path, capsys):
    files = _write_pngs(tmp_path / "imgs", 3)
    store = ProfileStore(tmp_path / "cache")
    oracle = OracleProfiler()
    for i, f in enumerate(files):  # every factor equal except thin_fraction
        factors = {"contrast": 0.5, "noise": 0.2, "blur": 0.1, "catheter": 0, "overlaps": 0.3, "clutter": 0.4}
        store.put(
            f, oracle.profile_from_factors({**factors, "thin_fraction": i / 2, "difficulty": 3}), oracle.fingerprint
        )
    assert main(["stats", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    warned = {line.split("'")[1] for line in out.splitlines() if line.startswith("WARNING: field")}
    assert warned == {"difficulty", "confidence", "boundary", "clutter"}


def test_unreadable_image_is_listed_others_cached(tmp_path, capsys):
    _write_pngs(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "imgs" / "zero.png").write_bytes(b"")
    cache = str(tmp_path / "cache")
    rc = main(["precompute", "--images", str(tmp_path / "imgs"), "--cache-dir", cache, "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert _summary(out) == {"total": 6, "cached": 0, "new": 4, "fallback": 0, "unreadable": 2}
    assert "broken.png" in err and "zero.png" in err and "empty" in err
    assert len(ProfileStore(cache)) == 4


def test_sharded_ranks_cover_everything_once(tmp_path, capsys, monkeypatch):
    _write_pngs(tmp_path / "imgs", 5)
    cache = str(tmp_path / "cache")
    news = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(["precompute", "--images", str(tmp_path / "imgs"), "--cache-dir", cache, "--no-progress"]) == 0
        news.append(_summary(capsys.readouterr().out)["new"])
    assert news == [3, 2] and len(ProfileStore(cache)) == 5


def test_oracle_precompute_from_datalist(tmp_path, capsys):
    files = _write_pngs(tmp_path / "imgs", 3)
    items = [
        {
            "image": f"imgs/{f.name}",
            "factors": {
                "contrast": 0.2 * i,
                "noise": 0.1,
                "blur": 0.0,
                "catheter": 1,
                "overlaps": 0.5,
                "thin_fraction": 0.3,
                "clutter": 0.6,
                "difficulty": 1 + i,
            },
        }
        for i, f in enumerate(files)
    ]
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"training": items[:2], "validation": items[2:]}))
    cache = str(tmp_path / "cache")
    assert (
        main(["precompute", "--datalist", str(dl), "--cache-dir", cache, "--profiler", "oracle", "--no-progress"]) == 0
    )
    store = ProfileStore(cache)
    oracle = OracleProfiler.from_datalist(dl)
    got = [store.get(str(f), oracle.fingerprint) for f in files]
    assert [p.difficulty for p in got] == [1.0, 2.0, 3.0] and all(p.source == "oracle" for p in got)
    # the oracle also finds factors from pixels alone (digest table)
    assert oracle.profile([np.asarray(Image.open(files[2]), np.float32)])[0].difficulty == 3.0
    assert oracle.profile([np.zeros((5, 5), np.float32)])[0].is_fallback


def test_module_entry_point(tmp_path):
    _write_pngs(tmp_path / "imgs", 2)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai_vlmfilm.profiles",
            "precompute",
            "--images",
            str(tmp_path / "imgs"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "new 2" in r.stdout and "img/s" in r.stderr  # tqdm bar with its rate


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["precompute", "--cache-dir", "x"], "--datalist or --images"),
        (["precompute", "--images", "/nonexistent/dir", "--cache-dir", "x"], "does not exist"),
    ],
)
def test_bad_arguments(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        main(argv)


def test_calibrate_then_precompute_with_it(tmp_path, capsys):
    _write_pngs(tmp_path / "imgs", 4)
    cal = tmp_path / "cal.json"
    assert main(["calibrate", "--images", str(tmp_path / "imgs"), "--out", str(cal)]) == 0
    doc = json.loads(cal.read_text())
    assert doc["images"] == 4 and set(doc["calibration"]) >= {"noise", "cnr", "thin"}
    cache = str(tmp_path / "cache")
    args = ["precompute", "--images", str(tmp_path / "imgs"), "--cache-dir", cache, "--no-progress"]
    assert main([*args, "--calibration", str(cal)]) == 0
    assert main(args) == 0  # default calibration: another fingerprint, new entries
    assert len(ProfileStore(cache).fingerprints()) == 2 and len(ProfileStore(cache)) == 8
