"""Does the heuristic profile track how hard an image is to segment? Per-image out-of-fold errors against the profile.

    python benchmarks/profile_vs_error.py --jobs benchmarks/results/flow_vs_unet_jobs.jsonl \\
        --data ../shared/data --out benchmarks/results           # CPU, about 3 minutes

For every image of the DCA1 and XCAD 5-fold cross-validations in ``flow_vs_unet_jobs.jsonl``, and of the two-site
cross-validation (``mixed_cv``, models named ``mixed:<model>``; each image scored by a model that never trained on
it), the segmentation error ``1 - Dice`` of the FiLM-off flow networks and of the ``BasicUNet`` is set against the
image's heuristic raw features (``image_features``: noise, contrast, cnr, ridge, thin, small, clutter), profile
fields (difficulty, confidence, boundary, thin_structure, small_objects, clutter) and candidate statistics the
profile does not have (``candidate_features``: vessel width, wide-structure share, vessel density, black frame,
shading).
Spearman rank correlations per site with a bootstrap 95 % CI over images; a feature that tracks difficulty has
|rho| well above 0 on both sites. Then a difficulty fitted to ``FIT_MODEL``'s error from all the image-only
statistics (:func:`fitted_difficulty`, scored out of sample) against the profile's own difficulty. Then where
FiLM's gain goes (``GAIN_PAIRS``): FiLM on - off and on - site-shuffled per tercile of a real difficulty (the same
setting's UNet error), and the per-image gain's rank correlation with every variable. Writes ``profile_vs_error.{json,md}`` and ``profile_vs_error.png`` (a scatter of
the profile's difficulty, and of the best-tracking raw feature, against the error).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the FiLM-off flow networks (0.4.0 recipe, and 0.5.0's endpoint-1.0 recipe) and the UNet
MODELS = ("flow-m:off", "flow-m-ep1:off", "flow-m-ep1+n:off", "unet", "mixed:flow-m-ep1+n:off")
SITES = ("dca1", "xcad")
# paired comparisons reported per difficulty tercile (issue 16): FiLM's worth, and the flow model against the UNet
TERCILE_PAIRS = (
    ("flow-m", "flow-m:off"),
    ("flow-m", "flow-m:shuffle"),
    ("flow-m", "unet"),
    ("flow-m-ep1", "unet"),
    ("flow-m-ep1", "flow-m-ep1:off"),
    ("flow-m-ep1:off", "unet"),
    # the 0.6.0 network (image_norm) trained on both sites at once: FiLM on - off / - profiles permuted within a site
    ("mixed:flow-m-ep1+n", "mixed:flow-m-ep1+n:off"),
    ("mixed:flow-m-ep1+n", "mixed:flow-m-ep1+n:sshuffle"),
    # ... against the UNet trained the same way (the shipped model's own setting), and without the difficulty gate
    ("mixed:flow-m-ep1+n", "mixed:unet"),
    ("mixed:flow-m-ep1+ng", "mixed:flow-m-ep1+n"),
    # the 0.6.0 network trained on one site
    ("flow-m-ep1+n", "flow-m-ep1+n:off"),
    ("flow-m-ep1+n", "unet"),
    ("flow-m-ep1+n:off", "unet"),
    # a UNet's out-of-fold map as an extra input (issue 14 item 5; folds 0-2 of DCA1, 0-1 of XCAD)
    ("flow-m-ep1+np:off", "unet"),
    ("flow-m-ep1+np:off", "flow-m-ep1+n:off"),
    # FiLM trained with profile jitter / condition dropout (one-site and two-site, seed 0) against off
    ("flow-m-ep1+nj", "flow-m-ep1+n:off"),
    ("flow-m-ep1+nd", "flow-m-ep1+n:off"),
    ("mixed:flow-m-ep1+nj", "mixed:flow-m-ep1+n:off"),
    ("mixed:flow-m-ep1+nd", "mixed:flow-m-ep1+n:off"),
)


CANDIDATE_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# where does FiLM's gain go? Per-image gains of these pairs against every variable, and per tercile of a real
# difficulty: the out-of-fold error of the UNet trained in the same setting (independent of both flow models'
# training noise, unlike the off model's own error, whose noise would enter on - off with the opposite sign)
GAIN_PAIRS = (
    ("mixed:flow-m-ep1+n", "mixed:flow-m-ep1+n:off"),
    ("mixed:flow-m-ep1+n", "mixed:flow-m-ep1+n:sshuffle"),
    ("flow-m-ep1+n", "flow-m-ep1+n:off"),
    ("flow-m-ep1+n", "flow-m-ep1+n:sshuffle"),
    # FiLM on the encoder blocks too (two-site and one-site): against the shipped decoder-only FiLM and against off
    ("mixed:flow-m-ep1+ne", "mixed:flow-m-ep1+n"),
    ("mixed:flow-m-ep1+ne", "mixed:flow-m-ep1+n:off"),
    ("flow-m-ep1+ne", "flow-m-ep1+n:off"),
    # one-site FiLM trained with profile jitter / condition dropout (the memorisation test) against off
    ("flow-m-ep1+nj", "flow-m-ep1+n:off"),
    ("flow-m-ep1+nd", "flow-m-ep1+n:off"),
    ("mixed:flow-m-ep1+nj", "mixed:flow-m-ep1+n:off"),
    ("mixed:flow-m-ep1+nd", "mixed:flow-m-ep1+n:off"),
)
FIT_MODEL = "flow-m-ep1+n:off"  # the model users train on one site (the docs' recommendation), 3 seeds


def candidate_features(image: np.ndarray) -> dict[str, float]:
    """Image statistics the heuristic profile does not have (issue 16 item 2), to see whether any tracks the error
    better: not part of the profile (changing the profile would change what the shipped model was trained on).

    - ``width``: mean log, over centreline-like pixels (the top 2 % of the multi-scale dark-ridge
      response, scales 1-6 px; the flanks of a vessel answer at larger scales), of the scale with the strongest
      response there (for a line of Gaussian profile the scale-normalised response peaks at sqrt(2) x its width):
      how wide the vessels are;
    - ``wide_share``: share of those pixels whose strongest scale is >= 4 px (catheter, wide proximal vessels);
    - ``density``: share of all pixels whose scale-normalised ridge response exceeds 0.02 (how much vessel-like
      structure the image holds, an absolute threshold unlike the top-8 % set);
    - ``frame``: share of the outer 4 % band of pixels within 5 % of the image's dark end (a black collimator frame);
    - ``shading``: std of the image blurred at sigma 32 px over its mean absolute Laplacian-of-Gaussian at 2 px
      (large-scale illumination against vessel-scale detail).
    """
    from scipy import ndimage as ndi

    from monai_vlmfilm.profiles.base import canonical_image
    from monai_vlmfilm.profiles.heuristic import _ridge, _smooth

    x = canonical_image(image).astype(np.float32)
    lo, hi = np.percentile(x, [1, 99])
    xn = np.clip((x - lo) / max(hi - lo, 1e-6), -0.5, 1.5)
    rs = np.stack([_ridge(_smooth(xn, sc), sc) for sc in CANDIDATE_SCALES])
    r = rs.max(0)
    centre = r > max(float(np.percentile(r, 98)), 1e-6)
    best = np.asarray(CANDIDATE_SCALES, dtype=np.float32)[rs[:, centre].argmax(0)] if centre.any() else np.ones(1)
    band = max(1, int(0.04 * min(xn.shape)))
    border = np.concatenate([xn[:band].ravel(), xn[-band:].ravel(), xn[:, :band].ravel(), xn[:, -band:].ravel()])
    detail = float(np.abs(ndi.gaussian_laplace(xn, 2.0)).mean())
    return {
        "width": float(np.log(best).mean()),  # a mean: the median of six discrete scales is constant on XCAD
        "wide_share": float((best >= 4.0).mean()),
        "density": float((r > 0.02).mean()),
        "frame": float((border < 0.05).mean()),
        "shading": float(_smooth(xn, 32.0).std() / max(detail, 1e-6)),
    }


def oof_dice_by_seed(
    jobs_files: list[str], settings: Sequence[str] = ("dca1_cv", "xcad_cv", "mixed_cv")
) -> dict[tuple[str, str], dict[str, dict[int, float]]]:
    """``{(site, model): {image: {seed: Dice}}}`` of every model in the jobs of ``settings`` (by default the
    cross-validations; a job run twice: the mean of its runs); models of the two-site cross-validation (``mixed_cv``)
    are named ``mixed:<model>``. The settings must not share a test site under one model name. Jobs files are read
    through ``flow_vs_unet.read_job_rows``: a damaged line stops with the file and line."""
    from flow_vs_unet import read_job_rows

    acc: dict[tuple[str, str], dict[str, dict[int, list[float]]]] = {}
    for f in jobs_files:
        for r in read_job_rows(f):
            if r.get("setting") not in settings or "records" not in r:
                continue
            model = f"mixed:{r['model']}" if r["setting"] == "mixed_cv" else r["model"]
            for x in r["records"]:
                per_image = acc.setdefault((x["site"], model), {}).setdefault(x["image"], {})
                per_image.setdefault(int(r.get("seed", 0)), []).append(x["dice"])
    return {k: {img: {sd: float(np.mean(v)) for sd, v in d.items()} for img, d in m.items()} for k, m in acc.items()}


def oof_dice(by_seed: dict[tuple[str, str], dict[str, dict[int, float]]]) -> dict[tuple[str, str], dict[str, float]]:
    """``{(site, model): {image: Dice}}``, the mean over every seed run (for the error correlations)."""
    return {k: {img: float(np.mean(list(d.values()))) for img, d in m.items()} for k, m in by_seed.items()}


def oof_errors(dice: dict[tuple[str, str], dict[str, float]]) -> dict[tuple[str, str], dict[str, float]]:
    """``{(site, model): {image: 1 - Dice}}`` of the ``MODELS`` whose errors are set against the profile."""
    return {k: {img: 1.0 - v for img, v in d.items()} for k, d in dice.items() if k[1] in MODELS}


def fitted_rows(errors: dict, per_site: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """:func:`fitted_difficulty` on ``FIT_MODEL``'s errors of both sites, with Spearman CIs per site for the fitted
    scores and for the heuristic profile's difficulty on the same images."""
    names = [(s, n) for s in SITES for n in sorted(set(errors.get((s, FIT_MODEL), {})) & set(per_site.get(s, {})))]
    keys = sorted(k for k in per_site[names[0][0]][names[0][1]] if k.startswith(("feature:", "candidate:")))
    x = np.array([[per_site[s][n][k] for k in keys] for s, n in names])
    y = np.array([errors[(s, FIT_MODEL)][n] for s, n in names])
    site = np.array([s for s, _ in names])
    scores, w = fitted_difficulty(x, y, site)
    out: dict[str, Any] = {"model": FIT_MODEL, "weights": dict(zip(keys, map(float, w))), "sites": []}
    for s in SITES:
        m = site == s
        v1 = np.array([per_site[s][n]["profile:difficulty"] for (ss, n) in names if ss == s])
        out["sites"].append(
            {"site": s, "n": int(m.sum()), "v1": spearman_ci(v1, y[m]), "fitted": spearman_ci(scores[m], y[m])}
        )
    return out


