"""Profile precompute scaling: ``python -m monai_vlmfilm.profiles precompute`` in 1 process vs ``torchrun`` on N GPUs.

    python benchmarks/precompute_scaling.py run --work /tmp/scaling --batch 64 --out OUT  # 2 GPUs, about 3 min
    python benchmarks/precompute_scaling.py run --smoke --out OUT                         # tiny model, CPU is fine

Start-up is reported on its own: each precompute process prints a ``start-up`` line (epoch times of its main, of
the end of the background model load and of the first batch written), which ``report`` turns into seconds after
the command started, per rank, beside the wall clock ratio (issue 17's target: >= 1.8 on 2 GPUs).

``run`` is the whole measurement: ``prepare``, then the 1-process and the ``--nproc``-process precompute of the same
images into fresh caches (each command's wall clock recorded), then ``report``. The parts alone:

    python benchmarks/precompute_scaling.py prepare --model-dir M --arch 3b --images D --n 2048 --size 512
    python benchmarks/precompute_scaling.py report --images D --cache1 C1 --cache2 C2 --batch 32 --nproc 2 \\
        --log1 run1.log --log2 run2.log --wall1 S --wall2 S --out OUT

``prepare`` builds the random-weight Qwen2.5-VL checkpoint (``tests/tiny_qwen.build_qwen``: the exact
Qwen2.5-VL-3B-Instruct architecture with ``--arch 3b``, the tests' tiny one with ``--arch tiny``) into a
temporary sibling folder and renames it into place, so a killed build never leaves a folder that looks
complete; an existing complete folder is reused. Then it writes ``--n`` distinct angiogram-like PNGs.

``report`` measures throughput from the cache entries themselves: every entry records its ``created`` time,
and each rank's shard is ``paths[rank::world]`` of the sorted image list, so each entry's rank is known. A
rank's steady rate is ``(n_rank - batch) / (t_last - t_first_batch)``: images profiled after its first batch
was written, over the time since, which leaves out interpreter start, model load and the first (warm-up)
batch. The 2-GPU figure is the sum of the ranks' steady rates (their windows are reported, to show they
overlap); the figures the CLI prints (which include model load) and wall-clock times are reported beside it.
It also checks that both caches hold exactly the same keys, one per image.
Needs numpy, pillow and this repository (torch + transformers for ``prepare``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)


# ------------------------------------------------------------------------------------------------ prepare
def model_complete(folder: Path) -> bool:
    """A checkpoint folder with its config, tokenizer and every weight shard present."""
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        return False
    if (folder / "model.safetensors").is_file():
        return True
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return False
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / s).is_file() for s in shards)


def build_model(folder: Path, arch: str) -> float | None:
    """Build the checkpoint unless a complete one is there; returns the build seconds (None: reused)."""
    if model_complete(folder):
        return None
    import torch
    from tiny_qwen import QWEN2_5_VL_3B_ARCH, TINY_ARCH, build_qwen

    cuda = torch.cuda.is_available()
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    with torch.device("cuda" if cuda else "cpu"):  # random init on the GPU: seconds, not minutes
        build_qwen(
            tmp,
            QWEN2_5_VL_3B_ARCH if arch == "3b" else TINY_ARCH,
            seed=0,
            # the real model's processor defaults (as gpu_profiler_throughput.py builds it): its stock recipe
            # runs at the default resolution; the profiler sets its own min/max pixels
            min_pixels=56 * 56,
            max_pixels=28 * 28 * 16384,
            dtype="bfloat16" if cuda and arch == "3b" else "float32",
        )
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return time.perf_counter() - t0


def angiogram_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """One angiogram-like test image (smooth background, dark curved vessels, noise): float32 in [0, 255]."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    img = 150 + 40 * np.sin(6 * xx + rng.random() * 6) * np.cos(4 * yy + rng.random() * 6)
    for _ in range(6):
        a, b, c = rng.random(3)
        dist = np.abs(yy - (a + 0.3 * np.sin(8 * b * xx + 6 * c)))
        img -= 70 * np.exp(-((dist / (0.004 + 0.01 * c)) ** 2))
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.float32)


