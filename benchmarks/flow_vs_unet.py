"""The flow model against a plain MONAI ``BasicUNet`` on real angiograms, everything else equal, in one run.

    # on the GPU machine (data copied to .carry/data, MONAI / ignite wheels in .whl; see benchmarks/BENCHMARKS.md):
    python benchmarks/flow_vs_unet.py --settings dca1_cv,xcad_cv --models unet,flow-m --seeds 0 --iterations 3000
    python benchmarks/flow_vs_unet.py --settings dca1_to_xcad,xcad_to_dca1 --models unet,flow-m --seeds 0,1,2
    python benchmarks/flow_vs_unet.py --plan "ship=flow-m-ep1;xcad_cv=flow-m-ep1" --folds 2,3,4  # + the bundle's model
    python benchmarks/flow_vs_unet.py --smoke                                      # CPU, tiny sizes, a few min
    python benchmarks/flow_vs_unet.py --summarise benchmarks/results/flow_vs_unet_jobs.jsonl   # tables from results

Both models get exactly the same recipe: ``--iterations`` AdamW steps of ``--batch`` crops of ``--crop``², vessel-aware
(half centred on a vessel pixel), with flips / rot90 / affine / gamma / noise / blur (:class:`GPUAugment`, a batched
GPU version of the bundle's MONAI ``train#random_transforms``), warm-up + cosine learning rate,
gradient clipping at 1, EMA weights (evaluated), bf16 autocast; whole-image evaluation with the dihedral test-time
augmentation (8 copies), and the threshold chosen on the job's own training images. The UNet: ``BasicUNet`` (2.0 M
parameters), ``DiceCELoss`` on a sigmoid output. The flow: :class:`~monai_vlmfilm.networks.FiLMFlowUNet` trained with
``FlowMatchingPrepareBatch(target="flow", endpoint_fraction=0.5)`` + :class:`~monai_vlmfilm.losses.FlowSegLoss` and
segmented by :class:`~monai_vlmfilm.inferers.FlowSegInferer` (1 Euler step, 1 sample), FiLM on with heuristic profiles
of the unaugmented images (normalised with the training images' statistics) unless the model name ends in ``:off``.

Settings: ``dca1_cv`` / ``xcad_cv`` (5-fold cross-validation over all images, folds fixed by seed 0),
``mixed_cv`` (both sites in one model: fold f of each site held out together, results per site),
``dca1_to_xcad`` / ``xcad_to_dca1`` (train on every image of one site, test on every image of the other),
``ship`` (train on both sites' ``training`` splits, report each site's ``validation`` split with uncertainty-map
figures, save the EMA weights as float16 shards ``model_ship_<model>_s<seed>.<i>.pt``). Models: ``unet``,
``flow-s`` / ``flow-m`` / ``flow-l`` (FiLM on), ``flow-m-ep1`` (flow-m trained with every crop at the endpoint, the
bundle's recipe since 0.5.0), ``flow-me`` (flow-m + ``ImageSkipEncoder``), ``flow-m5`` (five levels), with ``:off``
(no FiLM), ``:shuffle`` (each image gets another image's profile of the same split), ``:sshuffle`` (another image's
profile of the same site: the mixed-site control that keeps site information) or ``:trainprof`` (trained
as on; each test image gets a random training image's profile: in-distribution values, no information on the image) and ``@N`` (N iterations instead of
``--iterations``); recipe modifiers after the name, for both kinds (``unet+zi``, ``flow-m-ep1+n:off``): ``+z`` zoom
0.5-1.8x, ``+i`` wide intensity augmentation, ``+n`` z-scored input (see :class:`GPUAugment`), ``+d`` (flow only)
condition dropout 0.5 (``FiLMFlowUNet(profile_dropout=0.5)``), ``+j`` (flow only) profile jitter 0.5
(``FiLMFlowUNet(profile_noise=0.5)``), ``+g`` (flow only) no difficulty gate, ``+u`` (flow
only) profiles not normalised, ``+e`` (flow only) FiLM on the encoder blocks too, ``+p`` a plain
UNet's probability map as an extra input channel (nested out-of-fold for the training images; the UNets run first as
``prior`` jobs, kept in ``--prior-dir`` and reused: see :func:`prior_jobs`; a ``+p`` flow also records
``dice_start0.7`` / ``0.5`` / ``0.3``: one Euler step from its prior at that fraction of T, with noise of that time,
``FlowSegInferer(start_time=s)``, meant for flows trained at intermediate times, not ``-ep1``); cross-site jobs also
record the diagnostics ``dice_tscale`` (test image resized to the training site's vessel width) and ``dice_tnorm``
(its intensity statistics mapped to the training images'); ``--plan`` gives each group of settings its own models, ``--folds`` keeps some CV folds only.
A call on ``nvidia-h200-x2`` trains about 58 flow-m iterations/s summed over all jobs: keep a plan under about
25,000 iterations per 9-minute call (jobs that miss the deadline are lost). Jobs run in parallel, ``--workers`` processes per GPU. Per-image results stream to
``$OUT/jobs.jsonl``; ``summary.md`` / ``summary.json`` hold per-setting means and paired bootstrap 95 % CIs
(``summary_pairs.png`` plots the CIs)
(flow − UNet, per image, seeds averaged first) from :mod:`monai_vlmfilm.ablation.stats`; ``latency.json`` the
inference latency of both models measured before training starts (batch 1, bf16, idle GPU).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import re
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the z-score FiLMFlowUNet(image_norm=True) applies inside itself; "+n" applies it outside for the UNet
from monai_vlmfilm.networks.flow_unet import zscore_channels  # noqa: E402

SITES = ("dca1", "xcad")
FLOW_CONFIGS: dict[str, dict[str, Any]] = {
    # the 0.1 bundle's channel plan (1.1 M parameters, 2 downsamplings)
    "flow-s": {"channels": [32, 64, 64], "num_res_blocks": 1, "norm_num_groups": 32},
    # 4 levels, 3 downsamplings
    "flow-m": {"channels": [32, 64, 128, 256], "num_res_blocks": 1, "norm_num_groups": 32},
    # 4 levels, 2 residual blocks per level
    "flow-l": {"channels": [32, 64, 128, 256], "num_res_blocks": 2, "norm_num_groups": 32},
    # flow-m + a BasicUNet-style image encoder feeding the skips (ImageSkipEncoder)
    "flow-me": {
        "channels": [32, 64, 128, 256],
        "num_res_blocks": 1,
        "norm_num_groups": 32,
        "image_encoder_channels": [32, 32, 64, 128],
    },
    # 5 levels, 4 downsamplings like BasicUNet
    "flow-m5": {"channels": [32, 64, 128, 256, 256], "num_res_blocks": 1, "norm_num_groups": 32},
    # flow-m trained at the endpoint only (every sample at s = 1, the one-step inference regime)
    "flow-m-ep1": {"channels": [32, 64, 128, 256], "num_res_blocks": 1, "norm_num_groups": 32, "endpoint": 1.0},
}
# recipe modifiers after a model name ("unet+zi"): GPUAugment keyword arguments
# n = z-score each crop / image before the network (what BasicUNet's first instance norm does to its input); for the
# flow network this is FiLMFlowUNet(image_norm=True), the bundle's option (session 7's runs z-scored outside it)
AUG_MODIFIERS: dict[str, dict[str, Any]] = {
    "z": {"zoom": (0.5, 1.8)},
    "i": {"intensity": True},
    "n": {"znorm": True},
    # d = condition dropout: half of the training samples get the mean profile (FiLMFlowUNet(profile_dropout=0.5))
    "d": {"profile_dropout": 0.5},
    # j = profile jitter: Gaussian noise of half the training profiles' spread on each training sample's profile
    # (FiLMFlowUNet(profile_noise=0.5)); tests whether one-site FiLM's cost is the decoder memorising images by profile
    "j": {"profile_noise": 0.5},
    # g = no difficulty gate (FiLMFlowUNet(use_difficulty_gate=False)): on the synthetic 0.6 recipe it gained
    # +0.18 (heuristic) / +0.24 (oracle) Dice points over the gate the bundle ships (ablation/synthetic_06_recipe, 3 seeds)
    "g": {"no_gate": True},
    # p = a supervised prior (issue 14 item 5): a plain `unet`'s probability map as an extra input channel, out of fold
    # for every training image (nested: its UNet never saw that image nor the job's test images), from a UNet trained
    # on all the job's training images for the test images; the UNets run as "prior" jobs first (see prior_jobs)
    "p": {"prior": True},
    # u = unnormalised profiles: the FiLM encoder sees the raw features, not z-scores of the training images' (issue 16:
    # every real-site run before had them normalised; on synthetic images normalising gained +0.53, synthetic_06_recipe)
    "u": {"raw_profiles": True},
    # e = FiLM on every encoder block too (FiLMFlowUNet(film_encoder_stages=all)); synthetic: -0.32 Dice against the
    # bundle's decoder-only FiLM, with fewer specks (ablation/synthetic_06_where)
    "e": {"film_encoder": True},
}
PROFILE_ONLY_MODIFIERS = (
    "profile_dropout",
    "profile_noise",
    "no_gate",
    "raw_profiles",
    "film_encoder",
)  # nothing to act on in a UNet
PRIOR_MODEL = "unet"  # the recipe of the UNets behind "+p" priors: the bar itself
# per-image figures only some jobs have: two Euler steps (flow), prior starts (+p flows), uncertainty maps (ship jobs)
# a +p flow also starts from its prior at these fractions of T (FlowSegInferer(start_time=s), issue 14 item 5)
PRIOR_START_TIMES = (0.7, 0.5, 0.3)
EXTRA_METRICS = ("dice_2step", "dice_tscale", "dice_tnorm") + tuple(f"dice_start{s:.1f}" for s in PRIOR_START_TIMES)
EXTRA_METRICS += tuple(f"unc_{m}_{u}" for u in ("samples", "tta", "pq") for m in ("auroc", "dice_keep95", "mean"))
THRESHOLDS = [round(0.2 + 0.05 * i, 2) for i in range(15)]  # 0.20 .. 0.90 (the UNet chose 0.75, the old top, on XCAD)


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ data
def data_root(arg: str | None) -> Path:
    for cand in [arg, os.environ.get("VLMFILM_DATA"), ROOT / ".carry" / "data", ROOT.parent / "shared" / "data"]:
        if cand and (Path(cand) / "dca1" / "datalist.json").is_file():
            return Path(cand)
    raise FileNotFoundError("no data root with dca1/datalist.json: pass --data (e.g. ../shared/data)")


def centre_crop(a: np.ndarray, side: int) -> np.ndarray:
    """The central ``side`` x ``side`` window of a 2-D array (a side shorter than ``side`` is kept whole)."""
    y, x = (max(0, (n - side) // 2) for n in a.shape[:2])
    return a[y : y + side, x : x + side]


def load_site(root: Path, site: str, names: set[str] | None = None) -> list[dict[str, Any]]:
    """Every image of a site (or those in ``names``): ``{"name", "site", "split", "image" (float32 HxW in [0, 1]),
    "mask" (uint8 HxW)}``."""
    from monai_vlmfilm.data.datalist import mask_threshold, read_array

    doc = json.loads((root / site / "datalist.json").read_text())
    out = []
    for split in ("training", "validation", "test"):
        for item in doc.get(split, []):
            if names is not None and f"{site}/{Path(item['image']).stem}" not in names:
                continue
            img = read_array(root / site / item["image"]).astype(np.float32)
            img = img.mean(-1) if img.ndim == 3 else img
            lo, hi = float(img.min()), float(img.max())
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)  # ScaleIntensity
            m = read_array(root / site / item["label"])
            m = m.max(-1) if m.ndim == 3 else m
            mask = (m > mask_threshold(m)).astype(np.uint8)
            out.append(
                {"name": f"{site}/{Path(item['image']).stem}", "site": site, "split": split, "image": img, "mask": mask}
            )
    return out


def folds(n: int, k: int = 5, seed: int = 0) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(perm[i::k]) for i in range(k)]


def plan_jobs(data: dict[str, list], settings: list[str], models: list[str], seeds: list[int]) -> list[dict]:
    """``[{setting, fold, seed, model, train: [names], test: [names]}]`` in plan order (see :func:`order_jobs`)."""
    jobs = []
    for setting in settings:
        splits: list[tuple[int, list[str], list[str]]] = []
        if setting == "mixed_cv":  # both sites in one model, folds stratified by site (fold f of each site)
            site_folds = {site: folds(len(data[site])) for site in SITES}
            for f in range(5):
                test = {data[site][i]["name"] for site in SITES for i in site_folds[site][f]}
                names = [d["name"] for site in SITES for d in data[site]]
                splits.append((f, [n for n in names if n not in test], sorted(test)))
        elif setting.endswith("_cv"):
            items = data[setting[: -len("_cv")]]
            for f, idx in enumerate(folds(len(items))):
                test = {items[i]["name"] for i in idx}
                splits.append((f, [d["name"] for d in items if d["name"] not in test], sorted(test)))
        elif "_to_" in setting:
            src, dst = setting.split("_to_")
            splits.append((0, [d["name"] for d in data[src]], [d["name"] for d in data[dst]]))
        elif setting == "ship":
            both = data["dca1"] + data["xcad"]
            splits.append(
                (
                    0,
                    [d["name"] for d in both if d["split"] == "training"],
                    [d["name"] for d in both if d["split"] != "training"],
                )
            )
        else:
            raise ValueError(f"unknown setting {setting!r}")
        for fold, train, test in splits:
            for seed in seeds:
                for model in models:
                    jobs.append(
                        {"setting": setting, "fold": fold, "seed": seed, "model": model, "train": train, "test": test}
                    )
    return jobs


def order_jobs(jobs: list[dict], seeds: list[int], max_jobs: int = 0) -> list[dict]:
    """The jobs one call runs, in the order they start.

    Seed-major: a call that cannot finish the whole plan completes whole replicates (``--seeds 1,2`` runs every job
    of seed 1 before any of seed 2), and ``--skip-done`` picks up the rest in the next call. ``max_jobs`` keeps the
    first jobs of that order. Within the call the flows start before the UNets: they take about three times as long,
    so each worker gets one flow first (the GPUs share them evenly) and a deadline costs at most a few cheap UNets.

    Args:
        jobs: from :func:`plan_jobs`, in plan order.
        seeds: the ``--seeds`` order.
        max_jobs: keep at most this many (0: all).
    """
    jobs = sorted(jobs, key=lambda j: seeds.index(j["seed"]))  # stable: plan order within a seed
    if max_jobs:
        jobs = jobs[:max_jobs]
    return sorted(jobs, key=lambda j: j["model"].startswith("unet"))


def fold_index(data: dict[str, list]) -> dict[str, int]:
    """Each image's cross-validation fold, as :func:`plan_jobs` draws them (per site, seed 0)."""
    return {data[site][i]["name"]: f for site in SITES for f, idx in enumerate(folds(len(data[site]))) for i in idx}