def paired_gains(dice: dict, site: str, a: str, b: str, names: set[str] | None = None) -> dict[str, float]:
    """``{image: Dice(a) - Dice(b)}`` in points, the mean over the seeds both models ran on every image (as
    flow_vs_unet.md pairs them), over the images both have (and in ``names``, when given); ``dice`` is
    :func:`oof_dice_by_seed`'s. Empty when no seed is shared."""
    from monai_vlmfilm.ablation.stats import seeds_in_common

    da, db = dice.get((site, a), {}), dice.get((site, b), {})
    common = sorted(set(da) & set(db) & (set(da) if names is None else set(names)))
    seeds = seeds_in_common({n: da[n] for n in common}, {n: db[n] for n in common})
    if not seeds:
        return {}
    return {n: float(100 * np.mean([da[n][sd] - db[n][sd] for sd in seeds])) for n in common}


def unet_error(dice: dict, site: str, model: str) -> dict[str, float]:
    """Out-of-fold ``1 - Dice`` of the UNet trained in ``model``'s setting (``mixed:unet`` for the two-site models),
    the mean over its seeds: a difficulty measured by a network that shares no training noise with ``model``."""
    key = (site, "mixed:unet" if model.startswith("mixed:") else "unet")
    return {n: 1.0 - float(np.mean(list(d.values()))) for n, d in dice.get(key, {}).items()}


