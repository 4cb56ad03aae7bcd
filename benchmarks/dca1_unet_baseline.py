"""The bar on real angiograms: a plain supervised MONAI ``BasicUNet`` on DCA1, trained for a fixed time budget.

    python benchmarks/dca1_unet_baseline.py                          # one H100: about 1.5 min
    python benchmarks/dca1_unet_baseline.py --flow-seconds 60        # + the bundle's flow network, same data/budget
    python benchmarks/dca1_unet_baseline.py --smoke                  # tiny sizes, CPU is fine

Data: the datalist's ``training`` (60) and ``validation`` (20) images (``--datalist``, default
``.carry/dca1/datalist.json``, else ``../shared/data/dca1/datalist.json``), loaded with the bundle's own
deterministic preprocessing (``validate#preprocessing`` of ``bundle/configs/train.yaml``: LoadImaged,
grayscale, ScaleIntensityd, AsDiscreted), so both models see the same tensors.

Baseline: ``BasicUNet`` (MONAI defaults, 2 output classes), ``DiceCELoss`` (softmax, one-hot), AdamW with
warm-up + cosine learning rate over ``--train-seconds``, bf16 autocast, whole images zero-padded to a
multiple of 16, a random rot90 / flip per image. No model selection on the validation images: the last
weights are evaluated. Reported on the validation images: Dice and clDice (x100, ``monai_vlmfilm.metrics``),
Betti-0 / Betti-1 errors, and ms per image (bf16 forward + argmax; batch 1 latency and batch-20 throughput).

``--flow-seconds S`` also trains the bundle's FiLMFlowUNet (``network_def``, ``--flow-film on`` with heuristic
profiles of the raw images, or ``off``) for S seconds with the same data and augmentation
(``FlowMatchingPrepareBatch``) and evaluates it with the bundle's 4-step Euler and with 4 Heun steps
(whole image), so the two can be compared in one run on one card. Its mid-block attention runs through SDPA
(``use_flash_attention=True``; ``--attention bundle`` keeps the bundle's materialised attention matrix, which at
300 px and batch 20 needs about 20 GB).

Writes ``dca1_unet_baseline.md`` and ``.json`` to ``$OUT`` (default ``./out``); the table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import gpu_film_overhead as gfo  # noqa: E402  (shared timing / bundle-network helpers)

CUDA = gfo.CUDA
CARRIED = ROOT / ".carry" / "dca1" / "datalist.json"
SHARED = ROOT.parent / "shared" / "data" / "dca1" / "datalist.json"
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[dca1 {time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def load_data(datalist: Path, config: str, crop: int | None, limit: tuple[int, int] | None) -> dict[str, Any]:
    """The two splits as ``[N, 1, H, W]`` tensors through the bundle's deterministic preprocessing."""
    from monai_vlmfilm.bundle_utils import load_split
    from monai_vlmfilm.profiles import canonical_image

    parser = gfo.bundle_parser(config, False)
    pre = parser.get_parsed_content("validate#preprocessing")
    out: dict[str, Any] = {}
    for i, split in enumerate(("training", "validation")):
        items = load_split(datalist, split)
        if limit:
            items = items[: limit[i]]
        ds = [pre(dict(it)) for it in items]
        img = torch.stack([torch.as_tensor(d["image"]).float() for d in ds])
        lbl = torch.stack([torch.as_tensor(d["label"]).float() for d in ds])
        if img.shape[1] != 1 or img.shape != lbl.shape:
            raise ValueError(
                f"{datalist}: expected single-channel images and labels of one shape, got {tuple(img.shape)}"
            )
        raw = [canonical_image(it["image"]) for it in items]  # raw pixels, for the heuristic profiler
        if crop:
            h, w = img.shape[2:]
            y0, x0 = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
            img, lbl = img[..., y0 : y0 + crop, x0 : x0 + crop], lbl[..., y0 : y0 + crop, x0 : x0 + crop]
        out[split] = {"image": img, "label": lbl, "raw": raw, "names": [Path(it["image"]).name for it in items]}
    return out


def pad16(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[2:]
    ph, pw = (-h) % 16, (-w) % 16
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)), (h, w)


