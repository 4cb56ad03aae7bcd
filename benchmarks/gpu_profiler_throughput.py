"""Profiler throughput at the real Qwen2.5-VL-3B-Instruct architecture (random weights), one GPU, bf16.

    python benchmarks/gpu_profiler_throughput.py            # GPU, ~3.75B parameters, < 8 min on one H100
    python benchmarks/gpu_profiler_throughput.py --tiny     # tiny config, CPU is fine (checks the script runs)
    python benchmarks/gpu_profiler_throughput.py --compare  # issue 17: each optimisation before/after, < 5 min
    python benchmarks/gpu_profiler_throughput.py --compare --tiny   # the same on the tiny config (CPU)

``--compare`` (scored mode, one batch size, default 64; writes ``gpu_profiler_compare.md`` / ``.json``) loads the
model once and measures, on the same images: the stock ``model(**inputs)`` forward (the path before issue 17); the
profiler's own forward (cached vision index tables, host-side mrope positions, LM head at the read positions);
plus the prefix KV cache (opt-in: it did not pay on the H200); the stock per-window vision SDPA instead of the packed one; the prompt
before the image (another computation: fingerprinted); regional ``torch.compile`` of the decoder layers, then
also of the vision blocks (compile time reported apart); everything together. Each row gives images/s, the speed-up
over the stock forward and the largest profile difference from it on the same images. Then end to end through
``precompute`` (PNG decode + hash + preprocessing + model + cache write, ``--e2e-images`` files), before (no
read-ahead, stock forward) and after (read-ahead, own forward + prefix cache), and a ``torch.profiler`` summary of one batch of
the stock and of the own-forward path: device time per kernel class and how much of the wall time the device idles.

Builds the exact architecture (text 2048 x 36 layers, 16 heads / 2 kv heads, MLP 11008, vocab 151936, tied
embeddings, mrope [16, 24, 24], rope theta 1e6; vision depth 32, hidden 1280, out 2048, MLP 3420, 16 heads,
patch 14, merge 2, temporal patch 2, window 112, full attention at [7, 15, 23, 31]) with random weights and a
byte-level BPE tokenizer whose vocabulary is padded so the special tokens take their real ids, saves it with
``save_pretrained`` to a temp dir and loads it back through ``QwenVLProfiler`` (no hub access: the compute is the
real model's). Then, on 512x512 images:

- ``QwenVLProfiler`` scored mode at batch 1, 8, 16, 32, 64 (best batch also end to end over a longer list, with
  the CPU preparing the next batch meanwhile), with the vision tower's stock per-window SDPA vs packed SDPA,
  and at several processor ``max_pixels``;
- generate mode (64 new tokens forced with ``min_new_tokens`` so random weights cannot stop early) at batch 1
  and at a larger batch;
- the stock recipe: processor (``AutoProcessor`` where it loads, else the same tokenizer + image processor
  steps) + ``model.generate``, batch 1, default processor resolution, 64 new tokens, stock attention;
- the floor: FLOPs per image (vision encoder + prefill, counted from the shapes) over the measured bf16
  matmul rate (8192^3 ``torch.matmul``);
- ``flash_attention_2`` for the language model and the vision tower when the ``flash_attn`` package is there.

Timing: CUDA events, warm-up call first, median of repeats; peak memory from ``torch.cuda.max_memory_allocated``.
Writes ``gpu_profiler_throughput.md`` and ``.json`` to ``$OUT`` (default ``./out``).
Needs only torch, transformers, accelerate, numpy, pillow, tokenizers and this repository (no MONAI, no scipy).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from precompute_scaling import angiogram_like  # noqa: E402  (benchmarks/ is the script's folder)
from tiny_qwen import QWEN2_5_VL_3B_ARCH, TINY_ARCH, build_qwen  # noqa: E402


def _import_profiler():
    """``QwenVLProfiler`` without the profiles package's other imports (its heuristic profiler needs scipy)."""
    try:
        from monai_vlmfilm.profiles.qwen import QwenVLProfiler
    except ImportError as e:
        print(f"[bench] profiles package import failed ({e}); loading qwen.py with a bare package")
        for name in [m for m in sys.modules if m.startswith("monai_vlmfilm.profiles")]:
            del sys.modules[name]
        import monai_vlmfilm

        pkg = types.ModuleType("monai_vlmfilm.profiles")
        pkg.__path__ = [str(Path(monai_vlmfilm.__file__).parent / "profiles")]
        sys.modules["monai_vlmfilm.profiles"] = pkg
        from monai_vlmfilm.profiles.qwen import QwenVLProfiler
    return QwenVLProfiler


