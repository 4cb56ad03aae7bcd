"""Command line: ``python -m monai_vlmfilm.profiles {precompute,stats,calibrate}``.

precompute
    Profiles every image of a datalist (all sections; paths relative to the datalist's folder unless
    absolute) or an image folder into a :class:`ProfileStore`. Resumable (cached entries are skipped,
    so a killed run just starts again), batched, and sharded by ``RANK`` / ``WORLD_SIZE`` when started
    by ``torchrun`` or ``accelerate launch`` (one model per GPU, chosen by ``LOCAL_RANK``); all ranks
    write the same store safely. Unreadable images are listed at the end with the reason, and the exit
    code is 1, after all other images were processed. A heavy profiler's model loads on a background
    thread while the first images are read, and a reader thread reads and hashes the next ``--prefetch``
    batches while the model runs; each process prints its start-up times on a line of its own.

stats
    Per-field mean / std / min / max of the cached profiles (optionally of a datalist's images only),
    a histogram PNG, and a WARNING for every field that barely varies across images (std < 0.05).

calibrate
    Feature mean / std of the heuristic profiler on a data set, as JSON for ``--calibration`` (and for
    ``HeuristicProfiler(calibration=path)`` in configs); the default is calibrated on real DCA1 images.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from monai_vlmfilm.data.datalist import IMAGE_EXTENSIONS, read_datalist

from .base import ImageReadError, canonical_image, create_profiler
from .schema import FOCUS_KEYS, VLMProfile
from .store import ProfileStore, ProfileStoreError

__all__ = ["main", "read_image_list", "precompute", "profile_stats"]

logger = logging.getLogger("monai_vlmfilm.profiles")

FIELDS = ("difficulty", "confidence", *FOCUS_KEYS)
FLAT_STD = 0.05


def read_image_list(
    datalist: str | None = None,
    images: str | None = None,
    key: str = "image",
    sections: Sequence[str] | None = None,
) -> list[str]:
    """Image paths of a MONAI datalist (every list-valued section, or only ``sections``) or an image folder.

    Args:
        datalist: a datalist JSON, read with :func:`monai_vlmfilm.data.datalist.read_datalist`.
        images: a folder searched recursively for files ending in one of ``IMAGE_EXTENSIONS``.
        key: the item key holding the image path(s).
        sections: datalist sections to read (None: all).

    Raises:
        SystemExit: with a message for the command line when nothing usable is found.
    """
    if datalist:
        try:
            doc = read_datalist(datalist, sections=sections, path_keys=(key,))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {e}") from e
        out: list[str] = []
        for items in doc.values():
            for item in items if isinstance(items, list) else []:
                vals = item.get(key) if isinstance(item, dict) else item
                out += [v for v in (vals if isinstance(vals, list) else [vals]) if isinstance(v, str) and v]
        if not out:
            raise SystemExit(f"error: datalist {datalist!r} has no {key!r} entries")
        return list(dict.fromkeys(out))
    if images:
        root = Path(images)
        if not root.is_dir():
            raise SystemExit(f"error: image folder {images!r} does not exist")
        files = [
            str(p)
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_EXTENSIONS)
        ]
        if not files:
            raise SystemExit(f"error: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {images!r}")
        return files
    raise SystemExit("error: give --datalist or --images")


def _dist() -> tuple[int, int, int]:
    env = os.environ
    rank = int(env.get("RANK", env.get("ACCELERATE_PROCESS_INDEX", 0)) or 0)
    world = int(env.get("WORLD_SIZE", env.get("ACCELERATE_NUM_PROCESSES", 1)) or 1)
    local = int(env.get("LOCAL_RANK", env.get("ACCELERATE_LOCAL_PROCESS_INDEX", 0)) or 0)
    if not 0 <= rank < world:
        raise SystemExit(f"error: RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, local


def build_profiler(args: argparse.Namespace, local_rank: int = 0) -> Any:
    """The profiler the command line asks for: its options as keyword arguments of :func:`create_profiler`.

    Args:
        args: parsed ``--profiler`` and its options (``--datalist`` for the oracle, ``--model``, ``--mode``,
            ``--prompt-template``, ``--device`` ... for Qwen, ``--calibration`` for the heuristic).
        local_rank: this process's GPU under ``torchrun`` (one model per GPU).
    """
    name = args.profiler.lower()
    kw: dict[str, Any] = {}
    if name == "oracle":
        if not args.datalist:
            raise SystemExit("error: --profiler oracle needs --datalist (items with ground-truth 'factors')")
        kw["datalist"] = args.datalist
    elif name in ("qwen", "qwen2_5_vl"):
        kw = {"mode": args.mode, "batch_size": args.batch_size}
        if args.model:
            kw["model"] = args.model
        if args.prompt_template:
            try:  # a template is only ever text: read it, never import or evaluate it
                kw["prompt_template"] = Path(args.prompt_template).read_text(encoding="utf-8")
            except OSError as e:
                raise SystemExit(f"error: cannot read prompt template {args.prompt_template!r}: {e}") from e
        device = args.device
        if device is None and args.device_map is None:
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
        kw.update({k: v for k, v in (("device", device), ("dtype", args.dtype), ("device_map", args.device_map)) if v})
        if getattr(args, "prompt_position", None):
            kw["prompt_position"] = args.prompt_position
        if getattr(args, "compile", None):
            kw["compile"] = args.compile
        if getattr(args, "no_fast_forward", False):
            kw["fast_forward"] = False
        if getattr(args, "prefix_cache", False):
            kw["prefix_cache"] = True
    elif name == "heuristic" and getattr(args, "calibration", None):
        kw["calibration"] = args.calibration
    return create_profiler({"name": args.profiler, **kw})


def start_loading(profiler: Any) -> threading.Thread | None:
    """Load a heavy profiler's model on a background thread (returns it), so that reading images overlaps it.

    The profiler's own ``load`` is idempotent and locked: its first ``profile`` call waits for this load, or, if this
    load failed, loads again in the calling thread and raises the error there.
    """
    if not (getattr(profiler, "heavy", False) and callable(getattr(profiler, "load", None))):
        return None
    if getattr(profiler, "is_loaded", False):
        return None

    def _load() -> None:
        t0 = time.perf_counter()
        try:
            profiler.load()
        except Exception as e:  # reported again by the main thread's own load
            logger.debug("background model load failed: %s", e)
        profiler.load_seconds = time.perf_counter() - t0
        profiler.loaded_at = time.time()

    device = getattr(profiler, "device", None)
    if getattr(device, "type", None) == "cuda" and getattr(profiler, "device_map", None) is None:
        # the CUDA context starts on its own thread while the load thread imports transformers
        import torch

        threading.Thread(target=lambda: torch.zeros(1, device=device), name="cuda-init", daemon=True).start()
    thread = threading.Thread(target=_load, name="profiler-load", daemon=True)
    thread.start()
    return thread


def precompute(
    paths: Sequence[str],
    store: ProfileStore,
    profiler: Any,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "",
    prefetch: int = 4,
    timing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Profile ``paths`` into ``store``, one batch of paths at a time; reading overlaps the model.

    A reader thread reads, hashes and looks up the next ``prefetch`` batches (:meth:`ProfileStore.partition`) while
    the profiler computes the current one, and a heavy profiler that is not loaded yet is loaded on another thread
    meanwhile (:func:`start_loading`), so the first images are read during the model load.

    Args:
        paths: image files.
        store: the cache.
        profiler: computes the misses.
        batch_size: images per profiler call.
        progress: show a tqdm bar.
        desc: the bar's label.
        prefetch: batches read ahead (0: read each batch just before computing it, and load the model on first use).
        timing: filled with epoch times (``first_batch_at``: the first batch's profiles written) when given.

    Returns:
        counts (``total``, ``cached``: already in the cache or a duplicate, ``new``, ``fallback``), ``seconds`` and
        ``unreadable``: ``[(path, reason), ...]``.
    """
    from tqdm.auto import tqdm

    counts = {"total": len(paths), "cached": 0, "new": 0, "fallback": 0}
    unreadable: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    fp = profiler.fingerprint
    timing = {} if timing is None else timing
    if prefetch > 0 and "load_started_at" not in timing and start_loading(profiler) is not None:
        timing["load_started_at"] = time.time()

    def read(chunk: Sequence[str]) -> tuple[list, dict, dict, list]:
        bad: list[tuple[str, str]] = []
        return (*store.partition(chunk, fp, unreadable=bad), bad)

    chunks = [paths[s : s + batch_size] for s in range(0, len(paths), batch_size)]
    done: set[str] = set()  # keys computed by this run (the same pixels under another path later: not again)
    with (
        tqdm(total=len(paths), unit="img", desc=desc or "precompute", disable=not progress, dynamic_ncols=True) as bar,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="precompute-read") as pool,
    ):
        pending = [pool.submit(read, c) for c in chunks[:prefetch]]
        for i, chunk in enumerate(chunks):
            if prefetch > 0:
                profs, misses, wanted, bad = pending.pop(0).result()
                if i + prefetch < len(chunks):
                    pending.append(pool.submit(read, chunks[i + prefetch]))
            else:
                profs, misses, wanted, bad = read(chunk)
            unreadable += bad
            for key in [k for k in misses if k in done]:
                prof = store.get_by_key(key, fp)
                if prof is not None:
                    for j in wanted.pop(key):
                        profs[j] = prof
                    del misses[key]
            writes = store.stats.writes
            store.fill_misses(profs, misses, wanted, profiler, batch_size)
            done.update(misses)
            new = store.stats.writes - writes
            counts["new"] += new
            counts["cached"] += len(chunk) - len(bad) - new
            counts["fallback"] += sum(1 for p in profs if p is not None and p.is_fallback)
            timing.setdefault("first_batch_at", time.time())
            bar.update(len(chunk))
    counts["seconds"] = time.perf_counter() - t0
    counts["unreadable"] = unreadable
    try:
        store.save_path_memo()
    except OSError as e:
        logger.warning("could not save the path memo: %s", e)
    return counts


