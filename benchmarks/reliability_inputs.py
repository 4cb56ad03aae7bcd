"""Bad inputs through ``AttachVLMProfiled`` at scale, printed as markdown.

    python benchmarks/reliability_inputs.py [--files 3000] [--arrays 3000] [--sizes 4000,8000,12000,14000]

1. damaged image files: valid PNG / JPEG / 16-bit TIFF / NIfTI (.nii, .nii.gz) files, then truncated, bytes
   flipped, garbage inserted, ranges zeroed, header bytes rewritten -> through the transform before
   ``LoadImaged`` (a path) and after it (a MetaTensor naming the file);
2. hostile arrays: random rank 0-5, empty axes, every dtype (bool ... complex, object, str), NaN / +-Inf,
   huge values, constants -> through the transform as plain arrays and as MetaTensors without a file;
3. large images: one cache miss (read, hash, profile, store) and one hit per size, each in a fresh process
   for its peak memory; sizes above PIL's decompression-bomb limit must fail with the file name.

An outcome **survives** when it is either (a) ``ImageReadError`` naming the file (arrays: naming the
problem) and no cache entry written, or (b) a profile equal to ``HeuristicProfiler`` on exactly the pixels
``canonical_image`` decoded, finite and in range, whose cache entry is valid. Anything else (another
exception type, a message without the file, a NaN, an entry for a refused image, a profile that differs)
is **lost**. Errors raised by MONAI's ``LoadImaged`` itself (transform placed after it) are counted apart:
they are MONAI's messages.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirstd, LoadImaged
from PIL import Image

from monai_vlmfilm.profiles import HeuristicProfiler, ProfileStore, canonical_image
from monai_vlmfilm.profiles.base import ImageReadError
from monai_vlmfilm.transforms import AttachVLMProfiled


def _vessels(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w), 190.0)
    for _ in range(3):
        a, b = rng.uniform(-1, 1), rng.uniform(0, h)
        img -= rng.uniform(40, 90) * np.exp(-((yy - a * xx - b) ** 2) / (1 + a * a) / rng.uniform(1, 6))
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255)


def _seed_files(d: Path) -> list[tuple[str, bytes]]:
    """(suffix, bytes) of valid files of every format the pipeline reads."""
    g = _vessels(48, 40, 0)
    out = []
    for suffix, arr, kw in (
        (".png", g.astype(np.uint8), {}),
        (".png", np.stack([g, np.roll(g, 2, 0), g], -1).astype(np.uint8), {}),
        (".jpg", g.astype(np.uint8), {"quality": 90}),
        (".tif", (g * 200).astype(np.uint16), {}),
    ):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format={".png": "PNG", ".jpg": "JPEG", ".tif": "TIFF"}[suffix], **kw)
        out.append((suffix, buf.getvalue()))
    for suffix in (".nii", ".nii.gz"):
        p = d / f"seed{suffix}"
        nib.save(nib.Nifti1Image(g.T.astype(np.float32), np.eye(4)), p)
        out.append((suffix, p.read_bytes()))
    return out


def _mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    b = bytearray(data)
    op = rng.randrange(6)
    if op == 0:
        return "truncate", bytes(b[: rng.randrange(len(b))])
    if op == 1:
        for _ in range(rng.randint(1, 20)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return "flip bytes", bytes(b)
    if op == 2:
        i = rng.randrange(len(b))
        return "insert garbage", bytes(b[:i]) + rng.randbytes(rng.randint(1, 200)) + bytes(b[i:])
    if op == 3:
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randint(1, 400))
        b[i:j] = bytes(j - i)
        return "zero a range", bytes(b)
    if op == 4:  # the header: sizes, dtype, dims live in the first few hundred bytes of every format here
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(min(len(b), 352))] = rng.randrange(256)
        return "header bytes", bytes(b)
    return "empty", b""


def _check_profile(vec: torch.Tensor, pixels: np.ndarray, prof: HeuristicProfiler) -> bool:
    ref = prof.profile([pixels])[0].to_vector()
    v = vec.numpy()
    return bool(np.isfinite(v).all() and (v >= 0).all() and (v <= 1).all() and np.allclose(v, ref, atol=1e-5))


def campaign_files(n: int, tmp: Path, seed: int = 0, keep: Path | None = None) -> dict:
    rng = random.Random(seed)
    seeds = _seed_files(tmp)
    prof = HeuristicProfiler()
    res = Counter()
    lost_examples: list[str] = []
    for i in range(n):
        suffix, data = seeds[i % len(seeds)]
        op, bad = _mutate(data, rng)
        p = tmp / f"m{i:05d}{suffix}"
        p.write_bytes(bad)
        for where in ("before", "after"):
            cache = tmp / f"cache_{where}"
            t = AttachVLMProfiled("image", ProfileStore(cache, fsync=False), prof)
            n_before = len(ProfileStore(cache))
            res["tried"] += 1
            d = {"image": str(p)}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if where == "after":
                        try:
                            d = EnsureChannelFirstd("image")(LoadImaged("image", image_only=True)(d))
                        except Exception:
                            res["refused by MONAI LoadImaged"] += 1
                            res["survived"] += 1
                            continue
                    vec = t(d)["vlm_profile"]
                    pixels = canonical_image(str(p))
            except ImageReadError as e:
                ok = str(p) in str(e) and len(ProfileStore(cache)) == n_before
                res["clear error" if ok else "lost"] += 1
                res["survived"] += ok
                if not ok and len(lost_examples) < 5:
                    lost_examples.append(f"{op} {suffix}: entry written or no file name: {e}")
                continue
            except Exception as e:  # anything else escaping our transform is a finding
                res["lost"] += 1
                if len(lost_examples) < 5:
                    lost_examples.append(f"{op} {suffix} ({where}): {type(e).__name__}: {str(e)[:160]}")
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    (keep / p.name).write_bytes(bad)
                continue
            ok = _check_profile(vec, pixels, prof) and ProfileStore(cache).verify()["corrupt"] == []
            res["decoded, profile of the decoded pixels" if ok else "lost"] += 1
            res["survived"] += ok
            if not ok and len(lost_examples) < 5:
                lost_examples.append(f"{op} {suffix} ({where}): profile differs from the decoded pixels")
        p.unlink()
    return {**res, "examples": lost_examples}


def _random_array(rng: np.random.Generator) -> tuple[str, object]:
    kind = rng.integers(9)
    ndim = int(rng.integers(0, 6))
    shape = tuple(int(s) for s in rng.integers(0, 5, ndim)) if rng.random() < 0.15 else None
    if shape is None:
        shape = tuple(int(rng.choice([1, 2, 3, 4, 17, 33])) for _ in range(ndim))
    if kind == 0:
        return "bool", rng.random(shape) > 0.5
    if kind == 1:
        dt = rng.choice(["int8", "uint8", "int16", "uint16", "int32", "int64", "uint64"])
        info = np.iinfo(dt)
        return f"{dt}", rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)
    if kind == 2:
        dt = rng.choice(["float16", "float32", "float64"])
        return f"{dt}", (rng.normal(size=shape) * 10 ** rng.uniform(-3, 6)).astype(dt)
    if kind == 3:
        x = rng.normal(size=shape).astype(np.float32)
        if x.size:
            x.flat[rng.integers(x.size)] = rng.choice([np.nan, np.inf, -np.inf])
        return "float32 with NaN/Inf", x
    if kind == 4:
        return "float64 beyond float32", np.full(shape, 1e39) * rng.choice([1, -1])
    if kind == 5:
        return "constant", np.full(shape, float(rng.integers(0, 256)), np.float32)
    if kind == 6:
        return "complex", (rng.normal(size=shape) + 1j).astype(np.complex64)
    if kind == 7:
        return "object", np.empty(shape, dtype=object)
    return "str", np.full(shape, "x")


def campaign_arrays(n: int, tmp: Path, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    prof = HeuristicProfiler()
    cache = tmp / "cache_arrays"
    res = Counter()
    lost_examples: list[str] = []
    for _ in range(n):
        kind, x = _random_array(rng)
        for route in ("array", "MetaTensor"):
            res["tried"] += 1
            t = AttachVLMProfiled("image", ProfileStore(cache, fsync=False), prof)
            n_before = len(ProfileStore(cache))
            try:
                img = x
                if route == "MetaTensor":
                    try:
                        img = MetaTensor(torch.as_tensor(x))
                    except (TypeError, RuntimeError, ValueError):
                        res["survived"] += 1  # torch itself cannot hold it (object, str, uint64...)
                        res["not a tensor"] += 1
                        continue
                vec = t({"image": img})["vlm_profile"]
                pixels = canonical_image(img)
            except ImageReadError as e:
                ok = len(ProfileStore(cache)) == n_before and len(str(e)) > 10
                res["clear error"] += ok
                res["survived"] += ok
                res["lost"] += not ok
                continue
            except Exception as e:
                res["lost"] += 1
                if len(lost_examples) < 5:
                    lost_examples.append(f"{kind} {getattr(x, 'shape', '')} ({route}): {type(e).__name__}: {e}")
                continue
            ok = _check_profile(vec, pixels, prof)
            res["profile of the pixels"] += ok
            res["survived"] += ok
            res["lost"] += not ok
            res["flagged constant"] += bool(ok and vec[-1] == 1)
            if not ok and len(lost_examples) < 5:
                lost_examples.append(f"{kind} {x.shape} ({route}): profile differs")
    return {**res, "examples": lost_examples}


_LARGE_CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
from monai_vlmfilm.profiles import HeuristicProfiler, ProfileStore
from monai_vlmfilm.profiles.base import ImageReadError
from monai_vlmfilm.transforms import AttachVLMProfiled
path, cache = sys.argv[1], sys.argv[2]
def status_kb(field):  # VmHWM is this process's own peak (ru_maxrss also counts the parent before exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
r0 = status_kb("VmRSS")
t = AttachVLMProfiled("image", ProfileStore(cache), HeuristicProfiler())
t0 = time.perf_counter()
try:
    t({"image": path})
    miss = time.perf_counter() - t0
    t1 = time.perf_counter(); t({"image": path}); hit = time.perf_counter() - t1
    err = ""
except ImageReadError as e:
    miss = hit = float("nan"); err = str(e)
r1 = status_kb("VmHWM")
print(json.dumps({"miss_s": miss, "hit_s": hit, "extra_mb": (r1 - r0) / 1024, "error": err}))
"""