QwenVLProfiler = _import_profiler()
CUDA = torch.cuda.is_available()
T_START = time.perf_counter()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median seconds of ``fn()`` (CUDA events on GPU, perf_counter on CPU) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def peak_reset() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None


def matmul_tflops(n: int, repeats: int) -> float:
    dev, dt = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    med, _ = timed(lambda: torch.matmul(a, b), repeats, warmup=3)
    return 2 * n**3 / med / 1e12


def window_sizes(gh: int, gw: int, patch: int, merge: int, window: int) -> list[int]:
    """Patches per attention window of one image (as the vision tower partitions its merged grid)."""
    vw = window // merge // patch
    mh, mw = gh // merge, gw // merge
    rows = [min(vw, mh - i) for i in range(0, mh, vw)]
    cols = [min(vw, mw - j) for j in range(0, mw, vw)]
    return [r * c * merge * merge for r in rows for c in cols]


def flops_per_image(cfg: Any, gh: int, gw: int, text_tokens: int, reads: int) -> dict[str, float]:
    """Multiply-add FLOPs (x2) of the vision encoder and the language-model prefill for one image."""
    v, t = cfg.vision_config, cfg.text_config
    p = gh * gw
    d, inter = v.hidden_size, v.intermediate_size
    patch_in = v.in_channels * v.temporal_patch_size * v.patch_size**2
    wins = window_sizes(gh, gw, v.patch_size, v.spatial_merge_size, v.window_size)
    vision = 2 * p * patch_in * d
    for layer in range(v.depth):
        attn_pairs = p * p if layer in v.fullatt_block_indexes else sum(n * n for n in wins)
        vision += 2 * p * d * 3 * d + 2 * p * d * d + 6 * p * d * inter + 4 * attn_pairs * d
    m = v.spatial_merge_size**2
    vision += 2 * (p // m) * (m * d * m * d + m * d * v.out_hidden_size)
    h, kv = t.hidden_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    n = text_tokens
    per_layer = 2 * n * h * (2 * h + 2 * kv) + 6 * n * h * t.intermediate_size + 2 * n * n * h  # causal attention
    text = t.num_hidden_layers * per_layer + 2 * reads * h * t.vocab_size
    return {"vision": float(vision), "text": float(text), "total": float(vision + text)}


def make_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Angiogram-like test images: smooth background, dark curved 'vessels', noise; float32 in [0, 255]."""
    rng = np.random.default_rng(seed)
    return [angiogram_like(rng, size) for _ in range(n)]


def stock_inputs(folder: Path, prof: Any, image: np.ndarray) -> dict[str, torch.Tensor]:
    """The stock recipe's preprocessing: AutoProcessor when it loads, else its tokenizer + image processor steps."""
    from PIL import Image

    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": pil}, {"type": "text", "text": prof.prompt}]}]
    if stock_inputs.processor is None:
        try:
            from transformers import AutoProcessor

            stock_inputs.processor = AutoProcessor.from_pretrained(folder)
            stock_inputs.kind = "AutoProcessor"
        except Exception as e:  # transformers 5: Qwen2.5-VL's processor needs torchvision for its video part
            from transformers import AutoImageProcessor, AutoTokenizer

            stock_inputs.processor = (AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder))
            stock_inputs.kind = f"tokenizer + image processor ({type(e).__name__}: AutoProcessor unavailable)"
    proc = stock_inputs.processor
    if not isinstance(proc, tuple):
        inputs = proc.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
    else:
        tok, ip = proc
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        vis = ip(images=[pil], return_tensors="pt")
        n = int(vis["image_grid_thw"].prod()) // ip.merge_size**2
        inputs = dict(tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt"), **vis)
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).int()
    return {k: v.to(prof._input_device) if torch.is_tensor(v) else v for k, v in inputs.items()}