def _angiogram(job: tuple[int, int, str]) -> str:
    """Write one distinct angiogram-like 8-bit PNG."""
    from PIL import Image

    index, size, path = job
    img = angiogram_like(np.random.default_rng([7, index]), size)
    Image.fromarray(img.astype(np.uint8)).save(path, compress_level=1)
    return path


def write_images(folder: Path, n: int, size: int, workers: int) -> list[str]:
    """``n`` PNGs ``img_<i>.png`` in ``folder``; files of an earlier run with the same size are kept."""
    stamp = folder / ".images.json"
    if folder.exists() and (not stamp.is_file() or json.loads(stamp.read_text()).get("size") != size):
        shutil.rmtree(folder)  # another size (or unknown origin): start over
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"size": size}))
    jobs = [(i, size, str(folder / f"img_{i:06d}.png")) for i in range(n)]
    todo = [j for j in jobs if not os.path.isfile(j[2])]
    if todo:
        if workers > 1 and len(todo) > 1:
            with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
                pool.map(_angiogram, todo, chunksize=max(1, len(todo) // (4 * workers)))
        else:
            for j in todo:
                _angiogram(j)
    for extra in sorted(set(map(str, folder.glob("*.png"))) - {j[2] for j in jobs}):
        os.remove(extra)  # a previous run with more images: keep exactly n
    return [j[2] for j in jobs]


def cmd_prepare(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    secs = build_model(Path(args.model_dir), args.arch)
    print(f"model {args.model_dir}: " + ("reused" if secs is None else f"built + saved in {secs:.1f} s"), flush=True)
    t1 = time.perf_counter()
    write_images(Path(args.images), args.n, args.size, args.workers)
    print(f"{args.n} images {args.size}x{args.size} in {args.images} ({time.perf_counter() - t1:.1f} s)", flush=True)
    doc = {"model_build_s": None if secs is None else round(secs, 1), "prepare_s": round(time.perf_counter() - t0, 1)}
    Path(args.images, ".prepare.json").write_text(json.dumps(doc))
    return 0


# ------------------------------------------------------------------------------------------------ report
def read_entries(cache: Path) -> dict[str, dict[str, Any]]:
    """``{key: entry document}`` of every entry file of a ProfileStore folder."""
    out = {}
    for f in sorted((cache / "v1").glob("*/*.json")):
        if re.fullmatch(r"[0-9a-f]{64}\.json", f.name):
            out[f.stem] = json.loads(f.read_text())
    return out


def rank_of_digest(paths: list[str], world: int, memo_caches: list[Path]) -> dict[str, int]:
    """pixel digest -> rank whose shard holds the image (``paths[rank::world]`` of the sorted list).

    Digests come from the caches' path memos where they hold the path (the one-process run's memo is
    complete), else from hashing the file.
    """
    from monai_vlmfilm.profiles.base import pixel_digest

    memo: dict[str, str] = {}
    for cache in memo_caches:
        try:
            entries = json.loads((cache / "v1" / "path_memo.json").read_text()).get("entries", {})
        except (OSError, ValueError):
            continue
        for p, v in entries.items():
            if isinstance(v, list) and len(v) == 4:
                memo.setdefault(p, v[3])
    return {memo.get(os.path.abspath(p)) or pixel_digest(p): i % world for i, p in enumerate(paths)}


def steady(times: list[float], batch: int) -> dict[str, Any]:
    """Rate after the first batch: ``(n - batch) / (t_last - t_first_batch)``."""
    t = sorted(times)
    n = len(t)
    first = t[min(batch, n) - 1]
    span = t[-1] - first
    rate = (n - min(batch, n)) / span if span > 0 else float("nan")
    return {"images": n, "t_first_batch": first, "t_last": t[-1], "steady_s": round(span, 2), "steady_rate": rate}


def cli_summaries(log: str) -> list[dict[str, float]]:
    """The CLI's own ``summary`` lines: seconds and images/s of each rank (model load included)."""
    pat = re.compile(r"summary: total (\d+), cached (\d+), new (\d+), fallback (\d+).*?([\d.]+) s, ([\d.]+) images/s")
    out = []
    for m in pat.finditer(Path(log).read_text(errors="replace") if os.path.isfile(log) else ""):
        out.append({"total": int(m[1]), "new": int(m[3]), "fallback": int(m[4]), "s": float(m[5]), "rate": float(m[6])})
    return out


def cli_startups(log: str, start_ns: int | None) -> list[dict[str, float]]:
    """The CLI's ``start-up`` lines (one per rank), as seconds after the command started (``start_ns``, epoch ns).

    ``to_main_s``: interpreter, imports (and torchrun's own start) up to the CLI's main; ``load_s``: the model load
    on its background thread (overlapping the image reads); ``model_ready_s``: when it ended; ``first_batch_s``: when
    the first batch's profiles were written.
    """
    pat = re.compile(
        r"start-up: main at ([\d.]+), model load (?:([\d.]+) s in the background|in the first batch) "
        r"\(ended at ([\d.]+)\), first batch written at ([\d.]+)"
    )
    t0 = (start_ns or 0) / 1e9
    out = []
    for m in pat.finditer(Path(log).read_text(errors="replace") if os.path.isfile(log) else ""):
        main_at, ended, first = float(m[1]), float(m[3]), float(m[4])
        out.append(
            {
                "to_main_s": round(main_at - t0, 2) if t0 else None,
                "load_s": float(m[2]) if m[2] else None,
                "model_ready_s": round(ended - t0, 2) if t0 and ended > 0 else None,
                "first_batch_s": round(first - t0, 2) if t0 else round(first - main_at, 2),
            }
        )
    return out


def profile_diff(e1: dict[str, dict], e2: dict[str, dict]) -> float:
    """Largest absolute difference of any profile field between the two caches, over common keys."""
    worst = 0.0
    for k in set(e1) & set(e2):
        p1, p2 = e1[k]["profile"], e2[k]["profile"]
        a = [p1["difficulty"], p1["confidence"], *[p1["focus"][f] for f in sorted(p1["focus"])]]
        b = [p2["difficulty"], p2["confidence"], *[p2["focus"][f] for f in sorted(p2["focus"])]]
        worst = max(worst, float(np.max(np.abs(np.subtract(a, b)))))
    return worst


def cmd_report(args: argparse.Namespace) -> int:
    import torch

    paths = sorted(str(p) for p in Path(args.images).glob("*.png"))
    n = len(paths)
    e1, e2 = read_entries(Path(args.cache1)), read_entries(Path(args.cache2))
    ranks = rank_of_digest(paths, args.nproc, [Path(args.cache1), Path(args.cache2)])
    one = steady([e["created"] for e in e1.values()], args.batch) if e1 else {}
    per_rank = []
    for r in range(args.nproc):
        times = [e["created"] for e in e2.values() if ranks.get(e["pixel_digest"]) == r]
        if times:
            per_rank.append({"rank": r, **steady(times, args.batch)})
    two_rate = sum(r["steady_rate"] for r in per_rank) if len(per_rank) == args.nproc else float("nan")
    start = max((r["t_first_batch"] for r in per_rank), default=0.0)
    end = min((r["t_last"] for r in per_rank), default=0.0)
    window = [e["created"] for e in e2.values() if start < e["created"] <= end]
    overlap_rate = len(window) / (end - start) if end > start else float("nan")
    s1, s2 = cli_summaries(args.log1), cli_summaries(args.log2)
    u1, u2 = cli_startups(args.log1, args.start1_ns), cli_startups(args.log2, args.start2_ns)
    prep = Path(args.images, ".prepare.json")
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "images": n,
        "image_size": args.size,
        "batch": args.batch,
        "nproc": args.nproc,
        "model": args.model_desc,
        "prepare": json.loads(prep.read_text()) if prep.is_file() else None,
        "one": {
            "wall_s": round(args.wall1, 2) if args.wall1 else args.wall1,
            "cli": s1,
            "startup": u1,
            **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in one.items() if not k.startswith("t_")},
        },
        "multi": {
            "wall_s": round(args.wall2, 2) if args.wall2 else args.wall2,
            "cli": s2,
            "startup": u2,
            "ranks": [
                {k: (round(v, 2) if isinstance(v, float) and not k.startswith("t_") else v) for k, v in r.items()}
                for r in per_rank
            ],
            "steady_rate_sum": round(two_rate, 2),
            "steady_rate_overlap_window": round(overlap_rate, 2),
            "overlap_window_s": round(end - start, 2),
            "rank_start_spread_s": round(
                max(r["t_first_batch"] for r in per_rank) - min(r["t_first_batch"] for r in per_rank), 2
            )
            if per_rank
            else None,
        },
    }
    # start-up: command start -> first batch in the cache (interpreter, imports, model load, first batch)
    if args.start1_ns and one:
        res["one"]["startup_s"] = round(one["t_first_batch"] - args.start1_ns / 1e9, 2)
    if args.start2_ns and per_rank:
        for r, pr in zip(res["multi"]["ranks"], per_rank):
            r["startup_s"] = round(pr["t_first_batch"] - args.start2_ns / 1e9, 2)
    r1 = one.get("steady_rate", float("nan"))
    res["ratio_steady"] = round(two_rate / r1, 3) if r1 and r1 == r1 else None
    if s1 and len(s2) == args.nproc:  # CLI figures: the whole shard, model load included
        res["ratio_cli_incl_load"] = round((n / max(s["s"] for s in s2)) / (n / s1[0]["s"]), 3)
    if args.wall1 and args.wall2:
        res["ratio_wall"] = round(args.wall1 / args.wall2, 3)
    k1, k2 = set(e1), set(e2)
    res["keys"] = {
        "cache1": len(k1),
        "cache2": len(k2),
        "identical": k1 == k2,
        "one_per_image": len(k1) == n,
        "only_in_1": len(k1 - k2),
        "only_in_2": len(k2 - k1),
    }
    res["profile_max_abs_diff"] = round(profile_diff(e1, e2), 5)
    res["fallbacks"] = [sum(s["fallback"] for s in s1), sum(s["fallback"] for s in s2)]
    res["meets_1_8x"] = bool(res["ratio_steady"] is not None and res["ratio_steady"] >= 1.8)
    res["meets_wall_1_8x"] = bool(res.get("ratio_wall") is not None and res["ratio_wall"] >= 1.8)  # issue 17 item 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_precompute_scaling.json").write_text(json.dumps(res, indent=2))
    text = markdown(res, args.command)
    (out / "gpu_precompute_scaling.md").write_text(text)
    print(text, flush=True)
    return 0 if res["keys"]["identical"] and res["keys"]["one_per_image"] else 1


def markdown(res: dict[str, Any], command: str) -> str:
    one, multi = res["one"], res["multi"]
    cli1 = one["cli"][0] if one["cli"] else {}
    L = [
        f"## Profile precompute scaling: 1 vs {res['nproc']} GPUs ({res['model']})",
        "",
        f"Device: {res['device']} x {res['gpus']}; {res['date']}; {res['images']} images "
        f"{res['image_size']}x{res['image_size']}, scored mode, batch {res['batch']}; prepare {res['prepare']}",
        f"Command: `{command}`",
        "",
        "| run | wall s (whole command) | start-up s (to 1st batch written) | CLI s / images/s (model load incl.) "
        "| steady images/s (after 1st batch) |",
        "|---|---:|---:|---:|---:|",
        f"| 1 GPU | {one['wall_s']} | {one.get('startup_s')} | {cli1.get('s')} / {cli1.get('rate')} | "
        f"{one.get('steady_rate')} |",
        f"| torchrun {res['nproc']} GPUs | {multi['wall_s']} | "
        + ", ".join(str(r.get("startup_s")) for r in multi["ranks"])
        + " | "
        + ", ".join(f"{s['s']} / {s['rate']}" for s in multi["cli"])
        + f" | {multi['steady_rate_sum']} (sum of ranks; "
        + (
            f"{multi['steady_rate_overlap_window']} in their common {multi['overlap_window_s']} s window) |"
            if multi["overlap_window_s"] > 0
            else "their steady windows do not overlap) |"
        ),
        "",
        f"- ratio {res['nproc']} GPUs / 1 GPU: steady {res.get('ratio_steady')} (target >= 1.8: "
        f"{'yes' if res['meets_1_8x'] else 'NO'}); CLI figures incl. model load {res.get('ratio_cli_incl_load')}; "
        f"wall clock {res.get('ratio_wall')}",
        "- ranks: "
        + "; ".join(
            f"rank {r['rank']} {r['images']} images, {r['steady_rate']} images/s over {r['steady_s']} s"
            for r in multi["ranks"]
        )
        + f"; first batches {multi['rank_start_spread_s']} s apart",
        f"- caches: {res['keys']}; largest profile difference between them {res['profile_max_abs_diff']}; "
        f"fallbacks {res['fallbacks']}",
        f"- wall clock ratio {res.get('ratio_wall')} (issue 17 target >= 1.8: "
        f"{'yes' if res.get('meets_wall_1_8x') else 'NO'})",
        "",
        "Start-up, seconds after the command started (from the CLI's `start-up` line; the model loads on a background "
        "thread while the images are listed, read and hashed):",
        "",
        "| run | rank | to CLI main (interpreter, imports, torchrun) | model load s (background) | model ready at "
        "| first batch written at |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, part in (("1 GPU", one), (f"torchrun {res['nproc']} GPUs", multi)):
        for i, u in enumerate(part.get("startup") or []):
            L.append(
                f"| {name} | {i} | {u['to_main_s']} | {u['load_s']} | {u['model_ready_s']} | {u['first_batch_s']} |"
            )
    return "\n".join(L) + "\n"


def cmd_run(args: argparse.Namespace) -> int:
    """prepare -> 1-process precompute -> N-process precompute (torchrun) -> report (see the module docstring)."""
    import subprocess

    smoke = args.smoke
    work = Path(args.work or ("/tmp/vlmfilm_scaling_smoke" if smoke else "/tmp/vlmfilm_scaling")).resolve()
    arch, n, size = ("tiny", args.n or 24, args.size or 64) if smoke else ("3b", args.n or 2048, args.size or 512)
    batch = args.batch or (4 if smoke else 32)
    model = Path(args.model_dir).resolve() if args.model_dir else work / ("tiny_qwen" if smoke else "qwen3b")
    env = dict(os.environ)
    if smoke:
        env["OMP_NUM_THREADS"] = "1"  # as torchrun sets it for its workers: the CPU comparison stays like for like
    images = work / "images"
    cmd_prepare(argparse.Namespace(model_dir=str(model), arch=arch, images=str(images), n=n, size=size,
                                   workers=min(16, os.cpu_count() or 1)))  # fmt: skip
    common = ["precompute", "--images", str(images), "--profiler", "qwen", "--model", str(model), "--mode", "scored",
              "--batch-size", str(batch), "--no-progress", *shlex.split(args.extra)]  # fmt: skip
    walls, starts, logs = [], [], []
    runs = (
        ("1 process", [sys.executable, "-m", "monai_vlmfilm.profiles"]),
        (f"{args.nproc} processes", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     f"--nproc_per_node={args.nproc}", "-m", "monai_vlmfilm.profiles"]),
    )  # fmt: skip
    for i, (what, head) in enumerate(runs, start=1):
        cache, log = work / f"c{i}", work / f"run{i}.log"
        shutil.rmtree(cache, ignore_errors=True)
        print(f"== {what}: {' '.join(head + common)} --cache-dir {cache}", flush=True)
        starts.append(time.time_ns())
        proc = subprocess.run([*head, *common, "--cache-dir", str(cache)], env=env, capture_output=True, text=True)
        walls.append((time.time_ns() - starts[-1]) / 1e9)
        log.write_text(proc.stdout + proc.stderr)
        logs.append(str(log))
        print(proc.stdout[-2000:] + proc.stderr[-2000:], flush=True)
        if proc.returncode:
            return proc.returncode
    desc = "tiny Qwen2.5-VL (smoke)" if smoke else "Qwen2.5-VL-3B architecture, random weights"
    return cmd_report(argparse.Namespace(
        images=str(images), size=size, cache1=str(work / "c1"), cache2=str(work / "c2"), log1=logs[0], log2=logs[1],
        wall1=walls[0], wall2=walls[1], start1_ns=starts[0], start2_ns=starts[1], batch=batch, nproc=args.nproc,
        model_desc=desc, command=f"precompute_scaling.py run{' --smoke' if smoke else ''} (N={n}, size {size}, "
        f"batch {batch}{', ' + args.extra if args.extra else ''})", out=args.out,
    ))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pre = sub.add_parser("prepare")
    pre.add_argument("--model-dir", required=True)
    pre.add_argument("--arch", choices=("3b", "tiny"), default="3b")
    pre.add_argument("--images", required=True)
    pre.add_argument("--n", type=int, default=2048)
    pre.add_argument("--size", type=int, default=512)
    pre.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    run = sub.add_parser("run")
    run.add_argument("--smoke", action="store_true", help="tiny model, 24 images of 64 px (CPU is fine)")
    run.add_argument("--work", default=None, help="images, caches and logs (default /tmp/vlmfilm_scaling[_smoke])")
    run.add_argument("--model-dir", default=None, help="checkpoint folder, built once (default <work>/qwen3b)")
    run.add_argument("--n", type=int, default=None, help="images (default 2048; smoke 24)")
    run.add_argument("--size", type=int, default=None, help="image side (default 512; smoke 64)")
    run.add_argument("--batch", type=int, default=None, help="precompute batch size (default 32; smoke 4)")
    run.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of the torchrun run")
    run.add_argument("--extra", default="", help="more precompute arguments in one string, e.g. '--no-fsync'")
    run.add_argument("--out", default=os.environ.get("OUT", "./out"))
    rep = sub.add_parser("report")
    rep.add_argument("--images", required=True)
    rep.add_argument("--size", type=int, default=512)
    rep.add_argument("--cache1", required=True)
    rep.add_argument("--cache2", required=True)
    rep.add_argument("--log1", default="")
    rep.add_argument("--log2", default="")
    rep.add_argument("--wall1", type=float, default=None)
    rep.add_argument("--wall2", type=float, default=None)
    rep.add_argument("--start1-ns", type=int, default=None, help="epoch ns when the 1-process command started")
    rep.add_argument("--start2-ns", type=int, default=None, help="epoch ns when the torchrun command started")
    rep.add_argument("--batch", type=int, required=True)
    rep.add_argument("--nproc", type=int, default=2)
    rep.add_argument("--model-desc", default="Qwen2.5-VL-3B architecture, random weights")
    rep.add_argument("--command", default="benchmarks/precompute_scaling.py run")
    rep.add_argument("--out", default=os.environ.get("OUT", "./out"))
    args = ap.parse_args(argv)
    return {"prepare": cmd_prepare, "run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
