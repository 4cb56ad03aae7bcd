"""Where segmentation inference time goes: the shipped flow network (FiLM on / off) against a ``BasicUNet``.

    python benchmarks/seg_inference_profile.py --out benchmarks/results            # CPU (the 2-core machine)
    bash benchmarks/run_gpu.sh benchmarks/seg_inference_profile.py --out "$OUT"    # GPU (bf16 autocast)
    bash benchmarks/run_gpu.sh benchmarks/seg_inference_profile.py --compile --out "$OUT"  # + CUDA graphs, end to end
    bash benchmarks/run_gpu.sh benchmarks/seg_inference_profile.py --compile --sizes 512 --models flow-on,unet --out "$OUT"
    python benchmarks/seg_inference_profile.py --sizes 512 --models flow-on,unet --head-channels 64 --out DIR  # head width

For each model and image size (304², 512²), batch 1, the bundle's inferer defaults (whole image, 1 Euler step,
1 noise sample, no TTA): seconds per image (median of repeats after warm-up), for the eager network, the network in
``channels_last`` memory format, on a CPU with hardware bfloat16 also ``channels_last`` + bf16 autocast (the bundle's
CPU default, ``FlowSegInferer(cpu_bf16=True)``) and, with ``--compile``, the network compiled the way the bundle does
it (``FlowSegInferer(compile_mode=...)``, ``--compile-mode``, default ``reduce-overhead`` on a GPU; the UNet through
``torch.compile`` with the same mode; compile time in the first-call column), each checked
against the eager masks (probability difference and mask agreement). Then a ``torch.profiler`` table of one
512² pass of the flow network (FiLM on): self time per operator class (convolution, normalisation, element-wise,
attention, copies, other) and the top operators. The flow network is the bundle's ``network_def`` from
``inference.yaml`` with ``models/model.pt``; the UNet is a MONAI ``BasicUNet`` (2.0 M parameters, random weights: its
time does not depend on them). Writes ``seg_inference_profile.md`` / ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLASSES = {
    "convolution": ("conv", "mkldnn_convolution", "cudnn", "sm90_xmma", "implicit_gemm", "winograd"),
    "normalisation": ("group_norm", "native_group_norm", "instance_norm", "batch_norm", "layer_norm"),
    "attention": ("attention", "sdpa", "flash", "bmm", "softmax"),
    "element-wise": ("add", "mul", "silu", "sigmoid", "leaky", "relu", "div", "sub", "exp", "cat", "pad", "addcmul"),
    "copy / layout": ("copy", "contiguous", "to", "clone", "empty", "zero", "fill", "upsample", "interpolate"),
}


def op_class(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES.items():
        if any(k in low for k in keys):
            return cls
    return "other"


def shipped_flow(use_vlm_film: bool, device: torch.device, head_channels: int = 0) -> torch.nn.Module:
    """The bundle's network with ``models/model.pt``; ``head_channels`` > 0 regroups its mid-block attention into
    heads of that many channels (the weights fit unchanged, but it is another function: for timing only)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(ROOT / "bundle")
    parser["use_vlm_film"] = use_vlm_film
    if head_channels:
        parser["network_def#num_head_channels"] = head_channels
    net = parser.get_parsed_content("network_def")
    sd = torch.load(ROOT / "bundle" / "models" / "model.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(sd, strict=use_vlm_film)
    return net.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    from monai.networks.nets import BasicUNet

    from monai_vlmfilm.inferers import FlowSegInferer, cpu_has_native_bf16, pad_to_multiple
    from monai_vlmfilm.profiles import DEFAULT_PROFILE

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--sizes", default="304,512")
    ap.add_argument("--repeats", type=int, default=0, help="timed passes per row (default 5 on CPU, 30 on GPU)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd networks")
    ap.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of --compile (default: reduce-overhead, i.e. CUDA graphs, on a GPU; default on a CPU)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument(
        "--models",
        default="flow-on,flow-off,unet",
        help="which of flow-on, flow-off, unet to time (flow-on is always loaded: the trace is of it)",
    )
    ap.add_argument(
        "--head-channels",
        type=int,
        default=0,
        help="also time the FiLM-on network with its mid-block attention in heads of this many channels (the "
        "shipped model has DiffusionModelUNet's default 8; the weights fit any width, the masks differ: timing only)",
    )
    a = ap.parse_args(argv)
    wanted = set(a.models.split(","))
    if unknown := wanted - {"flow-on", "flow-off", "unet"}:
        ap.error(f"--models: unknown {sorted(unknown)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    reps = a.repeats or (30 if cuda else 5)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cuda)
    profile = torch.as_tensor(DEFAULT_PROFILE.to_vector(), device=device)[None]
    torch.manual_seed(0)
    unet = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1).to(device).eval()

    # the bundle's CPU default where the CPU computes bf16 in hardware: FlowSegInferer(cpu_bf16=True)
    cpu_bf16 = not cuda and cpu_has_native_bf16()
    compile_mode = a.compile_mode or ("reduce-overhead" if cuda else "default")

    def flow_fn(net, bf16=False, compile_mode=None):
        # the product path: FlowSegInferer's own cpu_bf16 / compile_mode, as inference.yaml sets them
        inf = FlowSegInferer(
            num_steps=1, num_samples=1, divisible_by=8, seed=0, cpu_bf16=bf16, compile_mode=compile_mode
        )

        def run(x):
            with torch.no_grad(), torch.autocast(**amp):
                return inf(x, net, profile=profile if net.use_vlm_film else None).float()

        return run

    def unet_fn(net, bf16=False, compile_mode=None):
        if compile_mode:
            net = torch.compile(net, mode=compile_mode, dynamic=False)

        def run(x):
            with torch.no_grad(), torch.autocast(**amp), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                xp, crop = pad_to_multiple(x, 16)
                return torch.sigmoid(net(xp).float())[tuple(crop)]

        return run

    flow_on = (shipped_flow(True, device), flow_fn)
    models = {"flow, FiLM on": flow_on} if "flow-on" in wanted else {}
    if "flow-off" in wanted:
        models["flow, FiLM off"] = (shipped_flow(False, device), flow_fn)
    if a.head_channels:
        models[f"flow, FiLM on, {a.head_channels}-channel heads (timing only)"] = (
            shipped_flow(True, device, a.head_channels),
            flow_fn,
        )
    if "unet" in wanted:
        models["BasicUNet"] = (unet, unet_fn)
    rows: list[dict] = []

    def timed(fn, x) -> float:
        for _ in range(2):
            fn(x)
        times = []
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(x)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    for size in [int(s) for s in a.sizes.split(",")]:
        x = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(size)).to(device)
        for name, (net, make) in models.items():
            ref = make(net)(x)
            variants = [("eager", net, False, None)]
            cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
            variants.append(("channels_last", cl, False, None))
            if cpu_bf16:
                variants.append(("channels_last + bf16", cl, True, None))
            if a.compile:
                variants.append((f"compiled ({compile_mode})", copy.deepcopy(net), False, compile_mode))
            for variant, module, bf16, cmode in variants:
                fn = make(module, bf16, cmode)
                t0 = time.perf_counter()
                out = fn(x)
                first = time.perf_counter() - t0
                sec = timed(fn, x)
                row = {
                    "model": name,
                    "size": size,
                    "variant": variant,
                    "s_per_image": round(sec, 4),
                    "first_call_s": round(first, 2),
                    "max_prob_diff": float((out - ref).abs().max()),
                    "mask_agreement": float(((out > 0.5) == (ref > 0.5)).float().mean()),
                }
                rows.append(row)
                print(row, flush=True)

    # where the time goes: one 512² pass of the flow network, FiLM on, eager
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    net, make = flow_on
    fn = make(net)
    x = torch.rand(1, 1, 512, 512).to(device)
    fn(x)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with tprofile(activities=acts) as prof:
        for _ in range(3):
            fn(x)
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    by_class: dict[str, float] = defaultdict(float)
    ops = []
    for ev in prof.key_averages():
        t = getattr(ev, key, 0) / 1e6 / 3
        if t <= 0:
            continue
        by_class[op_class(ev.key)] += t
        ops.append((ev.key, t, ev.count // 3))
    ops.sort(key=lambda r: -r[1])
    total = sum(by_class.values())
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0)
        if cuda
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "rows": rows,
        "trace_512_flow_on": {"total_s": total, "by_class": dict(by_class), "top_ops": ops[:15]},
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seg_inference_profile.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Segmentation inference: where the time goes ({result['device']}, {result['date']})",
        "",
        f"Command: `{result['command']}`; torch {torch.__version__}; batch 1, whole image, 1 step x 1 sample, no TTA.",
        "",
        "| model | size | variant | s / image | first call s | max prob diff vs eager | mask agreement |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['size']} | {r['variant']} | {r['s_per_image']:.4f} | {r['first_call_s']:.2f} | "
        f"{r['max_prob_diff']:.2e} | {r['mask_agreement']:.5f} |"
        for r in rows
    ]
    lines += [
        "",
        f"Trace of one 512² pass, flow FiLM on, eager ({'device' if cuda else 'CPU'} self time, {total:.3f} s):",
        "",
    ]
    lines += ["| operator class | s | share |", "|---|---:|---:|"]
    lines += [f"| {c} | {t:.4f} | {t / total:.0%} |" for c, t in sorted(by_class.items(), key=lambda kv: -kv[1])]
    lines += ["", "| top operators | s | calls |", "|---|---:|---:|"]
    lines += [f"| `{k[:80]}` | {t:.4f} | {n} |" for k, t, n in ops[:15]]
    (out / "seg_inference_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