def uses_prior(model: str) -> bool:
    """Whether a model name carries the ``+p`` modifier (``"flow-m-ep1+np:off@2000"``)."""
    name = model.partition("@")[0].partition(":")[0]
    return "p" in "".join(name.split("+")[1:])


def prior_key(train: list[str], seed: int, args: dict) -> str:
    """The name of a prior UNet: a hash of everything that makes it (its training images, seed and recipe)."""
    spec = {"model": PRIOR_MODEL, "train": sorted(train), "seed": seed}
    spec.update({k: args[k] for k in ("iterations", "batch", "crop", "lr", "ema")})
    if args.get("image_side"):  # (only when set: the keys of full-size priors stay what they were)
        spec["image_side"] = args["image_side"]
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prior_jobs(jobs: list[dict], fold_of: dict[str, int], args: dict) -> list[dict]:
    """The UNet jobs behind the ``+p`` jobs' priors; sets ``job["priors"] = {image: prior key}`` on each ``+p`` job.

    Nested out-of-fold priors: a training image of fold ``g`` gets the map of a UNet trained on the job's training
    images outside fold ``g`` (so neither that image nor the job's test images), a test image the map of a UNet
    trained on all the job's training images (the bar's own model). UNets that several jobs need run once: the one
    without folds ``{j, k}`` serves outer fold ``k``'s images of fold ``j`` and outer fold ``j``'s of fold ``k``, and a
    cross-site job's inner UNets are the source site's cross-validation UNets. Each prior job predicts the union of
    the images its key serves.
    """
    needed: dict[str, dict] = {}

    def need(train: list[str], names: list[str], seed: int, mapping: dict[str, str]) -> None:
        key = prior_key(train, seed, args)
        entry = needed.setdefault(
            key,
            {"setting": "prior", "fold": -1, "seed": seed, "model": PRIOR_MODEL, "prior_key": key,
             "train": sorted(train), "test": set()},
        )  # fmt: skip
        entry["test"].update(names)
        mapping.update(dict.fromkeys(names, key))

    for job in jobs:
        if not uses_prior(job["model"]):
            continue
        job["priors"] = {}
        need(job["train"], job["test"], job["seed"], job["priors"])
        train = job["train"]
        for g in sorted({fold_of[n] for n in train}):
            need(
                [n for n in train if fold_of[n] != g], [n for n in train if fold_of[n] == g], job["seed"], job["priors"]
            )
    return [{**e, "test": sorted(e["test"])} for e in needed.values()]


def _prior_file(prior_dir: Path, key: str) -> Path:
    return Path(prior_dir) / f"prior_{key}.npz"


def prior_names(prior_dir: Path, key: str) -> set[str]:
    """The images a stored prior holds (empty when there is none or it cannot be read: then it is made again)."""
    try:
        with np.load(_prior_file(prior_dir, key)) as z:
            return set(z["names"].tolist())
    except Exception:  # a missing or damaged file is never trusted
        return set()