def tercile_rows(
    dice: dict,
    difficulty: dict[str, dict[str, float]] | Callable[[str, str], dict[str, float]],
    pairs: Sequence[tuple[str, str]] = TERCILE_PAIRS,
) -> list[dict]:
    """Paired Dice differences (points, bootstrap 95 % CI) of ``pairs`` per site, overall and per tercile of
    ``difficulty`` (``{site: {image: value}}``, terciles over the images both models have, or a callable
    ``(site, model) -> {image: value}``); ``dice`` is :func:`oof_dice_by_seed`'s."""
    from monai_vlmfilm.ablation.stats import difficulty_terciles, paired_difference

    rows = []
    for site in SITES:
        for a, b in pairs:
            diff_of = difficulty(site, a) if callable(difficulty) else difficulty.get(site, {})
            gains = paired_gains(dice, site, a, b, set(diff_of))
            names = sorted(gains)
            if len(names) < 15:
                continue
            terc = difficulty_terciles([diff_of[n] for n in names])
            diffs = np.array([gains[n] for n in names])
            for t, label in ((None, "all"), (0, "easiest"), (1, "middle"), (2, "hardest")):
                sel = diffs if t is None else diffs[terc == t]
                d = paired_difference(list(sel)).to_dict()
                rows.append({"site": site, "comparison": f"{a} - {b}", "tercile": label, "n": int(len(sel)), **d})
    return rows