def _cmd_precompute(args: argparse.Namespace) -> int:
    timing: dict[str, Any] = {"main_at": time.time()}
    rank, world, local = _dist()
    profiler = build_profiler(args, local)
    if args.prefetch > 0 and start_loading(profiler) is not None:  # the model loads while the images are listed
        timing["load_started_at"] = time.time()
    paths = read_image_list(args.datalist, args.images, args.key)
    shard = paths[rank::world]
    store = ProfileStore(args.cache_dir, fsync=not args.no_fsync)
    removed = store.cleanup_tmp()
    if removed:
        logger.warning("removed %d temporary file(s) left by interrupted writers in %s", removed, store.root)
    tag = f"rank {rank}/{world}: " if world > 1 else ""
    print(f"{tag}{len(shard)} of {len(paths)} images, profiler {profiler!r}, cache {store.cache_dir}", flush=True)
    try:
        res = precompute(
            shard,
            store,
            profiler,
            args.batch_size,
            progress=not args.no_progress,
            desc=f"{tag}profiles",
            prefetch=args.prefetch,
            timing=timing,
        )
    except ProfileStoreError as e:
        # disk full, read-only or unwritable cache: one line that says so; entries are written atomically, so the
        # cache holds only complete entries and a rerun skips them
        print(f"{tag}precompute stopped: {e.strerror or e}", file=sys.stderr, flush=True)
        return 1
    rate = (res["new"] + res["cached"]) / max(res["seconds"], 1e-9)
    print(
        f"{tag}summary: total {res['total']}, cached {res['cached']}, new {res['new']}, "
        f"fallback {res['fallback']}, unreadable {len(res['unreadable'])}, "
        f"{res['seconds']:.1f} s, {rate:.1f} images/s",
        flush=True,
    )
    if "first_batch_at" in timing:  # start-up, separately: epoch times, so a caller can add its own start time
        load = getattr(profiler, "load_seconds", None)
        print(
            f"{tag}start-up: main at {timing['main_at']:.3f}, model load "
            + (f"{load:.2f} s in the background" if load is not None else "in the first batch")
            + f" (ended at {getattr(profiler, 'loaded_at', 0.0):.3f}), first batch written at "
            f"{timing['first_batch_at']:.3f} ({timing['first_batch_at'] - timing['main_at']:.2f} s after main)",
            flush=True,
        )
    if store.stats.corrupt:
        print(f"{tag}recomputed {store.stats.corrupt} corrupt cache entries", flush=True)
    if res["unreadable"]:
        print(f"{tag}{len(res['unreadable'])} unreadable image(s):", file=sys.stderr)
        for p, why in res["unreadable"]:
            print(f"  {p}: {why}", file=sys.stderr)
        return 1
    return 0