def unpad(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    h, w = hw
    ph, pw = x.shape[2] - h, x.shape[3] - w
    return x[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]


def augment(img: torch.Tensor, lbl: torch.Tensor, rnd: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """A random rot90 (k in 0..3) and horizontal flip per image, the same for image and label."""
    outs_i, outs_l = [], []
    for i in range(img.shape[0]):
        k, flip = rnd.randrange(4), rnd.random() < 0.5
        a, b = img[i : i + 1], lbl[i : i + 1]
        if k:
            a, b = torch.rot90(a, k, dims=(2, 3)), torch.rot90(b, k, dims=(2, 3))
        if flip:
            a, b = torch.flip(a, dims=(3,)), torch.flip(b, dims=(3,))
        outs_i.append(a)
        outs_l.append(b)
    return torch.cat(outs_i), torch.cat(outs_l)


def seg_metrics(pred: torch.Tensor, lbl: torch.Tensor) -> dict[str, float]:
    """Dice and clDice (x100), Betti-0 / Betti-1 errors of binary ``[N, 1, H, W]`` masks, mean over images."""
    from monai.metrics import DiceMetric

    from monai_vlmfilm.metrics import BettiErrorMetric, ClDiceMetric

    pred, lbl = pred.float().cpu(), lbl.float().cpu()
    dice, cl = DiceMetric(include_background=True), ClDiceMetric()
    b0, b1 = BettiErrorMetric(betti=0), BettiErrorMetric(betti=1)
    for m in (dice, cl, b0, b1):
        m(pred, lbl)
    return {
        "dice": round(100 * float(dice.aggregate()), 2),
        "cldice": round(100 * float(cl.aggregate()), 2),
        "betti0_error": round(float(b0.aggregate()), 2),
        "betti1_error": round(float(b1.aggregate()), 2),
    }


def ms_per_image(fn: Any, n: int, reps: int) -> float:
    for _ in range(2):
        fn()
    gfo.sync()
    return 1e3 * statistics.median(gfo.time_block(fn, reps)) / n


# ------------------------------------------------------------------------------------------------ baseline
def train_unet(data: dict[str, Any], args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, dict]:
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    torch.manual_seed(args.seed)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=args.features).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    img, _ = pad16(data["image"].to(device))
    lbl, _ = pad16(data["label"].to(device))
    n = img.shape[0]
    bs = min(args.batch, n)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    rnd = random.Random(args.seed)
    net.train()
    losses: list[float] = []
    gfo.peak_reset()
    step, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < args.train_seconds:
        frac = elapsed / args.train_seconds
        for g in opt.param_groups:  # warm-up over 3 %, cosine to 5 % of the base rate
            g["lr"] = args.lr * min(1.0, frac / 0.03 + 1e-3) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(n, (bs,), device=device)
        x, y = augment(img[idx], lbl[idx], rnd)
        with gfo.autocast():
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0:  # a sync now and then keeps the time budget honest
            losses.append(loss.detach().item())
            if step % 500 == 0:
                log(f"unet step {step}: loss {np.mean(losses[-10:]):.4f}")
    gfo.sync()
    secs = time.perf_counter() - t0
    net.eval()
    info = {
        "params": sum(p.numel() for p in net.parameters()),
        "features": list(args.features),
        "steps": step,
        "seconds": round(secs, 1),
        "batch": bs,
        "epochs": round(step * bs / n, 1),
        "final_loss": round(float(np.mean(losses[-10:])), 4) if losses else None,
        "lr": args.lr,
        "peak_gib": gfo.peak_gib(),
    }
    return net, info


def eval_unet(net: torch.nn.Module, val: dict[str, Any], device: torch.device, reps: int) -> dict[str, Any]:
    img, hw = pad16(val["image"].to(device))

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), gfo.autocast():
            return net(x).argmax(dim=1, keepdim=True)

    gfo.peak_reset()
    pred = unpad(predict(img), hw)
    out = seg_metrics(pred, val["label"])
    out["inference_peak_gib_batch_all"] = gfo.peak_gib()
    out["ms_per_image_batch1"] = round(ms_per_image(lambda: predict(img[:1]), 1, reps), 3)
    out["ms_per_image_batch_all"] = round(ms_per_image(lambda: predict(img), img.shape[0], reps), 3)
    return out