def gain_rows(dice: dict, per_site: dict[str, dict[str, dict[str, float]]]) -> list[dict]:
    """Spearman rho [bootstrap 95 % CI] of each ``GAIN_PAIRS`` per-image gain (:func:`paired_gains`) with each image
    variable of ``per_site`` and with the same setting's UNet error (``error:unet``, :func:`unet_error`): does FiLM's
    gain go to the images the profile marks, or to the images that are hard?"""
    rows = []
    for site in SITES:
        for a, b in GAIN_PAIRS:
            gains = paired_gains(dice, site, a, b, set(per_site.get(site, {})))
            if len(gains) < 15:
                continue
            ue = unet_error(dice, site, a)
            for var in [*next(iter(per_site[site].values())), "error:unet"]:
                src = ue if var == "error:unet" else {n: v[var] for n, v in per_site[site].items()}
                names = sorted(set(gains) & set(src))
                v, g = np.array([src[n] for n in names]), np.array([gains[n] for n in names])
                if len(names) < 15 or v.std() == 0:
                    continue
                rho, lo, hi = spearman_ci(v, g)
                rows.append({"site": site, "comparison": f"{a} - {b}", "variable": var, "n": len(names), "rho": rho,
                             "ci_lo": lo, "ci_hi": hi})  # fmt: skip
    return rows


