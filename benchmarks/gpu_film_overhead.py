"""FiLM overhead and few-step inference of the bundle's network, one GPU, bf16.

    python benchmarks/gpu_film_overhead.py                       # GPU: about 2.5 min on one H100
    python benchmarks/gpu_film_overhead.py --checkpoint model.pt # evaluate a model trained elsewhere (no training)
    python benchmarks/gpu_film_overhead.py --smoke               # tiny sizes, CPU is fine: checks the script runs

The network is "the bundle's network": ``network_def`` of ``bundle/configs/train.yaml`` instantiated with
``monai.bundle.ConfigParser`` (``use_vlm_film`` set to true / false), under one seed.

1. FiLM overhead (items 3, 5): a training step (forward + backward + AdamW step, bf16 autocast, MSE on the
   velocity) and an inference forward pass, FiLM ON vs OFF, at 320x320, batch 8. Each step is bracketed by
   CUDA events (no synchronisation between steps, so the CPU runs ahead as in training); warm-up first; then
   ``--rounds`` rounds, each timing ``--reps`` steps of OFF then ON (the order alternates between rounds, so
   clock and thermal drift cancel). Reported: median step time of each, the ratio of the medians and the
   median of the per-round ratios (target <= 1.03), and the peak GPU memory of each. When the bundle's
   ``network_def`` does not set ``use_flash_attention`` (MONAI's switch to ``scaled_dot_product_attention``
   for the UNet's mid-block self-attention, which otherwise materialises a tokens x tokens matrix per head:
   80^2 tokens at 320 px), the same is measured with it on as well (same parameters, same function).
2. Few-step inference (items 4, 5): trains the bundle's FiLM-ON network on synthetic angiograms generated in
   the script (``monai_vlmfilm.data.synthetic``, same images as ``generate_dataset`` with the same seed; oracle or
   heuristic profiles; whole 256x256 images, random flips / rot90, bf16, a time budget with warm-up + cosine
   learning rate), or loads ``--checkpoint``. Then Dice and clDice on the test set for 1, 2, 4, 8, 16, 32 steps
   of Euler and Heun (``FlowSegInferer``), plus the reference's setting emulated (30 Euler steps x 5 samples),
   and images/s + peak memory of each setting on 512x512 images (whole image; plus the bundle's
   ``validate#inferer``: sliding 128 px windows). Targets: Heun 4 within 0.5 Dice points of 32 steps; a
   setting >= 10x faster than 30x5 that loses no more than 0.5 Dice points. This part runs the network with
   SDPA attention (``--attention sdpa``, default): with the materialised matrix a whole 512x512 image has
   128^2 tokens, 8 heads x 16384^2 scores each, which does not fit a batch of 8 on an 80 GB card
   (``--attention bundle`` measures it anyway; rows that run out of memory say so).
3. Optional (``--compile``): the same few-step settings with ``torch.compile`` of the network, and with
   ``cudnn.benchmark``.

Writes ``gpu_film_overhead.md`` and ``.json`` to ``$OUT`` (default ``./out``); the table is printed last.
Needs torch, numpy, scipy, scikit-image, MONAI and this repository.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CUDA = torch.cuda.is_available()
DEFAULT_CONFIG = ROOT / "bundle" / "configs" / "train.yaml"
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[film {time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def autocast() -> Any:
    """bf16 autocast on the GPU; plain float32 on the CPU (smoke runs)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else nullcontext()


def peak_reset() -> None:
    if CUDA:
        sync()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if CUDA else None


def time_block(fn: Callable[[], Any], reps: int) -> list[float]:
    """Seconds of each of ``reps`` back-to-back calls (CUDA events, one synchronisation at the end)."""
    if not CUDA:
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1000.0 for s, e in events]


def timed_call(fn: Callable[[], Any], target_s: float = 1.5, min_reps: int = 2, max_reps: int = 10) -> float:
    """Median seconds of ``fn()`` after one warm-up call; repeats fit in about ``target_s``."""
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, target_s / max(first, 1e-6))))
    return statistics.median(time_block(fn, reps))