stock_inputs.processor = None
stock_inputs.kind = ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config (CPU ok): check that the script runs")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--batches", default=None, help="comma list of scored batch sizes (default 1,8,16,32,64)")
    ap.add_argument("--out", default=os.environ.get("OUT", "./out"))
    ap.add_argument("--model-dir", default=None, help="reuse a built checkpoint folder instead of building one")
    ap.add_argument("--compare", action="store_true", help="issue 17: each optimisation before/after (see above)")
    ap.add_argument("--skip-compile", action="store_true", help="--compare without the torch.compile rows")
    ap.add_argument("--e2e-images", type=int, default=None, help="--compare: PNGs for end to end (default 4 batches)")
    args = ap.parse_args()
    t_start = T_START
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny = args.tiny
    arch = TINY_ARCH if tiny else QWEN2_5_VL_3B_ARCH
    default_batches = ("4" if tiny else "64") if args.compare else ("1,4,8" if tiny else "1,8,16,32,64")
    batches = [int(b) for b in (args.batches or default_batches).split(",")]
    new_tokens = 8 if tiny else 64
    reps = 2 if tiny else 5
    dtype = "bfloat16" if CUDA else "float32"
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if CUDA else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "arch": "tiny" if tiny else "Qwen2.5-VL-3B-Instruct (random weights)",
        "image_size": args.image_size,
        "dtype": dtype,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "rows": [],
    }
    rows = res["rows"]

    def log(msg: str) -> None:
        print(f"[bench {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    # ---------------------------------------------------------------- build + save the checkpoint
    tmp = tempfile.TemporaryDirectory(prefix="qwen3b_")
    folder = Path(args.model_dir) if args.model_dir else Path(tmp.name) / "model"
    if not (folder / "config.json").is_file():
        t0 = time.perf_counter()
        with torch.device("cuda" if CUDA else "cpu"):  # random init on the GPU: seconds, not minutes
            build_qwen(folder, arch, seed=0, min_pixels=56 * 56, max_pixels=28 * 28 * 16384, dtype=dtype)
        res["build_save_s"] = round(time.perf_counter() - t0, 1)
        log(f"built + saved checkpoint in {res['build_save_s']} s")
    sync()
    if CUDA:
        torch.cuda.empty_cache()
    tflops = matmul_tflops(8192 if CUDA else 1024, 20 if CUDA else 3)
    res["tflops_matmul"] = round(tflops, 1 if CUDA else 4)
    log(f"matmul {res['tflops_matmul']} TFLOP/s")

    images = make_images(max(batches) * 2 + 4, args.image_size)
    if args.compare:
        compare(args, res, folder, images, batches[-1], log)
        tmp.cleanup()
        return

    # ---------------------------------------------------------------- profiler, scored mode
    t0 = time.perf_counter()
    prof = QwenVLProfiler(folder, mode="scored", batch_size=1, dtype=dtype).load()
    res["load_s"] = round(time.perf_counter() - t0, 1)
    res["params_b"] = round(sum(p.numel() for p in prof.model.parameters()) / 1e9, 3)
    res["vision_attention"] = prof.vision_attention
    res["fast_pixels"] = prof._fast_pixels
    log(f"loaded {res['params_b']} B params in {res['load_s']} s; vision attention {prof.vision_attention}")
    vcfg = prof.model.config.vision_config
    packed = prof.vision_attention

    def scored_row(label: str, bs: int, repeats: int = reps, **extra: Any) -> dict[str, Any]:
        prof.batch_size = bs
        batch = images[:bs]
        peak_reset()
        med, times = timed(lambda: prof.profile(batch), repeats)
        row = {
            "config": label,
            "mode": "scored",
            "batch": bs,
            "median_s_per_batch": round(med, 4),
            "images_per_s": round(bs / med, 2),
            "peak_gib": peak_gib(),
            **extra,
        }
        rows.append(row)
        log(f"{label}: batch {bs}: {row['images_per_s']} img/s, peak {row['peak_gib']} GiB")
        return row

    def tokens_for(max_pixels: int) -> tuple[int, int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(args.image_size, args.image_size, 28, prof.min_pixels, max_pixels)
        n_img = (h // 14) * (w // 14) // 4
        text = len(prof._prefix_ids) + n_img + len(prof._suffix_ids) + len(getattr(prof, "_skeleton_ids", []))
        return h // 14, w // 14, text

    scored_rows = [scored_row("scored, packed vision attn", bs) for bs in batches]
    best = max(scored_rows, key=lambda r: r["images_per_s"])
    best_bs = best["batch"]
    # end to end over a longer list: several batches, next batch prepared on a CPU thread meanwhile
    prof.batch_size = best_bs
    n_e2e = len(images) if not tiny else 2 * best_bs
    med, _ = timed(lambda: prof.profile(images[:n_e2e]), 1 if not tiny else 1)
    res["scored_end_to_end"] = {"images": n_e2e, "batch": best_bs, "images_per_s": round(n_e2e / med, 2)}
    log(f"scored end to end ({n_e2e} images, batch {best_bs}): {res['scored_end_to_end']['images_per_s']} img/s")
    # before/after: stock per-window SDPA in the vision tower
    if packed.startswith("vlmfilm_packed"):
        vcfg._attn_implementation = "sdpa"
        scored_row("scored, stock vision attn (sdpa per window)", best_bs)
        if best_bs != 1:
            scored_row("scored, stock vision attn (sdpa per window)", 1)
        vcfg._attn_implementation = packed
    # processor resolution (benchmark-only shortcut: change max_pixels on the loaded profiler)
    default_max = prof.max_pixels
    for side in (336, 224) if not tiny else (224,):
        prof.max_pixels = side * side
        scored_row(f"scored, max_pixels {side}x{side}", best_bs, max_pixels=side * side)
    prof.max_pixels = default_max

    # ---------------------------------------------------------------- floor
    gh, gw, text_tokens = tokens_for(prof.max_pixels)
    fl = flops_per_image(prof.model.config, gh, gw, text_tokens, len(prof._reads))
    floor = tflops * 1e12 / fl["total"]
    res["floor"] = {
        "grid": [gh, gw],
        "text_tokens": text_tokens,
        "gflop_vision": round(fl["vision"] / 1e9, 1),
        "gflop_text_prefill": round(fl["text"] / 1e9, 1),
        "gflop_total": round(fl["total"] / 1e9, 1),
        "images_per_s_at_matmul_rate": round(floor, 1),
        "best_scored_fraction_of_floor": round(best["images_per_s"] / floor, 3),
    }
    log(f"floor: {res['floor']}")

    # ---------------------------------------------------------------- generate mode (same weights)
    gen = QwenVLProfiler(folder, mode="generate", batch_size=1, dtype=dtype, max_new_tokens=new_tokens)
    # share the loaded model (no second 7.5 GB copy): set up the generate-mode profiler's parts around it
    gen.model, gen.tokenizer, gen.image_processor = prof.model, prof.tokenizer, prof.image_processor
    gen._input_device, gen._pixel_device = prof._input_device, prof._pixel_device
    gen._setup_text()
    gen._fast_pixels, gen.vision_attention = prof._fast_pixels, prof.vision_attention
    prof.model.generation_config.min_new_tokens = new_tokens  # random weights must not stop early
    for bs in sorted({1, min(16, max(batches))}):
        gen.batch_size = bs
        peak_reset()
        batch = images[:bs]
        med, _ = timed(lambda: gen.profile(batch), 2 if bs == 1 else 1)  # noqa: B023 (called right here)
        rows.append(
            {
                "config": f"generate, {new_tokens} new tokens",
                "mode": "generate",
                "batch": bs,
                "median_s_per_batch": round(med, 4),
                "images_per_s": round(bs / med, 3),
                "peak_gib": peak_gib(),
            }
        )
        log(f"generate batch {bs}: {rows[-1]['images_per_s']} img/s")
    res["generate_fallback_rate_random_weights"] = round(gen.fallback_rate, 3)

    # ---------------------------------------------------------------- stock recipe
    vcfg._attn_implementation = "sdpa"
    model = prof.model

    def stock() -> None:
        inputs = stock_inputs(folder, prof, images[0])
        with torch.inference_mode():
            model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    peak_reset()
    med, _ = timed(stock, 3 if not tiny else 1)
    stock_ips = 1.0 / med
    rows.append(
        {
            "config": f"stock: processor + generate ({new_tokens} tokens), default resolution",
            "mode": "stock",
            "batch": 1,
            "median_s_per_batch": round(med, 4),
            "images_per_s": round(stock_ips, 3),
            "peak_gib": peak_gib(),
            "preprocessing": stock_inputs.kind,
        }
    )
    log(f"stock recipe: {stock_ips:.3f} img/s ({stock_inputs.kind})")
    vcfg._attn_implementation = packed
    model.generation_config.min_new_tokens = None
    res["speedup_best_scored_vs_stock"] = round(best["images_per_s"] / stock_ips, 1)
    res["targets"] = {
        "scored_ge_60_img_s": best["images_per_s"] >= 60,
        "scored_ge_20x_stock": best["images_per_s"] >= 20 * stock_ips,
    }

    # ---------------------------------------------------------------- flash attention 2, if installed
    if CUDA and importlib.util.find_spec("flash_attn") is not None and not tiny:
        try:
            gen.model = prof.model = model = None
            import gc

            gc.collect()
            torch.cuda.empty_cache()
            fa = QwenVLProfiler(folder, mode="scored", dtype=dtype, attn_implementation="flash_attention_2").load()
            prof = fa
            scored_row("scored, flash_attention_2 (text + vision)", best_bs)
        except Exception as e:  # report, keep the rest of the results
            res["flash_attention_2_error"] = f"{type(e).__name__}: {e}"[:300]
    else:
        res["flash_attention_2"] = "flash_attn not installed" if CUDA else "no GPU"

    res["total_s"] = round(time.perf_counter() - t_start, 1)
    write_report(res, out_dir)
    tmp.cleanup()


# ==================================================================================================== --compare
KERNEL_CLASSES = (  # first match wins; names of CUDA kernels (cuBLAS / CUTLASS / flash / PyTorch / Triton)
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "splitk", "matmul")),
    ("attention", ("flash", "fmha", "attention", "efficient", "softmax")),
    ("fused (triton)", ("triton",)),
    ("copy / index / cat", ("copy", "cat", "index", "gather", "scatter", "memcpy", "memset", "fill")),
    ("norm / reduce", ("reduce", "norm", "mean", "sum")),
    ("element-wise", ("elementwise", "vectorized", "unrolled", "pointwise")),
)


def kernel_summary(prof_obj: Any, wall_s: float, top: int = 12) -> dict[str, Any]:
    """Device time per kernel class, the busiest kernels, and the device's idle share of ``wall_s``."""
    events = [e for e in prof_obj.key_averages() if e.device_type.name in ("CUDA", "PrivateUse1")] if CUDA else []
    use_cpu = not events
    if use_cpu:  # CPU run: operator self time instead of kernels
        events = [e for e in prof_obj.key_averages() if e.key.startswith("aten::")]

    def t(e: Any) -> float:
        if use_cpu:
            return e.self_cpu_time_total / 1e6
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) / 1e6

    classes: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        cls = next((c for c, keys in KERNEL_CLASSES if any(k in name for k in keys)), "other")
        classes[cls] = classes.get(cls, 0.0) + t(e)
    busy = sum(classes.values())
    ranked = sorted(events, key=t, reverse=True)[:top]
    return {
        "unit": "cpu op self time" if use_cpu else "device kernel time",
        "wall_s": round(wall_s, 4),
        "busy_s": round(busy, 4),
        "idle_fraction": round(max(0.0, 1 - busy / wall_s), 3) if wall_s > 0 and not use_cpu else None,
        "classes_s": {k: round(v, 4) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
        "top": [{"name": e.key[:90], "s": round(t(e), 4), "calls": e.count} for e in ranked],
    }


def compare(args: argparse.Namespace, res: dict[str, Any], folder: Path, images: list, bs: int, log: Any) -> None:
    """Issue 17: each scored-mode optimisation before/after on one loaded model (module docstring, ``--compare``)."""
    out_dir = Path(args.out)
    tiny = args.tiny
    reps = 2 if tiny else 5
    dtype = res["dtype"]
    res["mode"] = "compare"
    res["batch"] = bs
    t0 = time.perf_counter()
    prof = QwenVLProfiler(folder, mode="scored", batch_size=bs, dtype=dtype).load()
    res["load_s"] = round(time.perf_counter() - t0, 1)
    res["params_b"] = round(sum(p.numel() for p in prof.model.parameters()) / 1e9, 3)
    res["vision_attention"] = prof.vision_attention
    res["fast_path_check"] = prof.fast_path_check
    res["tokens"] = {
        "prefix": len(prof._prefix_ids),
        "suffix": len(prof._suffix_ids),
        "skeleton": len(prof._skeleton_ids),
    }
    log(f"loaded in {res['load_s']} s; load-time check {prof.fast_path_check}; tokens {res['tokens']}")
    batch = images[:bs]
    rows = res["rows"]
    ref: dict[str, Any] = {}
    vcfg = prof.model.config.vision_config
    packed = prof.vision_attention

    def configure(fast: bool, prefix: bool, before: bool = False, vision_attn: str | None = None) -> None:
        position = "before" if before else "after"
        if prof.prompt_position != position:
            prof.prompt_position = position
            prof._setup_text()
            prof._prefix_kv = None
        prof.fast_forward, prof.prefix_cache = fast, prefix
        vcfg._attn_implementation = vision_attn or packed
        prof._vision_aux_cache = {}

    def vectors() -> np.ndarray:
        return np.stack([p.to_vector()[:6] for p in prof.profile(batch)])

    def row(label: str, note: str = "", **cfg: Any) -> dict[str, Any] | None:
        try:
            configure(**cfg)
            peak_reset()
            t_first = time.perf_counter()
            vec = vectors()  # first call: warm-up (and compilation, where compiled)
            sync()
            first_s = time.perf_counter() - t_first
            med, _ = timed(lambda: prof.profile(batch), reps, warmup=0)
        except Exception as e:  # report, keep measuring the other rows
            rows.append({"config": label, "error": f"{type(e).__name__}: {e}"[:300]})
            log(f"{label}: FAILED {rows[-1]['error']}")
            write_compare(res, out_dir)
            return None
        if "plain" not in ref:
            ref["plain"], ref["ips"] = vec, bs / med
        r = {
            "config": label,
            "batch": bs,
            "median_s_per_batch": round(med, 4),
            "images_per_s": round(bs / med, 2),
            "speedup_vs_stock": round(bs / med / ref["ips"], 3),
            "max_abs_diff_vs_stock": float(f"{np.abs(vec - ref['plain']).max():.3g}"),
            "first_call_s": round(first_s, 2),
            "peak_gib": peak_gib(),
            "note": note,
        }
        rows.append(r)
        log(f"{label}: {r['images_per_s']} img/s (x{r['speedup_vs_stock']}), diff {r['max_abs_diff_vs_stock']}")
        write_compare(res, out_dir)
        return r

    row("stock model(**inputs) forward (before issue 17)", "reference", fast=False, prefix=False)
    row("own forward (vision tables cached, host mrope positions, head at reads)", "default", fast=True, prefix=False)
    row("own forward + prefix KV cache", "opt-in", fast=True, prefix=True)
    if packed.startswith("vlmfilm_packed"):
        row("own forward + prefix cache, but stock per-window vision SDPA", "vision attention before issue 8", fast=True,
            prefix=True, vision_attn="sdpa")  # fmt: skip
    row("own forward + prefix cache + prompt before the image", "another computation (fingerprinted)", fast=True, prefix=True,
        before=True)  # fmt: skip

    # ---------------------------------------------------------------- end to end through precompute
    e2e_n = args.e2e_images or 4 * bs
    try:
        e2e(res, prof, configure, e2e_n, bs, args.image_size, log)
    except Exception as e:  # e.g. the profiles package cannot be imported here
        res["e2e_error"] = f"{type(e).__name__}: {e}"[:300]
        log(f"end to end: FAILED {res['e2e_error']}")
    write_compare(res, out_dir)

    # ---------------------------------------------------------------- where the time goes: one batch, traced
    res["trace"] = {}
    for name, cfg in (
        ("stock forward", {"fast": False, "prefix": False}),
        ("own forward + prefix cache", {"fast": True, "prefix": True}),
    ):
        try:
            configure(**cfg)
            prof.profile(batch)
            sync()
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
            with profile(activities=acts) as tr:
                t1 = time.perf_counter()
                prof.profile(batch)
                sync()
                wall = time.perf_counter() - t1
            res["trace"][name] = kernel_summary(tr, wall)
            log(f"trace {name}: {res['trace'][name]['classes_s']}, idle {res['trace'][name]['idle_fraction']}")
        except Exception as e:
            res["trace"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    write_compare(res, out_dir)

    # ---------------------------------------------------------------- torch.compile (irreversible: last)
    if not args.skip_compile:
        try:
            prof.compile = "text"
            prof._apply_compile()
            row("own forward + prefix cache + compile (decoder layers)", "compile: first call", fast=True, prefix=True)
            prof.compile = "all"
            for blk in prof.model.model.visual.blocks:
                blk.compile()
            row("own forward + prefix cache + compile (decoder layers + vision blocks)", "", fast=True, prefix=True)
            row("all together: + compile (all) + prompt before the image", "another computation (fingerprinted)",
                fast=True, prefix=True, before=True)  # fmt: skip
        except Exception as e:
            res["compile_error"] = f"{type(e).__name__}: {e}"[:300]
            log(f"compile: FAILED {res['compile_error']}")
    configure(fast=True, prefix=True)
    res["total_s"] = round(time.perf_counter() - T_START, 1)
    write_compare(res, out_dir, final=True)


def e2e(res: dict[str, Any], prof: Any, configure: Any, n: int, bs: int, size: int, log: Any) -> None:
    """End to end through ``precompute``: PNG files -> decode, hash, look up, profile, write; before and after."""
    from PIL import Image

    from monai_vlmfilm.profiles.cli import precompute
    from monai_vlmfilm.profiles.store import ProfileStore

    work = Path(tempfile.mkdtemp(prefix="e2e_"))
    rng = np.random.default_rng(11)
    paths = []
    for i in range(n + bs):
        p = work / "img" / f"img_{i:05d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(angiogram_like(rng, size).astype(np.uint8)).save(p, compress_level=1)
        paths.append(str(p))
    warm, paths = paths[:bs], paths[bs:]  # one batch of other images warms each run up (not counted)
    res["e2e"] = {"images": n, "batch": bs, "rows": []}
    for label, prefetch, cfg in (
        ("before: read each batch, then profile; stock forward", 0, {"fast": False, "prefix": False}),
        ("after: read-ahead + own forward + prefix cache", 4, {"fast": True, "prefix": True}),
    ):
        configure(**cfg)
        cache = work / f"cache_{prefetch}"
        precompute(warm, ProfileStore(cache), prof, bs, progress=False, prefetch=prefetch)
        sync()
        t0 = time.perf_counter()
        out = precompute(paths, ProfileStore(cache), prof, bs, progress=False, prefetch=prefetch)
        sync()
        secs = time.perf_counter() - t0
        new = out["new"]
        r = {"config": label, "new": new, "cached": out["cached"], "s": round(secs, 2),
             "images_per_s": round(new / secs, 2) if secs > 0 else None}  # fmt: skip
        res["e2e"]["rows"].append(r)
        log(f"end to end {label}: {r}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)


def write_compare(res: dict[str, Any], out_dir: Path, final: bool = False) -> None:
    """``gpu_profiler_compare.md`` / ``.json`` (rewritten after every row, so a cut-off run leaves its rows)."""
    (out_dir / "gpu_profiler_compare.json").write_text(json.dumps(res, indent=2, default=str))
    L = [
        f"# Profiler, scored mode, before/after (issue 17): {res['arch']}, {res['image_size']}x{res['image_size']}, "
        f"{res['dtype']}, batch {res.get('batch')}",
        "",
        f"Device: {res['device']}; torch {res['torch']}; transformers {res['transformers']}; {res['date']}",
        f"Command: `{res['command']}`; matmul rate {res.get('tflops_matmul')} TFLOP/s; load {res.get('load_s')} s; "
        f"tokens {res.get('tokens')}; load-time check {res.get('fast_path_check')}",
        "",
        "| config | images/s | x stock | max abs diff vs stock | s / batch | first call s | peak GiB | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        if "error" in r:
            L.append(f"| {r['config']} | FAILED: {r['error']} | | | | | | |")
            continue
        L.append(
            f"| {r['config']} | {r['images_per_s']} | {r['speedup_vs_stock']} | {r['max_abs_diff_vs_stock']} | "
            f"{r['median_s_per_batch']} | {r['first_call_s']} | {r['peak_gib']} | {r['note']} |"
        )
    e2e = res.get("e2e")
    if e2e:
        L += ["", f"End to end through `precompute` ({e2e['images']} PNGs, batch {e2e['batch']}, fresh cache; "
              "decode + hash + preprocessing + model + cache write):", ""]  # fmt: skip
        L += [f"- {r['config']}: {r['images_per_s']} images/s ({r['new']} new in {r['s']} s)" for r in e2e["rows"]]
    if res.get("e2e_error"):
        L.append(f"- end to end not measured: {res['e2e_error']}")
    for name, tr in (res.get("trace") or {}).items():
        if "error" in tr:
            L += ["", f"Trace ({name}): FAILED {tr['error']}"]
            continue
        L += [
            "",
            f"Trace of one batch ({name}): wall {tr['wall_s']} s, {tr['unit']} {tr['busy_s']} s, "
            f"device idle {tr['idle_fraction']}; by class: "
            + ", ".join(f"{k} {v}" for k, v in tr["classes_s"].items()),
            "",
            "| kernel / op | s | calls |",
            "|---|---:|---:|",
        ]
        L += [f"| `{t['name']}` | {t['s']} | {t['calls']} |" for t in tr["top"]]
    for k in ("compile_error",):
        if res.get(k):
            L.append(f"- {k}: {res[k]}")
    L.append(f"- total run time {res.get('total_s', '(running)')} s" + ("" if final else " (partial)"))
    (out_dir / "gpu_profiler_compare.md").write_text("\n".join(L) + "\n")
    if final:
        print("\n".join(L))


def write_report(res: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "gpu_profiler_throughput.json").write_text(json.dumps(res, indent=2))
    lines = [
        f"# Profiler throughput: {res['arch']}, {res['image_size']}x{res['image_size']} images, {res['dtype']}",
        "",
        f"Device: {res['device']}; torch {res['torch']}; transformers {res['transformers']}; {res['date']}",
        f"Command: `{res['command']}`; matmul rate {res['tflops_matmul']} TFLOP/s; "
        f"load {res.get('load_s')} s; vision attention {res.get('vision_attention')}",
        "",
        "| config | batch | s / batch (median) | images/s | peak GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['median_s_per_batch']} | {r['images_per_s']} | {r['peak_gib']} |"
        )
    e2e, fl = res.get("scored_end_to_end", {}), res.get("floor", {})
    lines += [
        "",
        f"- scored end to end over {e2e.get('images')} images at batch {e2e.get('batch')}: "
        f"{e2e.get('images_per_s')} images/s",
        f"- floor: {fl.get('gflop_total')} GFLOP/image (vision {fl.get('gflop_vision')}, prefill "
        f"{fl.get('gflop_text_prefill')}; {fl.get('text_tokens')} tokens) at the matmul rate = "
        f"{fl.get('images_per_s_at_matmul_rate')} images/s; best scored reaches "
        f"{fl.get('best_scored_fraction_of_floor')} of it",
        f"- best scored vs stock recipe: {res.get('speedup_best_scored_vs_stock')}x; targets: {res.get('targets')}",
        f"- generate-mode fallback rate (random weights): {res.get('generate_fallback_rate_random_weights')}",
        f"- flash attention 2: {res.get('flash_attention_2', res.get('flash_attention_2_error', 'measured above'))}",
        f"- total run time {res.get('total_s')} s",
    ]
    (out_dir / "gpu_profiler_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