def fitted_difficulty(
    x: np.ndarray, y: np.ndarray, site: np.ndarray, k: int = 5, alpha: float = 10.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-sample difficulty scores from a ridge regression of the error ``y`` on the image features ``x``.

    Nested honestly: the images are split into ``k`` folds (stratified by ``site``); each fold's scores come from a
    model fitted (z-scoring included) on the other folds only, so a score never saw its own image's error. Returns
    (``[n]`` held-out scores, ``[d]`` weights on z-scored features of the model fitted on every image: what a
    heuristic would ship).
    """
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    for s in np.unique(site):
        idx = np.flatnonzero(site == s)
        fold[rng.permutation(idx)] = np.arange(len(idx)) % k

    def fit(xt: np.ndarray, yt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        mu, sd = xt.mean(0), np.maximum(xt.std(0), 1e-9)
        z = (xt - mu) / sd
        w = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (yt - yt.mean()))
        return mu, sd, w, float(yt.mean())

    scores = np.empty(len(y))
    for f in range(k):
        mu, sd, w, b = fit(x[fold != f], y[fold != f])
        scores[fold == f] = (x[fold == f] - mu) / sd @ w + b
    return scores, fit(x, y)[2]


def tercile_table(terciles: list[dict]) -> list[str]:
    """Markdown rows ``| site | comparison | all | easiest | middle | hardest |`` of :func:`tercile_rows`' rows."""
    lines = []
    for site in SITES:
        for comp in dict.fromkeys(r["comparison"] for r in terciles if r["site"] == site):
            cells = [
                next(
                    f"{r['mean']:+.2f} [{r['ci_lo']:+.2f}, {r['ci_hi']:+.2f}] (n {r['n']})"
                    for r in terciles
                    if r["site"] == site and r["comparison"] == comp and r["tercile"] == t
                )
                for t in ("all", "easiest", "middle", "hardest")
            ]
            lines.append(f"| {site} | {comp} | " + " | ".join(cells) + " |")
    return lines


def spearman_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    from scipy.stats import spearmanr

    rho = float(spearmanr(a, b).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(a), len(a))
        r = spearmanr(a[i], b[i]).statistic
        if np.isfinite(r):
            boots.append(r)
    return rho, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", nargs="+", default=[str(ROOT / "benchmarks/results/flow_vs_unet_jobs.jsonl")])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    a = ap.parse_args(argv)
    from tqdm import tqdm

    from monai_vlmfilm.data.datalist import read_array
    from monai_vlmfilm.profiles.heuristic import FEATURES, HeuristicProfiler, image_features

    dice_seeds = oof_dice_by_seed(a.jobs)
    dice = oof_dice(dice_seeds)
    errors = oof_errors(dice)
    prof = HeuristicProfiler()
    fields = ("difficulty", "confidence", "boundary", "thin_structure", "small_objects", "clutter")
    rows, per_site = [], {}
    for site in SITES:
        doc = json.loads((Path(a.data) / site / "datalist.json").read_text())
        items = [it for split in ("training", "validation", "test") for it in doc.get(split, [])]
        feats: dict[str, dict[str, float]] = {}
        for it in tqdm(items, desc=f"features {site}", leave=False, disable=None):
            name = f"{site}/{Path(it['image']).stem}"
            img = read_array(Path(a.data) / site / it["image"])
            f = image_features(img)  # what the profile is made of
            p = prof.profile_from_features(f)
            cand = candidate_features(img)
            feats[name] = {**{f"feature:{k}": f[k] for k in FEATURES}, "profile:difficulty": float(p.difficulty),
                           "profile:confidence": float(p.confidence),
                           **{f"profile:{k}": float(p.focus[k]) for k in fields[2:]},
                           **{f"candidate:{k}": v for k, v in cand.items()}}  # fmt: skip
        per_site[site] = feats
        for model in MODELS:
            err = errors.get((site, model), {})
            names = sorted(set(err) & set(feats))
            if len(names) < 10:
                continue
            e = np.array([err[n] for n in names])
            for key in feats[names[0]]:
                v = np.array([feats[n][key] for n in names])
                rho, lo, hi = spearman_ci(v, e) if v.std() > 0 else (float("nan"),) * 3
                rows.append({"site": site, "model": model, "variable": key, "n": len(names), "rho": rho,
                             "ci_lo": lo, "ci_hi": hi})  # fmt: skip
    meta = {"date": datetime.date.today().isoformat(), "machine": "CPU", "command": " ".join(sys.argv), "jobs": a.jobs}
    difficulty = {site: {n: v["profile:difficulty"] for n, v in feats.items()} for site, feats in per_site.items()}
    terciles = tercile_rows(dice_seeds, difficulty)
    terciles_unet = tercile_rows(dice_seeds, lambda site, model: unet_error(dice_seeds, site, model), GAIN_PAIRS)
    gains = gain_rows(dice_seeds, per_site)
    fitted = fitted_rows(errors, per_site)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_vs_error.json").write_text(
        json.dumps(
            {
                **meta,
                "rows": rows,
                "terciles": terciles,
                "terciles_by_unet_error": terciles_unet,
                "gain_correlations": gains,
                "fitted_difficulty": fitted,
            },
            indent=1,
        )  # fmt: skip
    )
    lines = [
        f"{meta['date']}, `{meta['command']}`",
        "",
        "Spearman rho of each variable with the out-of-fold error 1 - Dice [95 % bootstrap CI]; positive = higher "
        "value, worse segmentation.",
        "",
        "| variable | " + " | ".join(f"{s} {m}" for s in SITES for m in MODELS) + " |",
        "|---|" + "---|" * (len(SITES) * len(MODELS)),
    ]
    for var in dict.fromkeys(r["variable"] for r in rows):
        cells = []
        for s in SITES:
            for m in MODELS:
                r = next((r for r in rows if r["variable"] == var and r["site"] == s and r["model"] == m), None)
                cells.append("–" if r is None else f"{r['rho']:+.2f} [{r['ci_lo']:+.2f}, {r['ci_hi']:+.2f}]")
        lines.append(f"| {var} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired Dice differences (points) [95 % bootstrap CI] per tercile of the heuristic difficulty (5-fold CV, "
        "out of fold):",
        "",
        "| site | comparison | all | easiest third | middle third | hardest third |",
        "|---|---|---|---|---|---|",
    ]
    lines += tercile_table(terciles)
    lines += [
        "",
        "The same comparisons of FiLM per tercile of a real difficulty instead: the out-of-fold error of the UNet "
        "trained in the same setting (`mixed:unet` for the two-site models; the UNet's seeds averaged). The UNet "
        "shares no training noise with either flow model, so unlike the off model's own error this grouping does "
        "not favour on - off in the hardest third by regression to the mean:",
        "",
        "| site | comparison | all | easiest third | middle third | hardest third |",
        "|---|---|---|---|---|---|",
        *tercile_table(terciles_unet),
        "",
        "Where does FiLM's gain go? Spearman rho [95 % bootstrap CI] of the per-image gain (Dice points, seeds both "
        "models ran) with each variable; positive = the gain is larger where the variable is larger. `error:unet` is "
        "the UNet error above. A profile that tells the decoder how to segment this image would show its gain "
        "tracking the profile's fields.",
        "",
        "| variable | "
        + " | ".join(f"{s} {c}" for s, c in dict.fromkeys((r["site"], r["comparison"]) for r in gains))
        + " |",
        "|---|" + "---|" * len(dict.fromkeys((r["site"], r["comparison"]) for r in gains)),
    ]
    cols = list(dict.fromkeys((r["site"], r["comparison"]) for r in gains))
    for var in dict.fromkeys(r["variable"] for r in gains):
        cells = []
        for s_, c in cols:
            r = next((r for r in gains if r["variable"] == var and r["site"] == s_ and r["comparison"] == c), None)
            cells.append("–" if r is None else f"{r['rho']:+.2f} [{r['ci_lo']:+.2f}, {r['ci_hi']:+.2f}]")
        lines.append(f"| {var} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"A difficulty fitted to the error (issue 16 item 2): ridge regression of `{FIT_MODEL}`'s out-of-fold error "
        "on the image-only features above (`feature:*` and `candidate:*`), both sites pooled, scored out of sample "
        "(5 folds stratified by site: an image's score comes from a fit that never saw its error). Spearman rho with "
        "the error, against the heuristic profile's difficulty on the same images:",
        "",
        "| site | images | heuristic difficulty (v1) | fitted, out of sample |",
        "|---|---:|---|---|",
    ]
    for r in fitted["sites"]:
        v1, fit_ = r["v1"], r["fitted"]
        lines.append(
            f"| {r['site']} | {r['n']} | {v1[0]:+.2f} [{v1[1]:+.2f}, {v1[2]:+.2f}] | "
            f"{fit_[0]:+.2f} [{fit_[1]:+.2f}, {fit_[2]:+.2f}] |"
        )
    weights = sorted(fitted["weights"].items(), key=lambda kv: -abs(kv[1]))
    lines += ["", "Weights of the fit on every image (per z-scored feature; + = harder): " + ", ".join(
        f"{k} {v:+.3f}" for k, v in weights) + "."]  # fmt: skip
    (out / "profile_vs_error.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flow = [r for r in rows if r["model"] == "flow-m:off" and r["variable"].startswith("feature:")]
    best = max({r["variable"] for r in flow}, key=lambda v: min(abs(r["rho"]) for r in flow if r["variable"] == v))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, var in zip(axes, ("profile:difficulty", best)):
        for site, colour in zip(SITES, ("tab:blue", "tab:orange")):
            err = errors.get((site, "flow-m:off"), {})
            names = sorted(set(err) & set(per_site[site]))
            r = next(r for r in rows if r["variable"] == var and r["site"] == site and r["model"] == "flow-m:off")
            ax.scatter([per_site[site][n][var] for n in names], [err[n] for n in names], s=12, c=colour,
                       label=f"{site} (rho {r['rho']:+.2f})")  # fmt: skip
        ax.set_xlabel(var)
        ax.set_ylabel("1 - Dice, out of fold (flow, FiLM off)")
        ax.legend()
    fig.suptitle("Does the heuristic profile track segmentation difficulty?")
    fig.tight_layout()
    fig.savefig(out / "profile_vs_error.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