# ------------------------------------------------------------------------------------------------ the network
def bundle_parser(config: str | os.PathLike, use_vlm_film: bool, sdpa: bool | None = None) -> Any:
    """The bundle's training config with ``use_vlm_film`` set (and ``network_def#use_flash_attention`` if given)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config))
    parser["use_vlm_film"] = bool(use_vlm_film)
    # train.yaml's default profile_norm reads the training split's profiles (0.6.1); the network measured here is
    # built without a datalist, and its timing does not depend on the statistics
    parser["profile_norm"] = None
    if sdpa is not None:
        parser["network_def#use_flash_attention"] = bool(sdpa)
    return parser


def bundle_sdpa(config: str | os.PathLike) -> bool:
    """Whether the bundle's ``network_def`` already runs its attention through SDPA (``use_flash_attention``)."""
    parser = bundle_parser(config, False)
    if "use_flash_attention" not in parser["network_def"]:
        return False
    return bool(parser.get_parsed_content("network_def#use_flash_attention"))


def bundle_network(
    config: str | os.PathLike, use_vlm_film: bool, seed: int, device: torch.device, sdpa: bool | None = None
) -> torch.nn.Module:
    """``network_def`` of the bundle config, built under ``seed`` (ON and OFF share the UNet's weights).

    ``sdpa`` overrides ``use_flash_attention`` (MONAI's switch from the materialised attention matrix to
    ``torch.nn.functional.scaled_dot_product_attention``): same parameters, same function, other kernels.
    """
    torch.manual_seed(seed)
    net = bundle_parser(config, use_vlm_film, sdpa).get_parsed_content("network_def")
    return net.to(device)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory() -> None:
    import gc

    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ 1. overhead
def overhead(args: argparse.Namespace, device: torch.device, res: dict[str, Any]) -> None:
    """FiLM ON vs OFF timing with the bundle's attention setting, and with SDPA attention when that differs."""
    from monai_vlmfilm.profiles.schema import PROFILE_DIM

    b, s = args.batch, args.timing_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b, 2, s, s, generator=gen).to(device)
    t = (torch.rand(b, generator=gen) * 1000).to(device)
    p = torch.rand(b, PROFILE_DIM, generator=gen).to(device)
    target = torch.randn(b, 1, s, s, generator=gen).to(device)
    bundle_is_sdpa = bundle_sdpa(args.config)
    ov: dict[str, Any] = {"size": s, "batch": b, "rounds": args.rounds, "reps": args.reps, "variants": {}}
    ov["bundle_use_flash_attention"] = bundle_is_sdpa
    res["overhead"] = ov
    variants = [("bundle", None)] + ([] if bundle_is_sdpa else [("sdpa", True)])
    for name, sdpa in variants:
        try:
            ov["variants"][name] = overhead_variant(args, device, x, t, p, target, sdpa)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            ov["variants"][name] = {"error": f"out of memory: {str(e)[:200]}"}
            log(f"overhead ({name} attention): out of memory")
        free_memory()
        if name == "bundle":  # the headline figures: the bundle's network as configured
            ov.update({k: v for k, v in ov["variants"][name].items() if k in ("params", "train", "infer")})