def profile_stats(profiles: Sequence[VLMProfile]) -> dict[str, dict[str, float]]:
    """Per-field mean / std / min / max (difficulty on its [1, 5] scale) and the fallback rate."""
    if not profiles:
        return {}
    vals = {
        "difficulty": [p.difficulty for p in profiles],
        "confidence": [p.confidence for p in profiles],
        **{k: [p.focus[k] for p in profiles] for k in FOCUS_KEYS},
    }
    out = {
        f: {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)), "max": float(np.max(v))}
        for f, v in vals.items()
    }
    out["fallback"] = {"rate": float(np.mean([p.is_fallback for p in profiles]))}
    return out


def _cmd_stats(args: argparse.Namespace) -> int:
    store = ProfileStore(args.cache_dir, read_only=True)
    fp = args.fingerprint
    if fp is None and args.profiler:
        fp = build_profiler(args).fingerprint
    profiles: list[VLMProfile] = []
    if args.datalist or args.images:
        if fp is None:
            raise SystemExit("error: selecting images needs --profiler or --fingerprint (part of every key)")
        paths = read_image_list(args.datalist, args.images, args.key, args.section)
        missing = 0
        for p in paths:
            try:
                prof = store.lookup(p, fp).profile
            except (ImageReadError, OSError):
                prof = None
            if prof is None:
                missing += 1
            else:
                profiles.append(prof)
        if missing:
            print(f"WARNING: {missing} of {len(paths)} images have no cached profile for this fingerprint")
    else:
        fps = store.fingerprints()
        if fp is None and len(fps) > 1:
            fp = max(fps, key=lambda k: fps[k])
            print(f"note: {len(fps)} profiler fingerprints in the cache; showing the largest ({fps[fp]} entries):")
            print(f"  {fp}\n  (choose with --fingerprint or --profiler)")
        profiles = [p for _, p in store.items(fp)]
    if not profiles:
        print(f"no cached profiles found in {store.cache_dir}", file=sys.stderr)
        return 1
    st = profile_stats(profiles)
    print(f"{len(profiles)} profiles, fallback rate {st['fallback']['rate']:.3f}")
    print(f"{'field':<16}{'mean':>8}{'std':>8}{'min':>8}{'max':>8}")
    flat = []
    for f in FIELDS:
        s = st[f]
        print(f"{f:<16}{s['mean']:>8.3f}{s['std']:>8.3f}{s['min']:>8.3f}{s['max']:>8.3f}")
        # difficulty is judged on the network's [0, 1] scale, like the other fields
        std01 = s["std"] / 4.0 if f == "difficulty" else s["std"]
        if std01 < FLAT_STD:
            flat.append((f, std01))
    for f, s in flat:
        print(
            f"WARNING: field {f!r} barely varies across images (std {s:.3f} < {FLAT_STD} on a [0, 1] scale): "
            "the profiles carry little information about the images"
        )
    if args.out:
        _histogram(profiles, args.out)
        print(f"histogram: {args.out}")
    if args.norm_out:
        from .normalization import compute_profile_norm, save_profile_norm

        norm = compute_profile_norm([p.to_vector() for p in profiles])
        save_profile_norm(
            args.norm_out, norm, source=str(args.datalist or args.images or store.cache_dir), fingerprint=fp
        )
        print(f"profile normalisation of {len(profiles)} profiles: {args.norm_out} (bundle key profile_norm)")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .heuristic import HeuristicProfiler

    paths = read_image_list(args.datalist, args.images, args.key)
    good, bad = [], []
    for p in paths:
        try:
            good.append(canonical_image(p))
        except (ImageReadError, OSError) as e:
            bad.append((p, str(e)))
    if not good:
        raise SystemExit("error: no readable images to calibrate on")
    cal = HeuristicProfiler.calibrate(good)
    HeuristicProfiler.save_calibration(args.out, cal, images=len(good))
    print(f"heuristic calibration of {len(good)} images written to {args.out}")
    for k, (m, s) in cal.items():
        print(f"  {k:<10} mean {m:>9.4f}  std {s:>8.4f}")
    for p, why in bad:
        print(f"  unreadable {p}: {why}", file=sys.stderr)
    return 1 if bad else 0