def save_prior(prior_dir: Path, key: str, probs: dict[str, np.ndarray]) -> None:
    """Probability maps as uint8 (1/255 steps), written to a temporary file and renamed: a reader never sees half."""
    names = sorted(probs)
    arrays = {f"p{i}": np.clip(np.rint(probs[n] * 255), 0, 255).astype(np.uint8) for i, n in enumerate(names)}
    tmp = _prior_file(prior_dir, key).with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, names=np.array(names), **arrays)
    os.replace(tmp, _prior_file(prior_dir, key))


def load_priors(prior_dir: Path, mapping: dict[str, str]) -> dict[str, np.ndarray]:
    """``{image: float32 probability map}`` for every image of ``mapping`` (``{image: prior key}``)."""
    out: dict[str, np.ndarray] = {}
    for key in sorted(set(mapping.values())):
        with np.load(_prior_file(prior_dir, key)) as z:
            names = z["names"].tolist()
            for i, n in enumerate(names):
                if mapping.get(n) == key:
                    out[n] = z[f"p{i}"].astype(np.float32) / 255
    missing = sorted(set(mapping) - set(out))
    if missing:
        raise FileNotFoundError(f"priors in {prior_dir} lack {len(missing)} image(s), e.g. {missing[:3]}")
    return out


# ------------------------------------------------------------------------------------------------ recipe
class GPUAugment:
    """Batched training augmentation on the GPU, the equivalent of the bundle's MONAI ``train#random_transforms``.

    MONAI's dictionary transforms work one sample at a time; at 16 concurrent jobs per machine their per-sample
    Python cost starved the GPUs (a first run finished no job in 8 minutes), so the benchmark applies the same
    operations to the whole batch at once: ``RandCropByPosNegLabeld`` (centre on a vessel pixel with probability
    ``pos_prob``, else anywhere), ``RandFlipd`` on both axes, ``RandRotate90d``, ``RandAffined`` (rotation +-15 deg,
    scale +-15 %, reflection padding, p 0.3), ``RandAdjustContrastd`` (gamma 0.7-1.5, p 0.5), ``RandGaussianNoised``
    (std 0.03, p 0.2) and ``RandGaussianSmoothd`` (sigma 0.25-1, p 0.15).

    Two wider variants for the cross-site question (``+z`` / ``+i`` after a model name; ``+n`` z-scores each crop, and
    the Predictor each whole image, before the network): ``zoom`` ``(lo, hi)`` draws
    a log-uniform scale per sample with probability 0.5 and crops ``crop / scale`` pixels that are resized to ``crop``
    (so vessels come out ``scale`` times as wide, with no padded border); ``intensity`` widens the gamma range to
    0.4-2.5 (p 0.8) and adds a random linear contrast (x 0.6-1.4 about 0.5) and brightness (+-0.2) shift (p 0.8).
    ``priors`` (``+p``): a probability map per image that takes every spatial step with its image and none of the
    intensity ones, appended as a second channel ``2 p - 1``.
    """

    def __init__(
        self,
        images: list[torch.Tensor],
        masks: list[torch.Tensor],
        crop: int,
        seed: int,
        pos_prob: float = 0.5,
        zoom: tuple[float, float] | None = None,
        intensity: bool = False,
        znorm: bool = False,
        priors: list[torch.Tensor] | None = None,
    ):
        self.images, self.masks, self.crop, self.pos_prob = images, masks, crop, pos_prob
        self.priors = priors  # per image, a probability map cropped and moved with it: channel 2 of x, as 2 p - 1
        self.zoom, self.intensity, self.znorm = zoom, intensity, znorm
        # [N, 2] vessel pixel coordinates per image, and the per-sample choices below, live on the host: reading them
        # from the GPU would sync once per sample and step, which stalls a job that has a GPU to itself
        self.fg = [torch.nonzero(m > 0.5).cpu().numpy() for m in masks]
        self.device = images[0].device
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)
        self.host_rng = np.random.default_rng(seed)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen, device=self.device)

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.nn.functional as F

        c0, imgs, labs, prs = self.crop, [], [], []
        u = self.host_rng.random((len(rows), 6))
        for k, r in enumerate(rows):
            img, m = self.images[r], self.masks[r]
            if self.priors is not None:  # cropped, resampled and turned as the image: a third stacked plane
                m = torch.stack([m, self.priors[r]])
            h, w = img.shape
            scale = 1.0
            if self.zoom and u[k, 4] < 0.5:
                lo, hi = math.log(self.zoom[0]), math.log(self.zoom[1])
                scale = math.exp(lo + (hi - lo) * float(u[k, 5]))
            c = max(8, round(c0 / scale))  # the region that becomes one crop
            if u[k, 0] < self.pos_prob and len(self.fg[r]):
                cy, cx = (int(v) for v in self.fg[r][int(u[k, 1] * len(self.fg[r]))])
            else:
                cy, cx = int(u[k, 1] * h), int(u[k, 2] * w)
            y0 = min(max(cy - c // 2, 0), max(h - c, 0))
            x0 = min(max(cx - c // 2, 0), max(w - c, 0))
            ci, cm = img[y0 : y0 + c, x0 : x0 + c], m[..., y0 : y0 + c, x0 : x0 + c]
            if ci.shape != (c, c):  # smaller than the crop: pad like SpatialPadd
                ph, pw = c - ci.shape[0], c - ci.shape[1]
                ci, cm = F.pad(ci, (0, pw, 0, ph)), F.pad(cm, (0, pw, 0, ph))
            if c != c0:  # zoom: resample the region to the crop size (area for the mask, then re-binarised)
                ci = F.interpolate(ci[None, None], size=(c0, c0), mode="bilinear", antialias=c > c0)[0, 0]
                cm3 = cm.reshape(-1, 1, c, c)
                cz = F.interpolate(cm3, size=(c0, c0), mode="area" if c > c0 else "bilinear")[:, 0]
                cz[0] = (cz[0] > 0.5).float()  # the mask is re-binarised, a prior stays a probability
                cm = cz.reshape(cm.shape[:-2] + (c0, c0))
            kk = int(u[k, 3] * 8)  # dihedral element: rot90 k times, then an optional flip (flips x rot90)
            ci, cm = torch.rot90(ci, kk % 4, (-2, -1)), torch.rot90(cm, kk % 4, (-2, -1))
            if kk >= 4:
                ci, cm = ci.flip(-2), cm.flip(-2)
            imgs.append(ci)
            if self.priors is not None:
                cm, cp = cm[0], cm[1]
                prs.append(cp)
            labs.append(cm)
        x, y = torch.stack(imgs)[:, None], torch.stack(labs)[:, None].float()
        pr = torch.stack(prs)[:, None] if prs else None
        b = x.shape[0]
        # RandAffined: rotation and isotropic scale, reflection padding
        on = (self._rand(b) < 0.3).float()
        ang = (self._rand(b) * 2 - 1) * 0.26 * on
        sc = 1 + (self._rand(b) * 2 - 1) * 0.15 * on
        cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
        theta = torch.stack(
            [torch.stack([cos, -sin, torch.zeros_like(cos)], 1), torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        y = F.grid_sample(y, grid, mode="nearest", padding_mode="reflection", align_corners=False)
        if pr is not None:
            pr = F.grid_sample(pr, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        # RandAdjustContrastd (gamma on the [0, 1] image)
        if self.intensity:  # wider: gamma 0.4-2.5 (log-uniform), then contrast about 0.5 and brightness
            on = (self._rand(b) < 0.8).float()
            gam = torch.exp(on * (math.log(0.4) + (math.log(2.5) - math.log(0.4)) * self._rand(b)))
            x = x.clamp(0, 1) ** gam.view(b, 1, 1, 1)
            on = (self._rand(b) < 0.8).float().view(b, 1, 1, 1)
            a = 1 + on * (self._rand(b).view(b, 1, 1, 1) * 0.8 - 0.4)
            sh = on * (self._rand(b).view(b, 1, 1, 1) * 0.4 - 0.2)
            x = ((x - 0.5) * a + 0.5 + sh).clamp(0, 1)
        else:
            gam = torch.where(self._rand(b) < 0.5, 0.7 + 0.8 * self._rand(b), torch.ones(b, device=self.device))
            x = x.clamp(0, 1) ** gam.view(b, 1, 1, 1)
        # RandGaussianSmoothd: a separable Gaussian of a per-sample sigma
        sig_host = np.where(self.host_rng.random(b) < 0.15, 0.25 + 0.75 * self.host_rng.random(b), 0.0)
        if (sig_host > 0).any():  # decided on the host: no GPU sync
            sig = torch.as_tensor(sig_host, device=self.device, dtype=x.dtype)
            t = torch.arange(-3, 4, device=self.device, dtype=x.dtype)
            ker = torch.exp(-(t[None] ** 2) / (2 * sig.clamp_min(1e-3)[:, None] ** 2))
            ker = torch.where((sig > 0)[:, None], ker, (t[None] == 0).to(x.dtype))
            ker = ker / ker.sum(1, keepdim=True)
            xs = x.transpose(0, 1)  # [1, B, H, W]: one group per sample
            xs = F.conv2d(F.pad(xs, (3, 3, 0, 0), mode="reflect"), ker[:, None, None, :], groups=b)
            xs = F.conv2d(F.pad(xs, (0, 0, 3, 3), mode="reflect"), ker[:, None, :, None], groups=b)
            x = xs.transpose(0, 1)
        # RandGaussianNoised
        nz = (self._rand(b) < 0.2).float().view(b, 1, 1, 1) * 0.03
        x = x + nz * torch.randn(x.shape, generator=self.gen, device=self.device)
        if self.znorm:
            x = zscore_channels(x)
        if pr is not None:
            x = torch.cat([x, 2 * pr.to(x.dtype) - 1], 1)
        return x.contiguous(), (y > 0.5).float()


def build_model(model: str, profile_dim: int) -> tuple[torch.nn.Module, dict]:
    from monai.networks.nets import BasicUNet

    from monai_vlmfilm.networks import FiLMFlowUNet

    name, _, mode = model.partition(":")
    name, *mods = name.split("+")  # "flow-m-ep1+zi": recipe modifiers, z = wide zoom, i = wide intensity
    unknown = set("".join(mods)) - set(AUG_MODIFIERS)
    if unknown:
        raise ValueError(f"unknown recipe modifier(s) {sorted(unknown)} in {model!r}")
    aug = {k: v for m in "".join(mods) for k, v in AUG_MODIFIERS[m].items()}
    prior = bool(aug.pop("prior", False))  # one more input channel; the prior itself is never augmented in intensity
    if name == "unet":
        if set(PROFILE_ONLY_MODIFIERS) & set(aug):
            raise ValueError(f"{model!r}: the UNet has no profile, so no condition dropout, gate or FiLM modifiers")
        net = BasicUNet(spatial_dims=2, in_channels=1 + prior, out_channels=1)
        return net, {"kind": "unet", "divisible_by": 16, "aug": aug, "prior": prior}
    cfg = dict(FLOW_CONFIGS[name])
    # the flow network z-scores inside itself, as the bundle's `image_norm: true` does; with a prior channel, which
    # must not be z-scored, the image is z-scored outside (the same operation, session 7's runs did it that way)
    if not prior and aug.pop("znorm", False):
        cfg["image_norm"] = True
    for key in ("profile_dropout", "profile_noise"):  # network arguments, not augmentations
        if key in aug:
            cfg[key] = aug.pop(key)
    gate = not aug.pop("no_gate", False)  # likewise
    if aug.pop("film_encoder", False):
        cfg["film_encoder_stages"] = list(range(len(cfg["channels"])))
    raw_profiles = bool(aug.pop("raw_profiles", False))  # read by profile_normalization
    recipe = {k: cfg.pop(k) for k in ("endpoint",) if k in cfg}  # training settings, not network arguments
    net = FiLMFlowUNet(
        spatial_dims=2,
        in_channels=2 + prior,
        out_channels=1,
        attention_levels=[False] * len(cfg["channels"]),
        use_flash_attention=True,
        use_vlm_film=mode != "off",
        cond_dim=128,
        film_hidden_dim=128,
        use_difficulty_gate=gate,
        profile_dim=profile_dim,
        **cfg,
    )
    return net, {
        "kind": "flow",
        "mode": mode or "on",
        "divisible_by": 2 ** (len(cfg["channels"]) - 1),
        "use_difficulty_gate": gate,
        "raw_profiles": raw_profiles,
        "aug": aug,
        "prior": prior,
        **cfg,
        **recipe,
    }


def in_folds(row: dict, folds: str) -> bool:
    """Whether a job or result row is kept by ``--folds`` (``"0,1"``): CV rows of those folds, and every row of a
    setting without folds."""
    return not row.get("setting", "").endswith("_cv") or row.get("fold") in {int(f) for f in folds.split(",")}


def profile_normalization(info: dict, p_train: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The (mean, std) the FiLM encoder z-scores profiles with: the training images' statistics, as the bundle's
    ``train.yaml`` does since 0.6.1; None (raw features) for a ``+u`` model."""
    if info.get("raw_profiles"):
        return None
    return p_train.mean(0), np.maximum(p_train.std(0), 1e-3)


def off_twin(model: str) -> str:
    """The FiLM-off run that ``model`` (FiLM on) is compared with: itself with ``:off``, less the modifiers that act
    only through FiLM (``PROFILE_ONLY_MODIFIERS``: with FiLM off they change nothing), so ``"flow-m+nj"`` ->
    ``"flow-m+n:off"`` and ``"flow-m+e"`` -> ``"flow-m:off"``."""
    base, _, mods = model.partition("+")
    mods = "".join(c for c in mods if not (c in AUG_MODIFIERS and set(AUG_MODIFIERS[c]) <= set(PROFILE_ONLY_MODIFIERS)))
    return f"{base}{'+' + mods if mods else ''}:off"


def modifier_refs(model: str) -> list[str]:
    """The model names with one recipe modifier fewer, when it has two or more: ``"flow-m+nd:off"`` ->
    ``["flow-m+d:off", "flow-m+n:off"]``."""
    name, sep, mode = model.partition(":")
    base, _, mods = name.partition("+")
    if len(mods) < 2:
        return []
    return [f"{base}+{mods[:i] + mods[i + 1 :]}{sep}{mode}" for i in range(len(mods))]


def within_site_permutation(profiles: np.ndarray, items: list[dict], rng: np.random.Generator) -> np.ndarray:
    """``profiles`` permuted among the images of each site: site information stays, per-image information goes."""
    out = profiles.copy()
    sites = np.array([d["site"] for d in items])
    for site in np.unique(sites):
        idx = np.flatnonzero(sites == site)
        out[idx] = profiles[rng.permutation(idx)]
    return out


def vessel_width(masks: list[np.ndarray]) -> float:
    """Median over images of mask area / skeleton length: the typical vessel width in pixels."""
    from skimage.morphology import skeletonize

    return float(np.median([m.sum() / max(1, skeletonize(m > 0).sum()) for m in masks]))


def profiles_of(items: list[dict]) -> np.ndarray:
    from monai_vlmfilm.profiles import HeuristicProfiler

    return np.stack([p.to_vector() for p in HeuristicProfiler().profile([d["image"] for d in items])]).astype(
        np.float32
    )


def dice(p: np.ndarray, g: np.ndarray) -> float:
    s = p.sum() + g.sum()
    return float(2 * (p & g).sum() / s) if s else 1.0


@functools.cache
def _skimage_has_max_size() -> bool:
    """scikit-image 0.26 renamed ``remove_small_objects``' ``min_size`` (smaller than) to ``max_size`` (up to)."""
    import inspect

    from skimage.morphology import remove_small_objects

    return "max_size" in inspect.signature(remove_small_objects).parameters


def drop_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """``mask`` without its connected components of fewer than ``min_size`` pixels (what the bundle's
    ``RemoveSmallObjectsd`` does), without the deprecation warning of scikit-image 0.26's ``min_size``."""
    from skimage.morphology import remove_small_objects

    if not mask.any():
        return mask
    if _skimage_has_max_size():
        return remove_small_objects(mask, max_size=min_size - 1)
    return remove_small_objects(mask, min_size=min_size)


def image_metrics(prob: np.ndarray, gt: np.ndarray, thr: float, min_size: int) -> dict[str, float]:
    from monai_vlmfilm.metrics import betti_numbers, cldice_score

    gt = gt.astype(bool)
    pred = prob >= thr
    bg = betti_numbers(gt)
    bp = betti_numbers(pred)
    cc = drop_small(pred, min_size)
    bc = betti_numbers(cc)
    return {
        "dice": dice(pred, gt),
        "cldice": cldice_score(pred, gt),
        "b0_err": abs(bp[0] - bg[0]),
        "b1_err": abs(bp[1] - bg[1]),
        "dice_cc": dice(cc, gt),
        "cldice_cc": cldice_score(cc, gt),
        "b0_err_cc": abs(bc[0] - bg[0]),
        "b1_err_cc": abs(bc[1] - bg[1]),
    }


# ------------------------------------------------------------------------------------------------ one job
class Predictor:
    """Whole-image foreground probability of a trained model, with or without the dihedral TTA."""

    def __init__(self, net: torch.nn.Module, info: dict, device: torch.device, amp: bool):
        from monai_vlmfilm.inferers import FlowSegInferer, dihedral_transforms, pad_to_multiple

        self.net, self.info, self.device, self.amp = net, info, device, amp
        self.prior: np.ndarray | None = None  # a +p model's prior of the image predicted next
        self._tta, self._pad = dihedral_transforms, pad_to_multiple
        self._make = lambda tta, steps, samples, unc, start: FlowSegInferer(
            num_steps=steps,
            num_samples=samples,
            tta=tta,
            divisible_by=info["divisible_by"],
            seed=0,
            return_uncertainty=unc,
            start_time=start,
        )

    @torch.no_grad()
    def __call__(
        self,
        image: np.ndarray,
        profile: np.ndarray | None,
        tta: str,
        steps: int = 1,
        samples: int = 1,
        uncertainty: bool = False,
        start: float = 1.0,
    ) -> Any:
        """Foreground probability ``HxW``; with ``uncertainty`` the pair (probability, per-pixel std over the TTA
        copies x noise samples). A ``+p`` model reads the image's UNet probability map from ``self.prior``; with
        ``start`` < 1 a flow starts from that map at ``t = start * T`` instead of from noise at ``T``."""
        x = torch.as_tensor(image, device=self.device)[None, None]
        if self.info.get("aug", {}).get("znorm"):
            x = zscore_channels(x)
        if (self.info.get("prior") or start < 1) and self.prior is None:
            raise ValueError("a +p model, and a start from the prior, need the image's prior (Predictor.prior)")
        prior = None if self.prior is None else torch.as_tensor(self.prior, device=self.device)[None, None].float()
        if self.info.get("prior"):  # the TTA moves it with the image: it is one more image channel
            x = torch.cat([x, 2 * prior.to(x.dtype) - 1], 1)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.info["kind"] == "flow":
                p = None if profile is None else torch.as_tensor(profile, device=self.device)[None]
                init = prior if start < 1 else None
                out = self._make(tta, steps, samples, uncertainty, start)(x, self.net, profile=p, init=init).float()
                prob, std = out[:, :1], out[:, 1:]
            else:
                outs = []
                for fwd, inv in self._tta(2, tta):
                    xp, crop = self._pad(fwd(x), self.info["divisible_by"])
                    outs.append(inv(torch.sigmoid(self.net(xp).float())[tuple(crop)]))
                prob, std = torch.stack(outs).mean(0), torch.stack(outs).std(0, unbiased=False)
        prob_np = prob[0, 0].float().cpu().numpy()
        return (prob_np, std[0, 0].float().cpu().numpy()) if uncertainty else prob_np


def run_job(job: dict, data_root_: str, args: dict) -> dict:
    """Train one model on one split and evaluate it; returns per-image records."""
    gpu = int(os.environ.get("JOB_GPU", "0"))
    torch.set_num_threads(max(1, int(args.get("threads", 2))))
    device = torch.device(f"cuda:{gpu}" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from monai_vlmfilm.engines import FlowMatchingPrepareBatch
    from monai_vlmfilm.losses import FlowSegLoss

    t0 = time.perf_counter()
    set_determinism(seed=job["seed"])
    if device.type == "cuda":
        # set_determinism selects cuDNN's deterministic kernels, several times slower for these convolutions; the
        # GPU runs are not bit-reproducible anyway (atomics in the backward pass), seeds give the comparison
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    root = Path(data_root_)
    items = {d["name"]: d for s in SITES for d in load_site(root, s, set(job["train"]) | set(job["test"]))}
    if args.get("image_side"):  # --smoke: centre crops, so CPU tests evaluate 128² instead of 300²-512² images
        for d in items.values():
            d["image"], d["mask"] = (centre_crop(d[k], args["image_side"]) for k in ("image", "mask"))
    train = [items[n] for n in job["train"]]
    is_prior_job = job["setting"] == "prior"  # a UNet whose product is the maps of job["test"], not metrics
    test = [items[n] for n in job["test"]][: None if is_prior_job else (args.get("max_test") or None)]
    spec, _, iters_override = job["model"].partition("@")  # "flow-m@6000": this job trains 6,000 iterations
    net, info = build_model(spec, profile_dim=args["profile_dim"])
    net = net.to(device)
    prior_dir = Path(args.get("prior_dir") or Path(args["out"]) / "priors")
    pri = load_priors(prior_dir, job["priors"]) if info.get("prior") else {}
    use_profile = info["kind"] == "flow" and info["mode"] != "off"
    p_train = profiles_of(train) if use_profile else None
    p_test = profiles_of(test) if use_profile else None
    if use_profile and info["mode"] == "shuffle":  # the same profiles, each on another image
        rng = np.random.default_rng(1000 + job["seed"])
        p_train, p_test = p_train[rng.permutation(len(p_train))], p_test[rng.permutation(len(p_test))]
    if use_profile and info["mode"] == "sshuffle":  # each image gets another image's profile of the same site
        rng = np.random.default_rng(1000 + job["seed"])
        p_train, p_test = within_site_permutation(p_train, train, rng), within_site_permutation(p_test, test, rng)
    if use_profile and info["mode"] == "trainprof":  # trained as "on"; each test image gets a training image's profile
        p_test = p_train[np.random.default_rng(2000 + job["seed"]).integers(0, len(p_train), len(p_test))]
    norm = profile_normalization(info, p_train) if use_profile else None
    if norm is not None:
        net.profile_encoder.set_normalization(*norm)

    aug = GPUAugment(
        [torch.as_tensor(d["image"], device=device) for d in train],
        [torch.as_tensor(d["mask"], device=device, dtype=torch.float32) for d in train],
        args["crop"],
        seed=job["seed"],
        priors=[torch.as_tensor(pri[d["name"]], device=device) for d in train] if pri else None,
        **info.get("aug", {}),
    )

    iters, bs = int(iters_override or args["iterations"]), args["batch"]
    opt = torch.optim.AdamW(net.parameters(), lr=args["lr"], weight_decay=1e-4)
    warm = max(1, int(0.03 * iters))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(i, iters) / iters)))
    )
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(args["ema"]), use_buffers=True)
    if info["kind"] == "unet":
        seg_loss = DiceCELoss(sigmoid=True)
    else:
        prep = FlowMatchingPrepareBatch(
            timestep_sampling="logit-normal",
            endpoint_fraction=info.get("endpoint", args["endpoint"]),
            target="flow" if args["objective"] != "velocity" else "velocity",
        )
        flow_loss = FlowSegLoss(
            velocity_weight=1.0,
            seg_weight=0.0 if args["objective"] == "velocity" else 1.0,
            cldice_weight=args["cldice"],
        )
    rng = np.random.default_rng(job["seed"])
    net.train()
    losses = []
    for it in range(iters):
        rows = rng.integers(0, len(train), size=bs)
        img, lab = aug(rows)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if info["kind"] == "unet":
                loss = seg_loss(net(img).float(), lab)
            else:
                batch = {"image": img, "label": lab}
                if use_profile:
                    batch["vlm_profile"] = torch.as_tensor(p_train[rows], device=device)
                inputs, target, _, kw = prep(batch, device)
                loss = flow_loss(net(inputs, **kw), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update_parameters(net)
        if it % 100 == 0:
            losses.append(round(float(loss.detach()), 5))
        if it and it % args.get("log_every", 500) == 0:
            log(
                f"{job['setting']} f{job['fold']} s{job['seed']} {job['model']}: it {it} loss {losses[-1]} "
                f"{it / (time.perf_counter() - t0):.1f} it/s"
            )
    train_s = time.perf_counter() - t0
    model = ema.module.eval()
    if job["setting"] == "ship" and args.get("out"):  # saved before evaluation: a deadline must not lose it
        save_shards(
            model, Path(args["out"]) / f"model_ship_{re.sub(r'[^A-Za-z0-9_.-]', '_', job['model'])}_s{job['seed']}"
        )
    predict = Predictor(model, info, device, amp)
    if is_prior_job:  # the maps, written before anything else can fail; no metrics (the test set is not one)
        save_prior(prior_dir, job["prior_key"], {d["name"]: predict(d["image"], None, "dihedral") for d in test})
        out = job_row(job)
        return {**out, "n_train": len(train), "n_pred": len(test), "info": info, "iterations": iters,
                "train_s": round(train_s, 1), "total_s": round(time.perf_counter() - t0, 1), "gpu": gpu}  # fmt: skip

    # threshold on the job's own training images (never the test images)
    thr_rows = range(0, len(train), max(1, len(train) // args["thr_images"]))
    probs = []
    for i in thr_rows:
        predict.prior = pri.get(train[i]["name"])
        probs.append(predict(train[i]["image"], None if p_train is None else p_train[i], "dihedral"))
    gts = [train[i]["mask"].astype(bool) for i in thr_rows]
    thr_scores = {t: float(np.mean([dice(p >= t, g) for p, g in zip(probs, gts)])) for t in THRESHOLDS}
    thr = max(thr_scores, key=thr_scores.get)
    cross = "_to_" in job["setting"] and not pri  # (the diagnostics would need resized priors too)
    if cross:
        # diagnostics of what the other site's images lack (not a method: the scale uses the test masks):
        # dice_tscale resizes each test image so its vessels are as wide as the training site's, dice_tnorm maps
        # its intensity mean / std to the training images'
        zoom = vessel_width([d["mask"] for d in train]) / vessel_width([d["mask"] for d in test])
        mu_tr = float(np.mean([d["image"].mean() for d in train]))
        sd_tr = float(np.mean([d["image"].std() for d in train]))
    records = []
    for i, d in enumerate(test):
        prof = None if p_test is None else p_test[i]
        predict.prior = pri.get(d["name"])  # every prediction below of this image gets its prior (+p models)
        prob = predict(d["image"], prof, "dihedral")
        rec = {
            "image": d["name"],
            "site": d["site"],
            "thr": thr,
            **image_metrics(prob, d["mask"], thr, args["min_size"]),
        }
        rec["dice_t05"] = dice(prob >= 0.5, d["mask"].astype(bool))
        prob1 = predict(d["image"], prof, "none")
        rec["dice_notta"] = dice(prob1 >= thr, d["mask"].astype(bool))
        if info["kind"] == "flow":  # two Euler steps (t = T, T/2), no TTA: does the multi-step regime add anything?
            prob2 = predict(d["image"], prof, "none", steps=2)
            rec["dice_2step"] = dice(prob2 >= thr, d["mask"].astype(bool))
            starts = args.get("start_times", PRIOR_START_TIMES) if pri else ()
            for st in starts:  # one Euler step from the prior at t = st * T, TTA as above
                prob_s = predict(d["image"], prof, "dihedral", start=st)
                rec[f"dice_start{st:.1f}"] = dice(prob_s >= thr, d["mask"].astype(bool))
        if cross:
            rec["dice_tscale"] = dice(rescaled_prob(predict, d["image"], prof, zoom) >= thr, d["mask"].astype(bool))
            im = d["image"]
            im_n = np.clip((im - im.mean()) / max(float(im.std()), 1e-6) * sd_tr + mu_tr, 0, 1).astype(np.float32)
            rec["dice_tnorm"] = dice(predict(im_n, prof, "dihedral") >= thr, d["mask"].astype(bool))
        if job["setting"] == "ship":
            rec.update(uncertainty_metrics(predict, d["image"], prof, d["mask"].astype(bool), thr))
        records.append(rec)
    out = job_row(job)
    if pri:
        out["prior_keys"] = sorted(set(job["priors"].values()))
    out.update(
        {
            "n_train": len(train),
            "n_test": len(test),
            "threshold": thr,
            "thr_scores": thr_scores,
            "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
            "info": info,
            "iterations": iters,
            "train_s": round(train_s, 1),
            "total_s": round(time.perf_counter() - t0, 1),
            "losses": losses,
            "records": records,
            "gpu": gpu,
        }
    )
    return out


def rescaled_prob(predict: Any, image: np.ndarray, profile: Any, zoom: float) -> np.ndarray:
    """The probability of ``image`` resized by ``zoom`` (dihedral TTA), resized back to the image's size."""
    import torch.nn.functional as F

    h, w = image.shape
    x = torch.as_tensor(image)[None, None]
    size = (max(16, round(h * zoom)), max(16, round(w * zoom)))
    xs = F.interpolate(x, size=size, mode="bilinear", antialias=zoom < 1)[0, 0].numpy()
    prob = torch.as_tensor(predict(xs, profile, "dihedral"))[None, None]
    return F.interpolate(prob, size=(h, w), mode="bilinear", antialias=zoom > 1)[0, 0].numpy()


def save_shards(model: torch.nn.Module, stem: Path, max_bytes: int = 12 * 2**20) -> None:
    """The EMA weights in float16 shards ``<stem>.<i>.pt`` of at most ``max_bytes`` (the device tool returns files
    up to 16 MB); ``torch.load`` each and merge the dicts, ``load_state_dict`` casts back to float32."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        v = v.half() if v.is_floating_point() else v
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    for i, sd in enumerate(shards):
        torch.save(sd, f"{stem}.{i}.pt")


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` separating ``positive`` pixels (ties averaged), NaN if one class."""
    from scipy.stats import rankdata

    pos = positive.ravel()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(score.ravel())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def uncertainty_metrics(predict: Any, image: np.ndarray, prof: Any, gt: np.ndarray, thr: float) -> dict[str, float]:
    """Does an uncertainty map mark the errors? For three maps (the spread of 4 noise samples, the spread of the 8
    dihedral copies, and p(1 - p) of the TTA mean): the AUROC of pixel errors, and Dice with the 5 % most uncertain
    pixels left out of the count."""
    out: dict[str, float] = {}
    mean_t, std_t = predict(image, prof, "dihedral", uncertainty=True)
    maps = {"tta": std_t, "pq": mean_t * (1 - mean_t)}
    if predict.info["kind"] == "flow":
        maps["samples"] = predict(image, prof, "none", uncertainty=True, samples=4)[1]
    pred = mean_t >= thr
    err = pred != gt
    for name, u in maps.items():
        keep = u < np.quantile(u, 0.95) if u.max() > u.min() else np.ones_like(gt)
        out[f"unc_auroc_{name}"] = _auroc(u, err)
        out[f"unc_dice_keep95_{name}"] = dice(pred & keep, gt & keep)
        out[f"unc_mean_{name}"] = float(u.mean())
    return out


def job_row(job: dict) -> dict:
    """A job's identity for its result row: everything but the image lists (``train``, ``test``, ``priors``)."""
    return {k: v for k, v in job.items() if k not in ("train", "test", "priors")}


def _worker_init(gpu_queue: Any) -> None:
    os.environ["JOB_GPU"] = str(gpu_queue.get())


def _safe_job(job: dict, root: str, args: dict) -> dict:
    try:
        return run_job(job, root, args)
    except Exception:  # one failed job must not take the others with it
        return {
            **job_row(job),
            "error": traceback.format_exc(),
        }


# ------------------------------------------------------------------------------------------------ latency
def _timed(fn: Any, device: torch.device, n: int) -> float:
    """Seconds per call of ``fn`` after 5 warm-up calls (CUDA synchronised)."""
    for _ in range(5):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / n


def latency(
    models: list[str], sizes: list[int], device: torch.device, profile_dim: int, compile_: bool = False
) -> list[dict]:
    """Inference time per image, bf16, whole image, the shipped inferer (1 step, 1 sample): batch 1 with and without
    the dihedral TTA (``ms``), and batch 32 without TTA (``images_per_s``); with ``compile_`` also batch 1 through
    ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), the launch overhead that dominates small batches."""
    from monai_vlmfilm.inferers import FlowSegInferer, pad_to_multiple

    rows = []
    cuda = device.type == "cuda"
    for model in models:
        net, info = build_model(model, profile_dim)
        net = net.to(device).eval()
        pred = Predictor(net, info, device, amp=cuda)
        film = info["kind"] == "flow" and info.get("mode") != "off"
        prof = np.full(profile_dim, 0.5, np.float32) if film else None
        for size in sizes:
            img = np.random.default_rng(0).random((size, size), dtype=np.float32)
            for tta in ("none", "dihedral"):
                ms = 1e3 * _timed(functools.partial(pred, img, prof, tta), device, 30 if cuda else 2)
                rows.append({"model": model, "size": size, "batch": 1, "tta": tta, "ms": round(ms, 2)})
                log(f"latency {rows[-1]}")
            variants = [("eager", net)]
            if compile_ and cuda:
                variants.append(("compiled", torch.compile(net, mode="reduce-overhead", dynamic=False)))
            for batch in (1, 32) if cuda else (1,):
                x = torch.as_tensor(np.stack([img] * batch), device=device)[:, None]
                p = torch.as_tensor(np.stack([prof] * batch), device=device) if film else None
                for variant, module in variants if batch == 1 else variants[:1]:
                    if info["kind"] == "flow":
                        inferer = FlowSegInferer(num_steps=1, num_samples=1, divisible_by=info["divisible_by"], seed=0)

                        def fwd(module=module, inferer=inferer, x=x, p=p):
                            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                                return inferer(x, module, profile=p)
                    else:

                        def fwd(module=module, x=x, div=info["divisible_by"]):
                            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                                xp, crop = pad_to_multiple(x, div)
                                return torch.sigmoid(module(xp).float())[tuple(crop)]

                    sec = _timed(fwd, device, 30 if cuda else 2)
                    rows.append(
                        {
                            "model": model,
                            "size": size,
                            "batch": batch,
                            "tta": "none",
                            "variant": variant,
                            "ms": round(1e3 * sec, 2),
                            "images_per_s": round(batch / sec, 1),
                        }
                    )
                    log(f"latency {rows[-1]}")
    return rows


# ------------------------------------------------------------------------------------------------ summary
def plot_pairs(summary: dict, path: Path) -> None:
    """Forest plot of every paired Dice comparison in ``summary`` (mean and 95 % CI, points): the flow models
    against the UNet on the left; on the right FiLM on against off / shuffled / training-site profiles, and a
    recipe modifier (``+n``, ``+zi``) against the same model without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs_unet, vs_other = "against the UNet", "FiLM on vs off / shuffled; recipe changes"
    rows: dict[str, list[tuple[str, dict]]] = {vs_unet: [], vs_other: []}
    for setting, sites in summary.items():
        for site, d in sites.items():
            for k, v in d.items():
                if " - " not in k:
                    continue
                panel = vs_unet if k.endswith(" - unet") else vs_other
                # one site per setting needs no site name; ship and mixed_cv report two
                one_site = setting.endswith("_to_" + site) or (setting.endswith("_cv") and setting != "mixed_cv")
                where = setting if one_site else f"{setting}, {site}"
                rows[panel].append((f"{where}: {k}", v["dice"]))
    fig, axes = plt.subplots(
        1, 2, figsize=(13, 0.32 * max(len(r) for r in rows.values()) + 1.4), constrained_layout=True
    )
    for ax, (title, items) in zip(axes, rows.items()):
        for y, (_, d) in enumerate(items):
            colour = "tab:green" if d["ci_lo"] > 0 else "tab:red" if d["ci_hi"] < 0 else "tab:gray"
            ax.errorbar(d["mean"], y, xerr=[[d["mean"] - d["ci_lo"]], [d["ci_hi"] - d["mean"]]], fmt="o", color=colour)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(items)), [label for label, _ in items], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("Δ Dice (points), paired bootstrap 95 % CI over images")
        ax.set_title(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# paired per-image differences reported per comparison; Betti-0 after the bundle's small-component removal
# (``min_component_size``) is the topology figure users get, the raw one counts specks the bundle drops
PAIR_METRICS = ("dice", "cldice", "b0_err", "b0_err_cc", "b1_err")


def read_job_rows(path: str | Path) -> list[dict]:
    """The rows of a jobs file this script writes (JSON lines; blank lines skipped).

    Raises:
        SystemExit: a line that is not JSON, named by file and line number.
    """
    path = Path(path)
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{i}: not a JSON line ({e.msg})") from e
    return rows


def summarise(results: list[dict], baseline: str = "unet") -> tuple[dict, str]:
    from monai_vlmfilm.ablation.stats import paired_difference, seeds_in_common

    ok = [r for r in results if "records" in r]
    summary: dict[str, Any] = {}
    lines = [
        "| setting | site | model | n img | Dice | clDice | Betti-0 err | Betti-1 err | Dice, small parts removed | "
        "Betti-0 err, removed | Dice no TTA | jobs |",
        "|" + "---|" * 12,
    ]
    metrics = ("dice", "cldice", "b0_err", "b1_err", "dice_cc", "b0_err_cc", "dice_notta")
    extra_lines = ["", "| setting | site | model | further metric | n img | mean |", "|---|---|---|---|---:|---:|"]
    for setting in sorted({r["setting"] for r in ok}):
        rs = [r for r in ok if r["setting"] == setting]
        for site in sorted({x["site"] for r in rs for x in r["records"]}):
            per_model: dict[str, dict[str, dict[str, float]]] = {}
            # model -> image -> seed -> metric: pairs are compared over the seeds both models ran
            by_seed: dict[str, dict[str, dict[int, dict[str, list[float]]]]] = {}
            for model in sorted({r["model"] for r in rs}):
                acc: dict[str, dict[str, list[float]]] = {}
                for r in rs:
                    if r["model"] != model:
                        continue
                    for x in r["records"]:
                        if x["site"] == site:
                            for m in metrics + tuple(k for k in x if k in EXTRA_METRICS):
                                acc.setdefault(x["image"], {}).setdefault(m, []).append(float(x[m]))
                            per_seed = by_seed.setdefault(model, {}).setdefault(x["image"], {})
                            for m in PAIR_METRICS:  # (a job run twice counts as the mean of its runs)
                                per_seed.setdefault(r["seed"], {}).setdefault(m, []).append(float(x[m]))
                per_model[model] = {img: {m: float(np.nanmean(v)) for m, v in d.items()} for img, d in acc.items()}
                n_jobs = sum(1 for r in rs if r["model"] == model)
                seeds = sorted({r["seed"] for r in rs if r["model"] == model})
                means = {m: float(np.nanmean([d[m] for d in per_model[model].values()])) for m in metrics}
                for m in EXTRA_METRICS:
                    vals = [d[m] for d in per_model[model].values() if m in d]
                    if vals:
                        means[m] = float(np.nanmean(vals))
                        extra_lines.append(
                            f"| {setting} | {site} | {model} | {m} | {len(vals)} | "
                            f"{(100 if 'dice' in m else 1) * means[m]:.{2 if 'dice' in m else 3}f} |"
                        )
                summary.setdefault(setting, {}).setdefault(site, {})[model] = {
                    "n_images": len(per_model[model]),
                    "jobs": n_jobs,
                    "seeds": seeds,
                    **means,
                }
                lines.append(
                    f"| {setting} | {site} | {model} | {len(per_model[model])} | {100 * means['dice']:.2f} | "
                    f"{100 * means['cldice']:.2f} | {means['b0_err']:.1f} | {means['b1_err']:.1f} | "
                    f"{100 * means['dice_cc']:.2f} | {means['b0_err_cc']:.1f} | {100 * means['dice_notta']:.2f} "
                    f"| {n_jobs} |"
                )
            # flow - UNet, and for the profile's worth (issue 16) FiLM on - off and on - shuffled profiles
            pairs = [(m, baseline) for m in per_model if m != baseline and baseline in per_model]
            # (FiLM on against its off twin: "flow-m+nj" - "flow-m+n:off", as with FiLM off jitter, dropout or encoder
            # FiLM change nothing)
            pairs += [
                (m, ref)
                for m in per_model
                if ":" not in m
                for ref in (off_twin(m), *(f"{m}:{v}" for v in ("shuffle", "sshuffle", "trainprof")))
                if ref in per_model
            ]
            # a recipe modifier against the same model without it ("unet+zi" - "unet")
            pairs += [(m, ref) for m in per_model if "+" in m and (ref := re.sub(r"\+[a-z]+", "", m)) in per_model]
            # and each single modifier of a combination against the combination without it ("+nd" - "+n")
            pairs += [
                (m, ref) for m in per_model for ref in modifier_refs(m) if ref in per_model and (m, ref) not in pairs
            ]
            if pairs:
                for model, ref in pairs:
                    common = sorted(set(per_model[model]) & set(per_model[ref]))
                    # per image, the mean over the seeds both models ran (a 3-seed UNet against a 1-seed flow
                    # is compared on seed 0 only), then paired over images
                    both = seeds_in_common(by_seed[model], by_seed[ref])  # (over their shared images, `common`)
                    if not both:  # no seed that both models ran on every shared image: nothing to pair
                        continue
                    diffs: dict[str, Any] = {}
                    for m in PAIR_METRICS:
                        scale = 100 if "dice" in m else 1
                        delta = {
                            i: [
                                scale * (np.mean(by_seed[model][i][sd][m]) - np.mean(by_seed[ref][i][sd][m]))
                                for sd in both
                            ]
                            for i in common
                        }
                        diffs[m] = paired_difference([float(np.nanmean(v)) for v in delta.values()]).to_dict()
                        diffs[m]["per_seed"] = {
                            str(sd): float(np.nanmean([v[k] for v in delta.values()])) for k, sd in enumerate(both)
                        }
                    diffs["seeds"] = both
                    summary[setting][site][f"{model} - {ref}"] = diffs
    diff_lines = [
        "",
        "| setting | site | comparison | seeds | Δ Dice [95 % CI] | Δ Dice per seed | Δ clDice [95 % CI] | "
        "Δ Betti-0 err [95 % CI] | Δ Betti-0 err, small parts removed (as the bundle does) | Δ Betti-1 err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, sites in summary.items():
        for site, d in sites.items():
            for k, v in d.items():
                if " - " in k:
                    cells = [f"{v[m]['mean']:+.2f} [{v[m]['ci_lo']:+.2f}, {v[m]['ci_hi']:+.2f}]" for m in PAIR_METRICS]
                    per_seed = " / ".join(f"{x:+.2f}" for x in v["dice"]["per_seed"].values())
                    seeds = ",".join(map(str, v["seeds"]))
                    cells = [cells[0], per_seed if len(v["seeds"]) > 1 else "", *cells[1:]]
                    diff_lines.append(f"| {setting} | {site} | {k} | {seeds} | " + " | ".join(cells) + " |")
    return summary, "\n".join(lines + diff_lines + (extra_lines if len(extra_lines) > 3 else []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default="dca1_cv,xcad_cv")
    ap.add_argument("--models", default="unet,flow-m")
    ap.add_argument("--seeds", default="0")
    ap.add_argument(
        "--plan",
        default=None,
        help="instead of --settings x --models: groups 'SETTINGS=MODELS;SETTINGS=MODELS', run in this order "
        "(e.g. 'ship=flow-m@6000,unet;xcad_cv=flow-m,unet'; '@N' sets that model's iterations)",
    )
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--endpoint", type=float, default=0.5, help="share of each flow batch trained at t = T")
    ap.add_argument("--objective", default="flowseg", choices=["flowseg", "velocity"])
    ap.add_argument("--cldice", type=float, default=0.0, help="soft-clDice weight in FlowSegLoss")
    ap.add_argument("--min-size", type=int, default=30, help="small-component removal size (pixels) measured")
    ap.add_argument("--thr-images", type=int, default=20, help="training images used to choose the threshold")
    ap.add_argument("--workers", type=int, default=8, help="parallel jobs per GPU")
    ap.add_argument("--log-every", type=int, default=500, help="log each job's loss and speed every N iterations")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--deadline-s", type=float, default=0, help="stop waiting after this many seconds (0: never)")
    ap.add_argument("--latency", action="store_true", help="time inference of every model before training")
    ap.add_argument("--latency-compile", action="store_true", help="--latency also times torch.compile'd models")
    ap.add_argument("--latency-models", default="", help="--latency also times these models (comma-separated)")
    ap.add_argument("--latency-only", action="store_true", help="--latency, then stop (no training)")
    ap.add_argument(
        "--folds",
        default=None,
        help="run (or with --summarise: summarise) only these folds of the CV settings, e.g. 0,1,2",
    )
    ap.add_argument("--data", default=None)
    ap.add_argument(
        "--prior-dir", default=None, help="where +p jobs' prior maps are kept and reused (default: OUT/priors)"
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--max-jobs", type=int, default=0)
    ap.add_argument("--skip-done", nargs="*", default=None, metavar="JOBS_JSONL", help="skip jobs finished there")
    ap.add_argument("--max-train", type=int, default=0, help="train on at most this many images per job (0: all)")
    ap.add_argument(
        "--image-side", type=int, default=0, help="centre-crop every image to this side (0: whole images; --smoke: 128)"
    )
    ap.add_argument("--max-test", type=int, default=0, help="evaluate at most this many test images per job (0: all)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny CPU run: 2 jobs (UNet, flow-s), 10 iterations, 64² crops, 2 test images",
    )
    ap.add_argument(
        "--summarise",
        nargs="+",
        default=None,
        metavar="JOBS_JSONL",
        help="only rebuild summary.md / summary.json from finished runs' jobs.jsonl files",
    )
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    if a.summarise:
        results = [r for f in a.summarise for r in read_job_rows(f)]
        if a.folds:  # CV rows of these folds only (cross-site rows have no folds and stay)
            results = [r for r in results if in_folds(r, a.folds)]
        summary, table = summarise(results)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "summary.json").write_text(json.dumps({"sources": a.summarise, "summary": summary}, indent=1))
        (Path(a.out) / "summary.md").write_text(f"from {', '.join(a.summarise)}\n\n{table}\n")
        plot_pairs(summary, Path(a.out) / "summary_pairs.png")
        print(table)
        return 0
    # jobs finished in earlier runs (for --skip-done), read before the data so a damaged file stops the run at once
    done = {
        (r["setting"], r["fold"], r["seed"], r["model"])
        for f in a.skip_done or []
        for r in read_job_rows(f)
        if "records" in r
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    root = data_root(a.data)
    from monai_vlmfilm.profiles import PROFILE_DIM

    if a.smoke:
        a.iterations, a.batch, a.crop, a.thr_images, a.workers, a.max_test = 10, 2, 64, 2, 1, 2
        a.image_side = a.image_side or 128
        a.max_jobs = a.max_jobs or 2
        a.models = "unet,flow-s"
    data = {s: load_site(root, s) for s in SITES}
    seeds = [int(s) for s in a.seeds.split(",")]
    groups = [g.split("=") for g in a.plan.split(";")] if a.plan else [(a.settings, a.models)]
    jobs = [j for st, md in groups for j in plan_jobs(data, st.split(","), md.split(","), seeds)]
    if a.folds:
        jobs = [j for j in jobs if in_folds(j, a.folds)]
    if a.skip_done:  # resume: jobs already finished in earlier runs are not repeated
        jobs = [j for j in jobs if (j["setting"], j["fold"], j["seed"], j["model"]) not in done]
    jobs = order_jobs(jobs, seeds, a.max_jobs)
    for j in jobs:  # smaller jobs for tests (before the priors are planned: they serve exactly these images)
        j["train"] = j["train"][: a.max_train or None]
        j["test"] = j["test"][: a.max_test or None]
    prior_dir = Path(a.prior_dir) if a.prior_dir else out / "priors"
    args = {
        "iterations": a.iterations,
        "batch": a.batch,
        "crop": a.crop,
        "lr": a.lr,
        "ema": a.ema,
        "endpoint": a.endpoint,
        "objective": a.objective,
        "cldice": a.cldice,
        "min_size": a.min_size,
        "thr_images": a.thr_images,
        "max_test": a.max_test,
        "image_side": a.image_side,
        # --smoke checks the prior start at one time only: each start is 8 TTA passes per image on one CPU core
        "start_times": PRIOR_START_TIMES[1:2] if a.smoke else PRIOR_START_TIMES,
        "log_every": a.log_every,
        "threads": a.threads,
        "profile_dim": PROFILE_DIM,
        "out": str(out),
        "prior_dir": str(prior_dir),
    }
    # the UNets behind "+p" priors run first; a stored prior that holds every image it must is reused
    pjobs = [
        p
        for p in prior_jobs(jobs, fold_index(data), args)
        if not set(p["test"]) <= prior_names(prior_dir, p["prior_key"])
    ]
    if any(uses_prior(j["model"]) for j in jobs):
        prior_dir.mkdir(parents=True, exist_ok=True)
        log(f"+p priors in {prior_dir}: {len(pjobs)} UNet(s) to train")
    n_gpu = torch.cuda.device_count()
    card = torch.cuda.get_device_name(0) if n_gpu else platform.processor() or "cpu"
    meta = {
        "date": datetime.date.today().isoformat(),
        "card": card,
        "n_gpu": n_gpu,
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "args": vars(a),
        "n_jobs": len(jobs),
    }
    log(f"{len(jobs)} jobs on {max(n_gpu, 1)} device(s) [{card}], {a.workers} workers each")
    if a.latency:
        dev = torch.device("cuda:0" if n_gpu else "cpu")
        names = {m.partition("@")[0] for _, md in groups for m in md.split(",")} | set(
            filter(None, a.latency_models.split(","))
        )
        lat = latency(sorted(names), [304, 512], dev, PROFILE_DIM, compile_=a.latency_compile)
        (out / "latency.json").write_text(json.dumps({**meta, "rows": lat}, indent=1))
        if a.latency_only:
            return 0
    # CUDA cannot be used in a forked child, so GPU runs spawn their workers; CPU runs (the smoke tests) fork them,
    # which spares each worker a fresh import of torch and MONAI (about 8 s on the 2-core machine)
    ctx = mp.get_context("spawn" if n_gpu else "fork")
    gpu_q = ctx.Queue()
    n_workers = a.workers * max(n_gpu, 1)
    for i in range(n_workers):
        gpu_q.put(i % max(n_gpu, 1))
    results: list[dict] = []
    n_all = len(jobs) + len(pjobs)
    missing_keys = {p["prior_key"] for p in pjobs}
    # a +p job waits until its priors exist (each job's list is queued in order: prior UNets first)
    waiting = [j for j in jobs if missing_keys & set(j.get("priors", {}).values())]
    with (
        open(out / "jobs.jsonl", "a") as fh,
        ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_worker_init, initargs=(gpu_q,)) as ex,
    ):
        pending = {ex.submit(_safe_job, j, str(root), args) for j in pjobs + [j for j in jobs if j not in waiting]}
        while pending:
            timeout = None if not a.deadline_s else max(1.0, a.deadline_s - (time.perf_counter() - t_start))
            done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            for f in done:
                r = f.result()
                results.append(r)
                fh.write(json.dumps(r) + "\n")
                fh.flush()
                if "error" in r:
                    msg = r["error"].strip().splitlines()[-1:]
                elif "prior_key" in r:
                    msg = f"prior {r['prior_key']}: {r['n_pred']} maps, {r['train_s']} s"
                else:
                    msg = f"dice {np.mean([x['dice'] for x in r['records']]):.4f} thr {r['threshold']} {r['train_s']} s"
                log(f"done {len(results)}/{n_all} {r['setting']} f{r['fold']} s{r['seed']} {r['model']}: {msg}")
                if "prior_key" in r:
                    key = r["prior_key"]
                    for j in [j for j in waiting if key in j["priors"].values()]:
                        if "error" in r:  # its dependants cannot run: recorded as failed, with the reason
                            waiting.remove(j)
                            err = job_row(j)
                            results.append({**err, "error": f"prior {key} failed:\n{r['error']}"})
                            fh.write(json.dumps(results[-1]) + "\n")
                    if "error" not in r:
                        missing_keys.discard(key)
            for j in [j for j in waiting if not missing_keys & set(j["priors"].values())]:
                waiting.remove(j)
                pending.add(ex.submit(_safe_job, j, str(root), args))
            if a.deadline_s and time.perf_counter() - t_start > a.deadline_s and (pending or waiting):
                log(f"deadline: {len(pending)} jobs not finished, {len(waiting)} never started")
                for f in pending:
                    f.cancel()
                for p in list(getattr(ex, "_processes", {}).values()):
                    p.terminate()
                break
    summary, table = summarise(results)
    (out / "summary.json").write_text(
        json.dumps({**meta, "summary": summary, "errors": [r for r in results if "error" in r]}, indent=1)
    )
    (out / "summary.md").write_text(f"{meta['date']}, {card} x{max(n_gpu, 1)}, `{meta['command']}`\n\n{table}\n")
    if summary:
        plot_pairs(summary, out / "summary_pairs.png")
    print(table, flush=True)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