def overhead_variant(
    args: argparse.Namespace,
    device: torch.device,
    x: torch.Tensor,
    t: torch.Tensor,
    p: torch.Tensor,
    target: torch.Tensor,
    sdpa: bool | None,
) -> dict[str, Any]:
    b = x.shape[0]
    tag = "bundle attention" if sdpa is None else "SDPA attention"
    nets = {
        "off": bundle_network(args.config, False, 0, device, sdpa),
        "on": bundle_network(args.config, True, 0, device, sdpa),
    }
    params = {k: sum(q.numel() for q in n.parameters()) for k, n in nets.items()}
    out: dict[str, Any] = {"params": params}
    log(f"{tag}: params off {params['off']:,} on {params['on']:,} (+{params['on'] - params['off']:,})")

    def train_step(mode: str) -> Callable[[], None]:
        net = nets[mode]
        opt = torch.optim.AdamW(net.parameters(), lr=1e-6, weight_decay=1e-4)
        kw = {"profile": p} if mode == "on" else {}  # the OFF pipeline has no profile in its batches

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast():
                out = net(x, timesteps=t, **kw)
            F.mse_loss(out.float(), target).backward()
            opt.step()

        return step

    def infer_step(mode: str) -> Callable[[], None]:
        net = nets[mode]
        kw = {"profile": p} if mode == "on" else {}

        def step() -> None:
            with torch.inference_mode(), autocast():
                net(x, timesteps=t, **kw)

        return step

    for kind, make in (("train", train_step), ("infer", infer_step)):
        fns = {m: make(m) for m in ("off", "on")}
        for m in ("off", "on"):  # warm-up: allocator, cuDNN handles, optimizer state
            nets[m].train(kind == "train")
            time_block(fns[m], args.warmup)
        per: dict[str, list[float]] = {"off": [], "on": []}
        round_ratios = []
        for r in range(args.rounds):
            means = {}
            for m in ("off", "on") if r % 2 == 0 else ("on", "off"):
                nets[m].train(kind == "train")
                ts = time_block(fns[m], args.reps)
                per[m] += ts
                means[m] = statistics.median(ts)
            round_ratios.append(means["on"] / means["off"])
        mem = {}
        for m in ("off", "on"):
            nets[m].train(kind == "train")
            peak_reset()
            time_block(fns[m], 2)
            mem[m] = peak_gib()
        med = {m: statistics.median(v) for m, v in per.items()}
        row = {
            "off_ms": round(med["off"] * 1e3, 3),
            "on_ms": round(med["on"] * 1e3, 3),
            "ratio_of_medians": round(med["on"] / med["off"], 4),
            "median_round_ratio": round(statistics.median(round_ratios), 4),
            "round_ratio_min_max": [round(min(round_ratios), 4), round(max(round_ratios), 4)],
            "off_ms_iqr": _iqr_ms(per["off"]),
            "on_ms_iqr": _iqr_ms(per["on"]),
            "peak_gib_off": mem["off"],
            "peak_gib_on": mem["on"],
            "images_per_s_off": round(b / med["off"], 1),
            "images_per_s_on": round(b / med["on"], 1),
        }
        row["meets_1_03"] = row["median_round_ratio"] <= 1.03
        out[kind] = row
        log(
            f"{tag}, {kind}: off {row['off_ms']} ms, on {row['on_ms']} ms, ratio {row['median_round_ratio']} "
            f"(rounds {row['round_ratio_min_max']}), peak GiB off {mem['off']} on {mem['on']}"
        )
    nets.clear()  # free the GPU memory before the next part
    return out


def _iqr_ms(v: list[float]) -> list[float]:
    q = np.percentile(np.asarray(v) * 1e3, [25, 75])
    return [round(float(q[0]), 3), round(float(q[1]), 3)]