def campaign_large(sizes: list[int], tmp: Path) -> list[dict]:
    rows = []
    for side in sizes:
        p = tmp / f"large{side}.png"
        y = (np.arange(side, dtype=np.uint32)[:, None] * 7 + np.arange(side, dtype=np.uint32)[None] * 3) % 251
        Image.fromarray(y.astype(np.uint8)).save(p, compress_level=1)
        del y
        r = subprocess.run(
            [sys.executable, "-c", _LARGE_CHILD, str(p), str(tmp / f"cache_large{side}")],
            capture_output=True,
            text=True,
            timeout=900,
        )
        try:
            out = json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            out = {"miss_s": float("nan"), "hit_s": float("nan"), "extra_mb": float("nan"), "error": r.stderr[-300:]}
        rows.append({"side": side, **out, "named": str(p) in out["error"] if out["error"] else None})
        p.unlink()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=3000, help="damaged files (each goes through both routes)")
    ap.add_argument("--arrays", type=int, default=3000, help="hostile arrays (each as array and as MetaTensor)")
    ap.add_argument("--sizes", default="4000,8000,12000,14000", help="large image sides (empty: skip)")
    ap.add_argument("--keep-lost", help="folder to keep the damaged files that were lost (to reproduce them)")
    args = ap.parse_args()
    import logging

    logging.getLogger("monai_vlmfilm").setLevel(logging.ERROR)  # fallback warnings of constant images
    logging.getLogger("nibabel").setLevel(logging.CRITICAL)  # "data code not recognized" of damaged headers
    warnings.simplefilter("ignore")  # overflow casts of the hostile arrays are the point
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"PIL limit {Image.MAX_IMAGE_PIXELS} px\n")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        f = campaign_files(args.files, tmp, keep=Path(args.keep_lost) if args.keep_lost else None)
        tf = time.perf_counter() - t0
        t0 = time.perf_counter()
        a = campaign_arrays(args.arrays, tmp)
        ta = time.perf_counter() - t0
        print("| campaign | tried | survived | lost | outcomes | seconds |")
        print("|---|---:|---:|---:|---|---:|")
        for name, r, sec in (("damaged image files", f, tf), ("hostile arrays", a, ta)):
            outcomes = ", ".join(
                f"{k} {v}" for k, v in sorted(r.items()) if k not in ("tried", "survived", "lost", "examples")
            )
            print(
                f"| {name} | {r.get('tried', 0)} | {r.get('survived', 0)} | {r.get('lost', 0)} | {outcomes} | {sec:.0f} |"
            )
        for name, r in (("files", f), ("arrays", a)):
            for ex in r["examples"]:
                print(f"- lost ({name}): {ex}")
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        if sizes:
            print("\n| image (uint8 PNG) | miss: read + hash + profile + store | hit | extra peak RSS | outcome |")
            print("|---|---:|---:|---:|---|")
            for r in campaign_large(sizes, tmp):
                outcome = (
                    "profiled" if not r["error"] else ("ImageReadError naming the file" if r["named"] else r["error"])
                )
                print(f"| {r['side']} x {r['side']} | {r['miss_s']:.2f} s | {1000 * r['hit_s']:.2f} ms | "
                      f"{r['extra_mb']:.0f} MB | {outcome} |")  # fmt: skip
    print(f"\nrerun: `python benchmarks/reliability_inputs.py --files {args.files} --arrays {args.arrays} "
          f"--sizes {args.sizes}`")  # fmt: skip


if __name__ == "__main__":
    main()
