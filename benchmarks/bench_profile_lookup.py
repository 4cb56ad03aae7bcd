"""Cached profile lookup latency through AttachVLMProfiled next to the cost of loading the image.

    python benchmarks/bench_profile_lookup.py [--images DIR] [--rounds N]

Uses ../shared/data/dca1/images (300x300 PNG) when present, else writes synthetic 300x300 PNGs.
Prints a markdown table of median / p90 microseconds per sample (single process, CPU).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from monai.transforms import EnsureChannelFirstd, LoadImage, LoadImaged
from PIL import Image

from monai_vlmfilm.profiles import HeuristicProfiler, ProfileStore
from monai_vlmfilm.transforms import AttachVLMProfiled

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: str | None, tmp: Path) -> list[str]:
    d = Path(folder) if folder else ROOT.parent / "shared" / "data" / "dca1" / "images"
    if d.is_dir():
        return sorted(str(p) for p in d.glob("*.png"))
    rng = np.random.default_rng(0)
    out = []
    for i in range(40):
        p = tmp / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8)).save(p)
        out.append(str(p))
    return out


def _time_each(fn, items, rounds: int) -> list[float]:
    ts = []
    for _ in range(rounds):
        for it in items:
            t0 = time.perf_counter_ns()
            fn(it)
            ts.append((time.perf_counter_ns() - t0) / 1000.0)
    return ts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = _images(args.images, tmp)
        cache = tmp / "cache"
        ProfileStore(cache, fsync=False).get_or_compute(files, HeuristicProfiler())  # warm the cache on disk

        load = LoadImage(image_only=True)
        load_d = LoadImaged("image")
        ecf = EnsureChannelFirstd("image")
        attach = AttachVLMProfiled("image", str(cache), on_missing="error")
        for f in files:  # warm: path memo + in-memory hits (steady state of every epoch after the first)
            attach({"image": f})
        loaded = [ecf(load_d({"image": f})) for f in files]

        disk = ProfileStore(cache, memory_cache=False)  # every lookup reads + validates the JSON entry
        attach_disk = AttachVLMProfiled("image", disk, on_missing="error")
        for f in files:
            attach_disk({"image": f})
        arr_attach = AttachVLMProfiled("image", str(cache), on_missing="error")
        arrays = [np.asarray(Image.open(f)) for f in files]

        rows = [
            ("MONAI LoadImage of the PNG (reference)", _time_each(load, files, args.rounds)),
            ("AttachVLMProfiled, path, warm cache", _time_each(lambda f: attach({"image": f}), files, args.rounds)),
            ("AttachVLMProfiled, MetaTensor after LoadImaged", _time_each(lambda d: attach(d), loaded, args.rounds)),
            (
                "AttachVLMProfiled, path, entry read from disk",
                _time_each(lambda f: attach_disk({"image": f}), files, args.rounds),
            ),
            (
                "AttachVLMProfiled, bare array (pixels hashed)",
                _time_each(lambda a: arr_attach({"image": a}), arrays, max(1, args.rounds // 2)),
            ),
        ]
        ref = statistics.median(rows[0][1])
        print(
            f"Profile lookup, {len(files)} images of {Image.open(files[0]).size}, {platform.processor() or 'cpu'}, "
            f"{args.rounds} rounds\n"
        )
        print("| operation | median µs | p90 µs | % of image load |")
        print("|---|---:|---:|---:|")
        for name, ts in rows:
            med = statistics.median(ts)
            p90 = float(np.percentile(ts, 90))
            print(f"| {name} | {med:.1f} | {p90:.1f} | {100 * med / ref:.1f} % |")
        assert attach.stats()["misses"] == 0 and attach_disk.stats()["misses"] == 0


if __name__ == "__main__":
    main()