# ------------------------------------------------------------------------------------------------ 2. data
def _make_sample(job: tuple[int, str, int, int, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic image (uint8, as the PNG files hold it), its label and its profile vector."""
    from monai_vlmfilm.data.synthetic import SPLITS, generate_sample
    from monai_vlmfilm.profiles import HeuristicProfiler, OracleProfiler

    seed, split, index, size, profiler = job
    # the per-image seed of monai_vlmfilm.data.synthetic.generate_dataset: same images as its files
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index]))
    img, lbl, factors = generate_sample(rng, size)
    img8 = np.round(img * 255.0).astype(np.uint8)
    if profiler == "heuristic":
        prof = HeuristicProfiler().profile([img8.astype(np.float32)])[0]
    else:
        prof = OracleProfiler.profile_from_factors(factors)
    return img8, lbl.astype(np.uint8), prof.to_vector()


def make_split(split: str, n: int, size: int, seed: int, profiler: str, workers: int) -> dict[str, torch.Tensor]:
    """``{"image": [N,1,S,S] min-max scaled to [0, 1] (the bundle's ScaleIntensityd), "label", "vlm_profile"}``."""
    jobs = [(seed, split, i, size, profiler) for i in range(n)]
    if workers > 1 and n > 1:
        # fork before CUDA is initialised (this runs first); forked workers skip re-importing torch
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ctx.Pool(min(workers, n)) as pool:
            out = pool.map(_make_sample, jobs, chunksize=max(1, n // (4 * workers)))
    else:
        out = [_make_sample(j) for j in jobs]
    img = torch.from_numpy(np.stack([o[0] for o in out])[:, None].astype(np.float32))
    lo = img.amin(dim=(1, 2, 3), keepdim=True)
    hi = img.amax(dim=(1, 2, 3), keepdim=True)
    img = (img - lo) / (hi - lo).clamp_min(1e-8)
    lbl = torch.from_numpy(np.stack([o[1] for o in out])[:, None].astype(np.float32))
    prof = torch.from_numpy(np.stack([o[2] for o in out]).astype(np.float32))
    return {"image": img, "label": lbl, "vlm_profile": prof}


# ------------------------------------------------------------------------------------------------ 2. training
def train(
    net: torch.nn.Module, data: dict[str, torch.Tensor], args: argparse.Namespace, parser: Any, device: torch.device
) -> dict[str, Any]:
    """Flow-matching training of ``net`` for ``args.train_seconds`` (FlowMatchingPrepareBatch, bf16, AdamW)."""
    from monai_vlmfilm.engines import FlowMatchingPrepareBatch

    prep = FlowMatchingPrepareBatch(
        num_train_timesteps=int(parser["num_train_timesteps"]), timestep_sampling=parser["timestep_sampling"]
    )
    d = {k: v.to(device) for k, v in data.items()}
    n = d["image"].shape[0]
    bs = min(args.train_batch, n)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    net.train()
    rnd = random.Random(0)
    torch.manual_seed(0)
    budget = float(args.train_seconds)
    losses: list[float] = []
    peak_reset()
    step, t0 = 0, time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget:
            break
        frac = elapsed / budget
        # linear warm-up over the first 3 %, cosine to 5 % of the base rate over the time budget
        lr = args.lr * min(1.0, frac / 0.03 + 1e-3) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(n, (bs,), device=device)
        batch = {k: v[idx] for k, v in d.items()}
        k = rnd.randrange(4)  # one random rot90 / flip per batch (vessel trees have no preferred orientation)
        flip = rnd.random() < 0.5
        for key in ("image", "label"):
            v = torch.rot90(batch[key], k, dims=(2, 3)) if k else batch[key]
            batch[key] = torch.flip(v, dims=(3,)) if flip else v
        inputs, target, _, kw = prep(batch, device)
        with autocast():
            out = net(inputs, **kw)
        loss = F.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:  # a sync now and then keeps the time budget honest (the CPU runs ahead)
            losses.append(loss.detach().item())
            if step % 500 == 0:
                log(f"train step {step}: loss {np.mean(losses[-10:]):.4f}, lr {lr:.2e}")
    sync()
    secs = time.perf_counter() - t0
    net.eval()
    return {
        "steps": step,
        "seconds": round(secs, 1),
        "batch": bs,
        "images_seen": step * bs,
        "epochs": round(step * bs / n, 1),
        "final_loss": round(float(np.mean(losses[-10:])), 4) if losses else None,
        "lr": args.lr,
        "steps_per_s": round(step / secs, 2),
        "peak_gib": peak_gib(),
    }


# ------------------------------------------------------------------------------------------------ 2. evaluation
def settings(
    steps: list[int], reference: tuple[int, int], multi: Sequence[tuple[int, int]] = ()
) -> list[tuple[str, int, int]]:
    """Single-sample Euler and Heun at each step count, Euler ``STEPSxSAMPLES`` ensembles, then the reference."""
    out = [(solver, n, 1) for solver in ("euler", "heun") for n in steps]
    return out + [("euler", n, k) for n, k in multi] + [("euler", reference[0], reference[1])]


def parse_nxk(spec: str) -> list[tuple[int, int]]:
    """``"1x4,2x8"`` -> ``[(1, 4), (2, 8)]``."""
    return [(int(a), int(b)) for a, b in (x.lower().split("x") for x in spec.split(",") if x.strip())]


def label_of(solver: str, n: int, samples: int) -> str:
    return f"{solver} {n}" + (f" x {samples} samples" if samples > 1 else "")


def evaluate(
    net: torch.nn.Module, test: dict[str, torch.Tensor], setting: tuple[str, int, int], args: argparse.Namespace, T: int
) -> dict[str, float]:
    """Mean Dice and clDice (x100, threshold 0.5) of one inferer setting over the test set.

    Images go through in chunks of ``eval_batch / samples``; on running out of GPU memory the chunk is halved.
    """
    from monai.metrics import DiceMetric

    from monai_vlmfilm.inferers import FlowSegInferer
    from monai_vlmfilm.metrics import ClDiceMetric

    solver, n, samples = setting
    inf = FlowSegInferer(num_steps=n, solver=solver, num_samples=samples, num_train_timesteps=T, seed=0)
    device = next(net.parameters()).device
    chunk = max(1, args.eval_batch // samples)
    while True:
        dice, cldice = DiceMetric(include_background=True, reduction="mean"), ClDiceMetric()
        try:
            for i in range(0, test["image"].shape[0], chunk):
                img = test["image"][i : i + chunk].to(device)
                lbl = test["label"][i : i + chunk].to(device)
                prof = test["vlm_profile"][i : i + chunk].to(device)
                with torch.inference_mode(), autocast():
                    prob = inf(img, net, profile=prof)
                pred = (prob >= 0.5).float()
                dice(pred, lbl)
                cldice(pred, lbl)
            break
        except RuntimeError as e:
            if not is_oom(e) or chunk == 1:
                raise
            free_memory()
            chunk = max(1, chunk // 2)
            log(f"evaluation out of memory: chunks of {chunk} images")
    return {"dice": round(100 * float(dice.aggregate()), 2), "cldice": round(100 * float(cldice.aggregate()), 2)}


def speed(
    net: torch.nn.Module, images: torch.Tensor, profile: torch.Tensor, inferer: Any, target_s: float, min_reps: int = 2
) -> dict[str, Any]:
    """images/s and peak memory of ``inferer(images, net, profile=...)`` (bf16, inference mode); OOM is reported."""

    def call() -> None:
        with torch.inference_mode(), autocast():
            inferer(images, net, profile=profile)

    peak_reset()
    try:
        med = timed_call(call, target_s, min_reps=min_reps)
    except RuntimeError as e:
        if not is_oom(e):
            raise
        peak = peak_gib()
        free_memory()
        return {"ms_per_batch": None, "images_per_s": None, "peak_gib": peak, "error": "out of memory"}
    return {
        "ms_per_batch": round(med * 1e3, 2),
        "images_per_s": round(images.shape[0] / med, 2),
        "peak_gib": peak_gib(),
    }


def few_step(args: argparse.Namespace, device: torch.device, res: dict[str, Any], data: dict[str, Any]) -> None:
    from monai_vlmfilm.inferers import FlowSegInferer

    sdpa = True if args.attention == "sdpa" else None
    parser = bundle_parser(args.config, True, sdpa)
    T = int(parser["num_train_timesteps"])
    net = bundle_network(args.config, True, 0, device, sdpa)
    fs: dict[str, Any] = {"test_images": int(data["test"]["image"].shape[0]), "size": args.size}
    fs["attention"] = "SDPA (use_flash_attention=True)" if sdpa else "the bundle's setting"
    res["few_step"] = fs
    if args.checkpoint:
        from monai_vlmfilm.networks import load_network_weights

        load_network_weights(net, args.checkpoint, map_location=device)
        fs["model"] = f"checkpoint {args.checkpoint}"
        net.eval()
    else:
        fs["model"] = (
            f"trained here: {args.n_train} synthetic {args.size}x{args.size} images, {args.profiler} profiles, "
            f"{args.train_seconds} s"
        )
        fs["training"] = train(net, data["train"], args, parser, device)
        log(f"trained: {fs['training']}")
        if args.save_checkpoint:
            Path(args.save_checkpoint).parent.mkdir(parents=True, exist_ok=True)
            torch.save(net.state_dict(), args.save_checkpoint)
            fs["saved_checkpoint"] = str(args.save_checkpoint)
    steps = [int(s) for s in args.steps.split(",")]
    ref = tuple(int(v) for v in args.reference.lower().split("x"))
    test = data["test"]
    # 512x512 speed inputs: the test images upsampled (real content; the cost does not depend on it)
    n_sp = min(args.speed_batch, test["image"].shape[0])
    img_sp = F.interpolate(test["image"][:n_sp], size=(args.speed_size,) * 2, mode="bilinear").to(device)
    prof_sp = test["vlm_profile"][:n_sp].to(device)
    rows: list[dict[str, Any]] = []
    fs["rows"] = rows
    fs["reference_setting"] = label_of("euler", ref[0], ref[1])
    fs["speed_input"] = f"{n_sp} x {args.speed_size}x{args.speed_size}, whole image"
    fs["speed_size"] = args.speed_size
    for st in settings(steps, ref, parse_nxk(args.ensembles)):  # type: ignore[arg-type]
        solver, n, samples = st
        row: dict[str, Any] = {"setting": label_of(*st), "solver": solver, "steps": n, "samples": samples}
        row["nfe_per_image"] = n * samples * (2 if solver == "heun" else 1)
        row.update(evaluate(net, test, st, args, T))
        inf = FlowSegInferer(num_steps=n, solver=solver, num_samples=samples, num_train_timesteps=T, seed=0)
        row.update(speed(net, img_sp, prof_sp, inf, args.speed_target_s, args.min_reps))
        rows.append(row)
        log(f"{row['setting']}: Dice {row['dice']} clDice {row['cldice']}, {row['images_per_s']} img/s")
        write_report(res, Path(args.out))
    # the bundle's own validation inferer (sliding windows) as configured, and with larger window batches
    bundle_inf = parser.get_parsed_content("validate#inferer")
    if args.smoke:  # tiny smoke images: windows of the image's size (the code path is what is checked)
        bundle_inf.roi_size = (args.speed_size,) * 2
    fs["sliding_window"] = []
    for swb in dict.fromkeys([bundle_inf.sw_batch_size, args.sw_batch]):
        bundle_inf.sw_batch_size = swb
        row = {
            "setting": f"bundle validate#inferer: {bundle_inf.solver} {bundle_inf.num_steps}, roi "
            f"{list(bundle_inf.roi_size)}, overlap {bundle_inf.overlap}, sw_batch {swb}",
            **speed(net, img_sp, prof_sp, bundle_inf, args.speed_target_s, args.min_reps),
        }
        fs["sliding_window"].append(row)
        log(f"{row['setting']}: {row['images_per_s']} img/s")
    if args.compile:
        fs["optimised"] = optimised_rows(net, img_sp, prof_sp, T, args)
        eager = {r["setting"]: r.get("images_per_s") for r in rows}
        for r in fs["optimised"]:
            base = eager.get(r.get("setting"))
            if base and r.get("images_per_s"):
                r["eager_images_per_s"] = base
                r["speedup_vs_eager"] = round(r["images_per_s"] / base, 2)
    fs["targets"] = targets(rows, steps, ref)  # type: ignore[arg-type]
    log(f"targets: {fs['targets']}")


def optimised_rows(
    net: torch.nn.Module, img: torch.Tensor, prof: torch.Tensor, T: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Few-step speed with cudnn.benchmark, torch.compile and CUDA graphs (compile mode 'reduce-overhead')."""
    from monai_vlmfilm.inferers import FlowSegInferer

    out = []
    picks = [("euler", 4, 1), ("heun", 4, 1)]
    variants: list[tuple[str, Callable[[], Any]]] = [
        ("cudnn.benchmark", lambda: net),
        ("cudnn.benchmark + torch.compile", lambda: torch.compile(net)),
        (
            "cudnn.benchmark + torch.compile reduce-overhead (CUDA graphs)",
            lambda: torch.compile(net, mode="reduce-overhead"),
        ),
    ]
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    for name, make in variants:
        try:
            t0 = time.perf_counter()
            model = make()
            for st in picks:
                inf = FlowSegInferer(num_steps=st[1], solver=st[0], num_train_timesteps=T, seed=0)
                row = {"variant": name, "setting": label_of(*st), **speed(model, img, prof, inf, args.speed_target_s)}
                row["setup_and_measure_s"] = round(time.perf_counter() - t0, 1)
                out.append(row)
                log(f"{name}, {row['setting']}: {row['images_per_s']} img/s")
        except Exception as e:  # report and go on: the main rows stand without these
            out.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
            log(f"{name} failed: {e}")
    torch.backends.cudnn.benchmark = old
    return out


def targets(rows: list[dict[str, Any]], steps: list[int], ref: tuple[int, int]) -> dict[str, Any]:
    by = {(r["solver"], r["steps"], r["samples"]): r for r in rows}
    top = max(steps)
    out: dict[str, Any] = {}
    h4 = by.get(("heun", 4, 1))
    for solver in ("euler", "heun"):
        r32 = by.get((solver, top, 1))
        if h4 and r32:
            out[f"heun4_minus_{solver}{top}_dice_points"] = round(h4["dice"] - r32["dice"], 2)
    if h4:
        diffs = [v for k, v in out.items() if k.startswith("heun4_minus")]
        out[f"heun4_within_0.5_of_{top}"] = bool(diffs) and all(d >= -0.5 for d in diffs)
    r_ref = by.get(("euler", ref[0], ref[1]))
    if r_ref and r_ref.get("images_per_s"):
        ok = [r for r in rows if r["dice"] >= r_ref["dice"] - 0.5 and r is not r_ref and r.get("images_per_s")]
        if ok:
            best = max(ok, key=lambda r: r["images_per_s"])
            out["fastest_within_0.5_of_reference"] = best["setting"]
            out["its_speedup_vs_reference"] = round(best["images_per_s"] / r_ref["images_per_s"], 1)
            out["its_dice_minus_reference"] = round(best["dice"] - r_ref["dice"], 2)
            out["ge_10x_at_le_0.5_lost"] = out["its_speedup_vs_reference"] >= 10
        else:
            out["ge_10x_at_le_0.5_lost"] = False
        for key in (("heun", 4, 1), ("euler", 4, 1)):
            if key in by and by[key].get("images_per_s"):
                out[f"{key[0]}4_speedup_vs_reference"] = round(by[key]["images_per_s"] / r_ref["images_per_s"], 1)
                out[f"{key[0]}4_dice_minus_reference"] = round(by[key]["dice"] - r_ref["dice"], 2)
    return out


# ------------------------------------------------------------------------------------------------ report
def write_report(res: dict[str, Any], out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_film_overhead.json").write_text(json.dumps(res, indent=2))
    L = [
        "## FiLM overhead and few-step inference (bundle network)",
        "",
        f"Device: {res['device']}; torch {res['torch']}; MONAI {res['monai']}; {res['dtype']}; {res['date']}",
        f"Command: `{res['command']}`; total {res.get('total_s')} s",
        "",
    ]
    ov = res.get("overhead")
    if ov:
        L += [
            f"FiLM ON vs OFF at {ov['size']}x{ov['size']}, batch {ov['batch']}; {ov['rounds']} interleaved "
            f"rounds x {ov['reps']} steps; the bundle's network_def has use_flash_attention="
            f"{ov['bundle_use_flash_attention']}",
            "",
            "| network attention | pass | OFF ms | ON ms | ON/OFF (median of rounds) | rounds min..max | "
            "peak GiB OFF | peak GiB ON | <= 1.03 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for vname, v in ov.get("variants", {}).items():
            label = "bundle as configured" if vname == "bundle" else "SDPA (use_flash_attention=True)"
            if "error" in v:
                L.append(f"| {label} | {v['error']} | | | | | | | |")
                continue
            for kind, name in (("train", "train step (fwd+bwd+AdamW)"), ("infer", "inference forward")):
                r = v.get(kind)
                if r:
                    lo, hi = r["round_ratio_min_max"]
                    L.append(
                        f"| {label} | {name} | {r['off_ms']} | {r['on_ms']} | {r['median_round_ratio']} | {lo}..{hi} | "
                        f"{r['peak_gib_off']} | {r['peak_gib_on']} | {'yes' if r['meets_1_03'] else 'NO'} |"
                    )
        if "params" in ov:
            L.append("")
            L.append(f"Parameters: OFF {ov['params']['off']:,}, ON {ov['params']['on']:,}.")
        L.append("")
    fs = res.get("few_step")
    if fs and fs.get("rows"):
        tr = fs.get("training", {})
        L += [
            f"Few-step inference: {fs['model']}"
            + (
                f" ({tr['steps']} steps, batch {tr['batch']}, {tr['epochs']} epochs, loss {tr['final_loss']}, "
                f"peak {tr.get('peak_gib')} GiB)"
                if tr
                else ""
            )
            + f"; Dice/clDice x100 on {fs['test_images']} test images ({fs['size']}x{fs['size']}); "
            f"speed on {fs['speed_input']}; attention {fs.get('attention')}",
            "",
            f"| setting | NFE/image | Dice | clDice | images/s ({fs['speed_size']} px) | speedup vs reference | peak GiB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        ref = next((r for r in fs["rows"] if r["setting"] == fs.get("reference_setting")), None)

        def speedup(ips: float | None) -> Any:
            return round(ips / ref["images_per_s"], 1) if ref and ref["images_per_s"] and ips else ""

        for r in fs["rows"]:
            L.append(
                f"| {r['setting']} | {r['nfe_per_image']} | {r['dice']} | {r['cldice']} | {r['images_per_s']} | "
                f"{speedup(r['images_per_s'])} | {r['peak_gib']} |"
            )
        for b in fs.get("sliding_window", []):
            L.append(f"| {b['setting']} | | | | {b['images_per_s']} | {speedup(b['images_per_s'])} | {b['peak_gib']} |")
        L += ["", f"Targets: {json.dumps(fs.get('targets', {}))}"]
        for r in fs.get("optimised", []):
            if "error" in r:
                L.append(f"- {r['variant']}: {r['error']}")
            else:
                L.append(
                    f"- {r['variant']}, {r['setting']}: {r['images_per_s']} images/s "
                    f"({r.get('speedup_vs_eager')}x the eager row above), peak {r['peak_gib']} GiB "
                    f"(setup + measure {r['setup_and_measure_s']} s)"
                )
    text = "\n".join(L) + "\n"
    (out_dir / "gpu_film_overhead.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU ok): check that the script runs")
    ap.add_argument("--out", default=os.environ.get("OUT", "./out"))
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="bundle training config holding network_def")
    ap.add_argument("--timing-size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-few-step", action="store_true")
    ap.add_argument(
        "--checkpoint",
        help="evaluate this checkpoint (the bundle's FiLM-ON network) instead of training; give --profiler the "
        "profiles it was trained with",
    )
    ap.add_argument("--save-checkpoint", help="write the network trained here to this path")
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--profiler", choices=("oracle", "heuristic"), default="oracle")
    ap.add_argument("--train-seconds", type=float, default=90.0)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", default="1,2,4,8,16,32")
    ap.add_argument("--reference", default="30x5", help="the reference's setting: STEPSxSAMPLES (Euler)")
    ap.add_argument(
        "--ensembles",
        default="1x2,1x4,1x8,2x4,4x4",
        help="few-step Euler ensembles STEPSxSAMPLES (mean foreground probability over samples), comma-separated",
    )
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--speed-size", type=int, default=512)
    ap.add_argument("--speed-batch", type=int, default=8)
    ap.add_argument("--speed-target-s", type=float, default=1.5, help="time spent on each speed row (about)")
    ap.add_argument("--min-reps", type=int, default=2, help="fewest timed repeats of each speed row")
    ap.add_argument(
        "--attention",
        choices=("sdpa", "bundle"),
        default="sdpa",
        help="few-step part: SDPA attention (use_flash_attention=True, same weights) or the bundle's setting",
    )
    ap.add_argument("--sw-batch", type=int, default=64, help="window batch of the second sliding-window row")
    ap.add_argument("--compile", action="store_true", help="also time cudnn.benchmark / torch.compile / CUDA graphs")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.timing_size, args.batch, args.rounds, args.reps, args.warmup = 32, 2, 2, 1, 1
        args.n_train, args.n_test, args.size, args.train_seconds, args.train_batch = 4, 2, 32, 1.0, 2
        args.steps, args.reference, args.speed_size, args.speed_batch = "1,2", "2x2", 32, 1
        args.ensembles = "1x2"
        args.eval_batch, args.speed_target_s, args.min_reps, args.workers = 4, 0.0, 1, min(args.workers, 2)
    if not CUDA:  # on a shared CPU box, OpenMP threads spinning against other processes cost 100x
        torch.set_num_threads(1)
    out_dir = Path(args.out)
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": None,  # read after the generator pool has forked (no CUDA context in the parent yet)
        "torch": torch.__version__,
        "monai": __import__("monai").__version__,
        "dtype": "bf16 autocast" if CUDA else "float32 (CPU)",
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "smoke": args.smoke,
    }
    data: dict[str, Any] = {}
    if not args.skip_few_step:  # before CUDA is touched: the generator pool forks
        t0 = time.perf_counter()
        data["test"] = make_split("test", args.n_test, args.size, args.seed, args.profiler, args.workers)
        if not args.checkpoint:
            data["train"] = make_split("training", args.n_train, args.size, args.seed, args.profiler, args.workers)
        res["data_s"] = round(time.perf_counter() - t0, 1)
        log(f"synthetic data ({args.profiler} profiles) in {res['data_s']} s")
    device = torch.device("cuda:0" if CUDA else "cpu")
    res["device"] = torch.cuda.get_device_name(0) if CUDA else platform.processor() or "cpu"
    if not args.skip_overhead:
        overhead(args, device, res)
        write_report(res, out_dir)  # partial results survive a later failure or timeout
    if not args.skip_few_step:
        few_step(args, device, res, data)
    res["total_s"] = round(time.perf_counter() - _T0, 1)
    print(write_report(res, out_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
