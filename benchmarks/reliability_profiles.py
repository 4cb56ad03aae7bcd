"""Fuzzing of the profile parser and crash / concurrency runs of the profile cache, printed as markdown.

    python benchmarks/reliability_profiles.py [--fuzz 100000] [--kills 20] [--concurrency-rounds 3]

1. parser fuzzing: damaged model outputs (truncation, random bytes, unicode, nested junk, huge numbers,
   NaN / Infinity, duplicate keys, deep nesting, 1 MB strings) -> no exception, every profile in range,
   worst-case parse time;
2. crash consistency: ``precompute`` killed with SIGKILL at random moments (twice per round on the same
   cache), then resumed -> every entry valid, final cache equal to an uninterrupted run's, no temp files;
3. concurrency: 4 processes, each a DataLoader with 2 workers running ``AttachVLMProfiled`` (computing
   misses) over the same images in different orders, one store -> no corrupt entry, no lost entry, every
   process saw the reference profile of every image.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from monai_vlmfilm.profiles import FOCUS_KEYS, HeuristicProfiler, ProfileStore, parse_profile
from monai_vlmfilm.profiles.cli import precompute

CLEAN = {
    "difficulty": 4,
    "confidence": 0.8,
    "focus": {"boundary": 0.2, "thin_structure": 0.9, "small_objects": 0.1, "clutter": 0.3},
}


def damaged_output(rng: random.Random) -> str:
    base = rng.choice(
        [
            json.dumps(CLEAN),
            json.dumps(CLEAN).replace('"', "'"),
            "```json\n" + json.dumps(CLEAN, indent=2) + "\n```",
            "Here is the profile: " + json.dumps(CLEAN) + " I hope this helps.",
        ]
    )
    op = rng.randrange(12)
    if op == 0:
        return base[: rng.randrange(len(base) + 1)]
    if op == 1:
        i = rng.randrange(len(base) + 1)
        return base[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))).decode("latin-1") + base[i:]
    if op == 2:
        return "".join(c if rng.random() > 0.15 else chr(rng.randrange(0x20, 0x10FFFF) & 0xD7FF) for c in base)
    if op == 3:
        d = rng.randrange(1, 400)
        return "[" * d + '{"a":' * rng.randrange(d) + base + "}" * rng.randrange(d)
    if op == 4:
        v = rng.choice(["1e309", "-1e309", "NaN", "Infinity", "-Infinity", "9" * 5000, "1e-400", "0x10", "null"])
        return base.replace("0.8", v).replace("0.2", v, rng.randrange(2))
    if op == 5:
        return base.replace("4", '4, "difficulty": 2, "difficulty": "x"', 1)
    if op == 6:
        return "".join(c for c in base if rng.random() > 0.1)
    if op == 7:
        table = str.maketrans({":": "=", ",": ";", "{": "(", "}": ")", '"': "`"})
        return "".join(c.translate(table) if rng.random() < 0.2 else c for c in base)
    if op == 8 and rng.random() < 0.02:  # 1 MB strings (rarely: each costs a few ms)
        filler = rng.choice(["{", "[", "a", '"', "\\", " ", "/*", "{'", '"a":1,'])
        return rng.choice([filler * (1_000_000 // len(filler)) + base, base[:20] + filler * 500_000])
    if op == 9:
        return json.dumps({"result": {"profile": CLEAN, "extra": list(range(rng.randrange(50)))}})
    if op == 10:
        return "".join(rng.choice("{}[]:,\"'0123456789.-eE%nNaIfty \n/*#") for _ in range(rng.randrange(400)))
    return base


def campaign_parser(n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    worst, worst_len, errors, out_of_range, fallback = 0.0, 0, 0, 0, 0
    for _ in range(n):
        text = damaged_output(rng)
        t0 = time.perf_counter()
        try:
            p = parse_profile(text)
        except Exception:  # the contract: never raises
            errors += 1
            continue
        dt = time.perf_counter() - t0
        if dt > worst:
            worst, worst_len = dt, len(text)
        v = p.to_vector()
        if not (np.isfinite(v).all() and (v >= 0).all() and (v <= 1).all() and set(p.focus) == set(FOCUS_KEYS)):
            out_of_range += 1
        fallback += p.is_fallback
    return {
        "tried": n,
        "survived": n - errors - out_of_range,
        "lost": errors + out_of_range,
        "fallback": fallback,
        "worst_ms": 1000 * worst,
        "worst_len": worst_len,
    }


def _write_images(folder: Path, n: int, size: int = 160) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        img = np.full((size, size), 180.0)
        for _ in range(3):
            a, b = rng.uniform(-1, 1), rng.uniform(0, size)
            img -= rng.uniform(20, 90) * np.exp(-((yy - a * xx - b) ** 2) / (1 + a * a) / rng.uniform(1, 8))
        img += rng.normal(0, rng.uniform(1, 20), img.shape)
        p = folder / f"{i:03d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _snapshot(cache: Path) -> dict[str, str]:
    store = ProfileStore(cache, read_only=True)
    return {k: p.to_json() for k, p in store.items()}


def _run_precompute(paths, cache) -> None:
    precompute(paths, ProfileStore(cache), HeuristicProfiler(), batch_size=4, progress=False)


def campaign_crash(paths: list[str], kills: int, tmp: Path, seed: int = 0) -> dict:
    rng = random.Random(seed)
    ref_cache = tmp / "ref"
    t0 = time.perf_counter()
    _run_precompute(paths, ref_cache)
    full = time.perf_counter() - t0
    ref = _snapshot(ref_cache)
    ctx = mp.get_context("fork")
    res = {"tried": 0, "survived": 0, "lost": 0, "killed_mid_run": 0, "tmp_left_by_kill": 0, "invalid": 0}
    rounds = (kills + 1) // 2
    for r in range(rounds):
        cache = tmp / f"crash{r}"
        for _ in range(2):  # two kills on the same cache before the resume
            p = ctx.Process(target=_run_precompute, args=(paths, cache))
            p.start()
            time.sleep(rng.uniform(0.02, 0.9) * full)
            alive = p.is_alive()
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:  # finished before the kill
                pass
            p.join()
            res["tried"] += 1
            res["killed_mid_run"] += alive
            store = ProfileStore(cache, read_only=True)
            v = store.verify()
            res["tmp_left_by_kill"] += len(v["tmp"])
            res["invalid"] += len(v["corrupt"])
            # every entry present after a kill is valid and equal to the reference
            res["invalid"] += sum(1 for k, prof in store.items() if ref.get(k) != prof.to_json())
        removed = ProfileStore(cache).cleanup_tmp()
        _run_precompute(paths, cache)  # resume
        ok = _snapshot(cache) == ref and ProfileStore(cache).verify()["tmp"] == [] and removed >= 0
        res["survived" if ok else "lost"] += 2
    res["lost"] += res["invalid"]
    return res


def _loader_proc(paths: list[str], cache: str, order_seed: int, q) -> None:
    import torch
    from monai.data import DataLoader, Dataset

    from monai_vlmfilm.transforms import AttachVLMProfiled

    try:
        order = list(paths)
        random.Random(order_seed).shuffle(order)
        ds = Dataset([{"image": p, "path": p} for p in order], AttachVLMProfiled("image", cache, profiler="heuristic"))
        got = {}
        for b in DataLoader(ds, batch_size=4, num_workers=2):
            for p, v in zip(b["path"], b["vlm_profile"]):
                got[p] = v.tolist()
        q.put(("ok", got, torch.__version__))
    except Exception as e:
        q.put(("error", repr(e), ""))


def campaign_concurrency(paths: list[str], rounds: int, tmp: Path, procs: int = 4) -> dict:
    ref = {
        p: prof.to_vector().tolist()
        for p, prof in zip(paths, HeuristicProfiler().profile([np.asarray(Image.open(p), np.float32) for p in paths]))
    }
    ctx = mp.get_context("fork")
    res = {"tried": 0, "survived": 0, "lost": 0, "corrupt": 0, "wrong_vectors": 0}
    for r in range(rounds):
        cache = str(tmp / f"conc{r}")
        q = ctx.Queue()
        ps = [ctx.Process(target=_loader_proc, args=(paths, cache, 100 * r + i, q)) for i in range(procs)]
        for p in ps:
            p.start()
        outs = [q.get(timeout=600) for _ in ps]
        for p in ps:
            p.join()
        v = ProfileStore(cache).verify()
        res["corrupt"] += len(v["corrupt"])
        for status, got, _ in outs:
            res["tried"] += len(paths)
            if status != "ok":
                res["lost"] += len(paths)
                continue
            wrong = sum(1 for p in paths if p not in got or not np.allclose(got[p], ref[p], atol=1e-6))
            res["wrong_vectors"] += wrong
            res["lost"] += wrong
            res["survived"] += len(paths) - wrong
        res["lost"] += max(0, len(paths) - v["valid"]) + len(v["corrupt"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fuzz", type=int, default=100_000)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--concurrency-rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=48)
    args = ap.parse_args()
    rows = []
    t0 = time.perf_counter()
    r = campaign_parser(args.fuzz)
    rows.append(
        (
            "parser fuzzing",
            r,
            f"fallback {r['fallback']}, worst {r['worst_ms']:.1f} ms (input of {r['worst_len']} chars)",
            time.perf_counter() - t0,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = _write_images(tmp / "imgs", args.images)
        t0 = time.perf_counter()
        r = campaign_crash(paths, args.kills, tmp)
        rows.append(
            (
                "SIGKILL during precompute + resume",
                r,
                f"{r['killed_mid_run']} kills mid-run, {r['tmp_left_by_kill']} temp files left by kills "
                f"(removed on resume), {r['invalid']} invalid entries after kills",
                time.perf_counter() - t0,
            )
        )
        t0 = time.perf_counter()
        r = campaign_concurrency(paths, args.concurrency_rounds, tmp)
        rows.append(
            (
                f"4 processes x 2 DataLoader workers, one store ({args.concurrency_rounds} rounds)",
                r,
                f"{r['corrupt']} corrupt entries, {r['wrong_vectors']} wrong vectors",
                time.perf_counter() - t0,
            )
        )
    print("| campaign | tried | survived | lost | notes | seconds |")
    print("|---|---:|---:|---:|---|---:|")
    for name, r, note, sec in rows:
        print(f"| {name} | {r['tried']} | {r['survived']} | {r['lost']} | {note} | {sec:.0f} |")
    print(
        "\nrerun: `python benchmarks/reliability_profiles.py "
        f"--fuzz {args.fuzz} --kills {args.kills} --concurrency-rounds {args.concurrency_rounds}`"
    )


if __name__ == "__main__":
    main()
