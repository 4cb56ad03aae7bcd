"""CPU profiling throughput of QwenVLProfiler with the tiny random Qwen2.5-VL of the tests.

    python benchmarks/bench_profiler_cpu.py [--images N] [--size 256] [--repeats 3] [--json out.json]

Builds the tiny checkpoint offline (tests/tiny_qwen.py), loads it through ``from_pretrained`` like a real
model, and prints a markdown table: images/s for scored vs generate mode at batch 1 and batch 8 (median of
repeats after a warm-up), plus the generate-mode fallback rate (random weights write no valid JSON, so it is
the parser's fallback path). The numbers measure the pipeline's overhead (image preparation, tokens,
batching, read-out), not a real model's compute: see gpu_profiler_throughput.py for the 3B architecture.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_qwen import build_tiny_qwen  # noqa: E402

from monai_vlmfilm.profiles.qwen import QwenVLProfiler  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="images per timed call")
    ap.add_argument("--size", type=int, default=256, help="image side (pixels)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    images = [(rng.random((args.size, args.size)) * 255).astype(np.float32) for _ in range(args.images)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_qwen(Path(tmp) / "tiny")
        for mode in ("scored", "generate"):
            prof = QwenVLProfiler(folder, mode=mode, max_new_tokens=args.max_new_tokens).load()
            for bs in (1, 8):
                prof.batch_size = bs
                prof.profile(images[:bs])  # warm-up
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    prof.profile(images)
                    times.append(time.perf_counter() - t0)
                med = statistics.median(times)
                rows.append(
                    {
                        "mode": mode,
                        "batch": bs,
                        "images_per_s": round(len(images) / med, 2),
                        "ms_per_image": round(1000 * med / len(images), 1),
                        "fallback_rate": round(prof.fallback_rate, 3),
                    }
                )
    info = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "image_size": args.size,
        "images_per_call": args.images,
        "max_new_tokens": args.max_new_tokens,
        "rows": rows,
    }
    print(f"# QwenVLProfiler on CPU, tiny random Qwen2.5-VL, {args.size}x{args.size} images ({info['machine']})\n")
    print("| mode | batch | images/s | ms/image | fallback rate |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['batch']} | {r['images_per_s']} | {r['ms_per_image']} | {r['fallback_rate']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