def _histogram(profiles: Sequence[VLMProfile], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vecs = np.stack([p.to_vector() for p in profiles])
    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    for i, (ax, f) in enumerate(zip(axes.ravel(), FIELDS)):
        v = vecs[:, i] * 4 + 1 if f == "difficulty" else vecs[:, i]
        rng = (1, 5) if f == "difficulty" else (0, 1)
        ax.hist(v, bins=20, range=rng, color="tab:blue", alpha=0.8)
        ax.set_title(f"{f}  (std {v.std():.3f})")
        ax.set_xlim(*rng)
    fig.suptitle(f"{len(profiles)} profiles, fallback rate {vecs[:, -1].mean():.3f}")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m monai_vlmfilm.profiles", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        src = p.add_mutually_exclusive_group()
        src.add_argument("--datalist", help="MONAI datalist JSON (all sections are used)")
        src.add_argument("--images", help="folder of images (searched recursively)")
        p.add_argument("--key", default="image", help="datalist item key of the image (default: image)")
        p.add_argument("--cache-dir", help="profile cache directory")
        p.add_argument("--model", help="Qwen2.5-VL hub id or local folder")
        p.add_argument("--mode", default="scored", choices=("scored", "generate"), help="Qwen profiling mode")
        p.add_argument("--prompt-template", help="text file with a custom prompt (generate mode)")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--device", help="torch device for the profiler (default: cuda:LOCAL_RANK when available)")
        p.add_argument("--dtype", help="model dtype, e.g. bfloat16")
        p.add_argument("--device-map", help='accelerate device map, e.g. "auto"')
        p.add_argument(
            "--prompt-position",
            choices=("after", "before"),
            help="Qwen: the prompt after the image (default) or before it (another fingerprint)",
        )
        p.add_argument("--calibration", help="heuristic calibration JSON (from the calibrate command)")
        p.add_argument("-v", "--verbose", action="store_true")

    pre = sub.add_parser("precompute", help="profile images into the cache (resumable, sharded under torchrun)")
    common(pre)
    pre.add_argument("--profiler", default="heuristic", help="heuristic | qwen | oracle | dotted class path")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.add_argument("--no-fsync", action="store_true", help="skip fsync per entry (faster, less crash-safe)")
    pre.add_argument(
        "--prefetch",
        type=int,
        default=4,
        help="batches read and hashed ahead while the model runs; > 0 also loads the model while the first images "
        "are read (default 4; 0: one after the other)",
    )
    pre.add_argument("--compile", choices=("text", "vision", "all"), help="Qwen: torch.compile these blocks")
    pre.add_argument("--no-fast-forward", action="store_true", help="Qwen scored mode: the stock model(**inputs)")
    pre.add_argument("--prefix-cache", action="store_true", help="Qwen scored mode: prefill the shared text once")

    cal = sub.add_parser("calibrate", help="measure the heuristic profiler's feature statistics on a data set")
    common(cal)
    cal.add_argument("--out", required=True, help="calibration JSON to write (use with --calibration)")

    st = sub.add_parser("stats", help="per-field distribution of cached profiles, histogram PNG, flat-field warning")
    common(st)
    st.add_argument("--profiler", help="select entries of this profiler (its fingerprint)")
    st.add_argument("--fingerprint", help="select entries with this exact fingerprint")
    st.add_argument("--out", help="histogram PNG path")
    st.add_argument(
        "--section",
        action="append",
        help="datalist section(s) to read (repeatable; default all), e.g. --section training for --norm-out",
    )
    st.add_argument(
        "--norm-out",
        help="write the per-feature mean / std of the selected profiles as JSON for the bundle key profile_norm",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.batch_size < 1:
        raise SystemExit("error: --batch-size must be >= 1")
    if args.cmd == "calibrate":
        return _cmd_calibrate(args)
    if not args.cache_dir:
        raise SystemExit("error: --cache-dir is required")
    if args.cmd == "precompute":
        return _cmd_precompute(args)
    return _cmd_stats(args)