# ------------------------------------------------------------------------------------------------ flow model
def flow_model(data: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Train the bundle's network with flow matching on the same data; evaluate few-step inference."""
    from monai_vlmfilm.inferers import FlowSegInferer
    from monai_vlmfilm.profiles import HeuristicProfiler

    on = args.flow_film == "on"
    sdpa = True if args.attention == "sdpa" else None
    parser = gfo.bundle_parser(args.config, on, sdpa)
    T = int(parser["num_train_timesteps"])
    prof = {}
    for split in ("training", "validation"):
        profs = HeuristicProfiler().profile(data[split]["raw"])
        prof[split] = torch.from_numpy(np.stack([p.to_vector() for p in profs]).astype(np.float32))
    net = gfo.bundle_network(args.config, on, args.seed, device, sdpa)
    tr_args = argparse.Namespace(train_batch=args.flow_batch, lr=args.flow_lr, train_seconds=args.flow_seconds)
    train = {"image": data["training"]["image"], "label": data["training"]["label"], "vlm_profile": prof["training"]}
    info = gfo.train(net, train, tr_args, parser, device)
    val = data["validation"]
    img, p = val["image"].to(device), prof["validation"].to(device)
    res: dict[str, Any] = {
        "film": args.flow_film,
        "attention": "SDPA (use_flash_attention=True)" if sdpa else "the bundle's setting",
        "params": sum(q.numel() for q in net.parameters()),
        "training": info,
        "rows": [],
    }
    for spec in args.flow_settings.split(","):
        solver, n, k = parse_flow_setting(spec)
        inf = FlowSegInferer(num_steps=n, solver=solver, num_samples=k, num_train_timesteps=T, seed=args.seed)

        def predict(x: torch.Tensor, q: torch.Tensor, inf: FlowSegInferer = inf) -> torch.Tensor:
            with torch.inference_mode(), gfo.autocast():
                return inf(x, net, profile=q) >= 0.5

        label = f"{solver} {n}" + (f" x {k} samples" if k > 1 else "")
        row = {"setting": label, **seg_metrics(predict(img, p), val["label"])}
        row["ms_per_image_batch1"] = round(ms_per_image(lambda: predict(img[:1], p[:1]), 1, args.reps), 3)
        row["ms_per_image_batch_all"] = round(ms_per_image(lambda: predict(img, p), img.shape[0], args.reps), 3)
        res["rows"].append(row)
        log(f"flow {label}: {row}")
    return res


def parse_flow_setting(spec: str) -> tuple[str, int, int]:
    """``"euler4"`` -> ``("euler", 4, 1)``; ``"euler1x8"`` -> ``("euler", 1, 8)`` (8 samples averaged)."""
    s = spec.strip().lower()
    solver = next((x for x in ("euler", "heun") if s.startswith(x)), None)
    if solver is None:
        raise ValueError(f"flow setting {spec!r}: expected euler<N>[x<K>] or heun<N>[x<K>]")
    n, _, k = s[len(solver) :].partition("x")
    return solver, int(n), int(k or 1)


# ------------------------------------------------------------------------------------------------ report
def write_report(res: dict[str, Any], out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dca1_unet_baseline.json").write_text(json.dumps(res, indent=2))
    u = res["unet"]
    tr = res["unet_training"]
    L = [
        "## DCA1: supervised BasicUNet baseline" + (" vs the bundle's flow network" if res.get("flow") else ""),
        "",
        f"Device: {res['device']}; torch {res['torch']}; MONAI {res['monai']}; {res['dtype']}; {res['date']}",
        f"Command: `{res['command']}`; data {res['datalist']} ({res['n_train']} train / {res['n_val']} validation, "
        f"{res['image_shape']}); total {res.get('total_s')} s",
        "",
        "| model | train s / steps / epochs | params | Dice | clDice | Betti-0 err | Betti-1 err | ms/img (b=1) | "
        "ms/img (b=all) | train peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| BasicUNet {tr['features']}, DiceCE | {tr['seconds']} / {tr['steps']} / {tr['epochs']} | {tr['params']:,} | "
        f"{u['dice']} | {u['cldice']} | {u['betti0_error']} | {u['betti1_error']} | {u['ms_per_image_batch1']} | "
        f"{u['ms_per_image_batch_all']} | {tr.get('peak_gib')} |",
    ]
    fl = res.get("flow")
    if fl:
        ft = fl["training"]
        for r in fl["rows"]:
            L.append(
                f"| bundle FiLMFlowUNet (FiLM {fl['film']}, {fl['attention']}), {r['setting']} | {ft['seconds']} / {ft['steps']} / "
                f"{ft['epochs']} | {fl['params']:,} | {r['dice']} | {r['cldice']} | {r['betti0_error']} | "
                f"{r['betti1_error']} | {r['ms_per_image_batch1']} | {r['ms_per_image_batch_all']} | "
                f"{ft.get('peak_gib')} |"
            )
    L += ["", "Dice and clDice x100 on the validation images, last weights (no selection on them)."]
    text = "\n".join(L) + "\n"
    (out_dir / "dca1_unet_baseline.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datalist", default=None, help=f"MONAI datalist (default {CARRIED}, else {SHARED})")
    ap.add_argument("--config", default=str(gfo.DEFAULT_CONFIG), help="bundle config (preprocessing, flow network)")
    ap.add_argument("--out", default=os.environ.get("OUT", "./out"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU ok): check that the script runs")
    ap.add_argument("--train-seconds", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--features", default="32,32,64,128,256,32", help="BasicUNet features (6 integers)")
    ap.add_argument("--flow-seconds", type=float, default=0.0, help="also train the bundle's flow network (0: no)")
    ap.add_argument("--flow-film", choices=("on", "off"), default="on")
    ap.add_argument("--flow-batch", type=int, default=16)
    ap.add_argument(
        "--attention",
        choices=("sdpa", "bundle"),
        default="sdpa",
        help="flow network attention: SDPA (use_flash_attention=True, same weights) or the bundle's setting "
        "(a materialised 75^2 x 75^2 attention matrix per head at 300 px)",
    )
    ap.add_argument("--flow-lr", type=float, default=1e-3)
    ap.add_argument(
        "--flow-settings",
        default="euler4,heun4,euler1x8,euler4x8",
        help="flow inferer settings to evaluate: euler<N>[x<K>] / heun<N>[x<K>] (K samples averaged)",
    )
    ap.add_argument("--reps", type=int, default=20, help="timed repeats for ms per image")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.features = tuple(int(f) for f in args.features.split(","))
    crop, limit = None, None
    if args.smoke:
        args.train_seconds, args.batch, args.features, args.reps = 2.0, 2, (4, 4, 8, 8, 16, 4), 2
        args.flow_seconds = min(args.flow_seconds, 2.0)
        args.flow_batch = 2
        crop, limit = 64, (4, 2)
    if not CUDA:
        torch.set_num_threads(1)  # shared CPU box: spinning OpenMP threads cost far more than they give
    if args.datalist is None:
        args.datalist = str(CARRIED if CARRIED.is_file() else SHARED)
    datalist = Path(args.datalist)
    if not datalist.is_file():
        print(
            f"error: datalist {datalist} does not exist (carry DCA1 to {CARRIED} or pass --datalist)", file=sys.stderr
        )
        return 2
    device = torch.device("cuda:0" if CUDA else "cpu")
    data = load_data(datalist, args.config, crop, limit)
    log(
        f"loaded {len(data['training']['names'])} + {len(data['validation']['names'])} images {tuple(data['training']['image'].shape[2:])}"
    )
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if CUDA else platform.processor() or "cpu",
        "torch": torch.__version__,
        "monai": __import__("monai").__version__,
        "dtype": "bf16 autocast" if CUDA else "float32 (CPU)",
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "datalist": str(datalist),
        "n_train": len(data["training"]["names"]),
        "n_val": len(data["validation"]["names"]),
        "image_shape": list(data["training"]["image"].shape[2:]),
        "smoke": args.smoke,
    }
    net, res["unet_training"] = train_unet(data["training"], args, device)
    log(f"unet trained: {res['unet_training']}")
    res["unet"] = eval_unet(net, data["validation"], device, args.reps)
    log(f"unet: {res['unet']}")
    del net
    write_report(res, Path(args.out))  # the baseline survives a later failure or timeout
    if args.flow_seconds > 0:
        res["flow"] = flow_model(data, args, device)
    res["total_s"] = round(time.perf_counter() - _T0, 1)
    print(write_report(res, Path(args.out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
