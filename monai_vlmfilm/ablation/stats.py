"""Statistics for the ablation: per-mode summaries, paired differences with 95% CIs, difficulty terciles, verdicts.

The unit of analysis is the image. A *record* is one image's metrics from one trained model::

    {"mode": "on", "seed": 0, "fold": 0, "image": "images/35.png", "difficulty": 3.2,
     "dice": 0.81, "cldice": 0.77, "betti0_error": 4.0, "betti1_error": 2.0, "hd95": 6.3}

``fold`` is ``None`` without cross-validation; with it every image is evaluated in exactly one fold, so per-image
results pool over folds. Non-finite values (an empty prediction's HD95) count as missing for that metric.

* Per-mode table: mean over seeds of the per-seed mean over images, ± the standard deviation across seeds.
* Paired difference ``mode - ref``: for every (seed, fold, image) present in both modes the difference, averaged over
  seeds per image; the mean of those per-image differences with a 95% CI from a paired bootstrap over images
  (percentile) and from Student's t interval.
* Difficulty terciles: images ranked by difficulty and cut into three near-equal groups (0 easiest, 2 hardest).
* Per site: records of a mixed-site or cross-site run carry their image's ``site``; :func:`analyse_by_site` runs the
  same analysis on each site's records alone (terciles within the site).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

__all__ = [
    "METRICS",
    "METRIC_LABELS",
    "HIGHER_IS_BETTER",
    "TERCILE_NAMES",
    "PairedDifference",
    "bootstrap_ci",
    "t_interval",
    "paired_difference",
    "difficulty_terciles",
    "seeds_in_common",
    "per_image_means",
    "mode_summary",
    "paired_by_image",
    "image_difficulty",
    "difficulty_clashes",
    "analyse",
    "sites_of",
    "analyse_by_site",
    "verdicts",
]

METRICS: tuple[str, ...] = ("dice", "cldice", "betti0_error", "betti1_error", "hd95")
METRIC_LABELS: dict[str, str] = {
    "dice": "Dice",
    "cldice": "clDice",
    "betti0_error": "Betti-0 error",
    "betti1_error": "Betti-1 error",
    "hd95": "HD95 (px)",
}
HIGHER_IS_BETTER: dict[str, bool] = {
    "dice": True,
    "cldice": True,
    "betti0_error": False,
    "betti1_error": False,
    "hd95": False,
}
TERCILE_NAMES: tuple[str, ...] = ("easiest", "middle", "hardest")


def _finite(values: Iterable[float]) -> np.ndarray:
    arr = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return arr[np.isfinite(arr)]


def bootstrap_ci(
    diffs: Sequence[float] | np.ndarray, n_boot: int = 10000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of paired differences (resampling the pairs with replacement).

    Args:
        diffs: one difference per pair (image); non-finite values are dropped.
        n_boot: number of bootstrap resamples.
        alpha: 1 - confidence level.
        seed: seed of the resampling generator, so reports are reproducible.

    Returns:
        ``(lo, hi)``; ``(nan, nan)`` with fewer than 2 pairs.
    """
    d = _finite(diffs)
    if d.size < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    # chunks keep memory flat for large n
    chunk = max(1, 2_000_000 // d.size)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, d.size, size=(stop - start, d.size))
        means[start:stop] = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def t_interval(diffs: Sequence[float] | np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Student's t confidence interval of the mean of paired differences.

    Returns:
        ``(lo, hi)``; ``(nan, nan)`` with fewer than 2 pairs; ``(mean, mean)`` when all differences are equal.
    """
    d = _finite(diffs)
    if d.size < 2:
        return (math.nan, math.nan)
    mean = float(d.mean())
    if np.ptp(d) == 0:  # all equal: std would be rounding noise, not spread
        return (mean, mean)
    sem = float(d.std(ddof=1) / math.sqrt(d.size))
    half = float(sps.t.ppf(1 - alpha / 2, df=d.size - 1)) * sem
    return (mean - half, mean + half)


@dataclass
class PairedDifference:
    """Mean of per-image differences ``a - b`` with its 95% intervals.

    Attributes:
        mean: mean difference (NaN without pairs).
        n: number of pairs (images) used.
        ci_lo, ci_hi: paired bootstrap percentile interval.
        t_lo, t_hi: Student's t interval.
        p_value: two-sided paired t-test p-value (NaN with fewer than 2 pairs or zero variance).
    """

    mean: float
    n: int
    ci_lo: float
    ci_hi: float
    t_lo: float
    t_hi: float
    p_value: float

    @property
    def excludes_zero(self) -> bool:
        """True when the bootstrap CI lies entirely above or entirely below 0."""
        return bool(np.isfinite(self.ci_lo) and (self.ci_lo > 0 or self.ci_hi < 0))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def paired_difference(
    diffs: Sequence[float] | np.ndarray, n_boot: int = 10000, alpha: float = 0.05, seed: int = 0
) -> PairedDifference:
    """Summarise per-pair differences: mean, bootstrap and t intervals, t-test p-value."""
    d = _finite(diffs)
    if d.size == 0:
        return PairedDifference(math.nan, 0, math.nan, math.nan, math.nan, math.nan, math.nan)
    lo, hi = bootstrap_ci(d, n_boot=n_boot, alpha=alpha, seed=seed)
    t_lo, t_hi = t_interval(d, alpha=alpha)
    p = math.nan
    if d.size >= 2 and np.ptp(d) > 0:
        p = float(sps.ttest_1samp(d, 0.0).pvalue)
    return PairedDifference(float(d.mean()), int(d.size), lo, hi, t_lo, t_hi, p)


def seeds_in_common(*per_image_seeds: Mapping[str, Iterable[Any]]) -> list[Any]:
    """The seeds that every given model ran on every image they share, sorted.

    A paired comparison of two models averages each image over these seeds only, so a model run with three seeds is
    not set against one run with a single seed (the other seeds would add training noise to one side only).

    Args:
        per_image_seeds: one mapping per model, image -> the seeds it has for that image (any container of seeds,
            e.g. ``{seed: metrics}``).

    Returns:
        the seeds every model has for every image that all of them have; ``[]`` when they share no image or no seed.
    """
    if not per_image_seeds:
        return []
    images = set.intersection(*(set(m) for m in per_image_seeds))
    if not images:
        return []
    return sorted(set.intersection(*(set(m[i]) for m in per_image_seeds for i in images)))


def difficulty_terciles(difficulty: Sequence[float] | np.ndarray) -> np.ndarray:
    """Tercile index per image: 0 easiest, 1 middle, 2 hardest.

    Images are ranked by difficulty (ties keep their input order) and cut into three groups whose sizes differ by
    at most one, so a coarse difficulty scale (integers 1-5) still gives three populated groups.

    Raises:
        ValueError: when a difficulty is not finite.
    """
    d = np.asarray(difficulty, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"difficulty must be 1-D, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("difficulty values must be finite")
    order = np.argsort(d, kind="stable")
    out = np.empty(d.size, dtype=np.int64)
    for t, idx in enumerate(np.array_split(order, 3)):
        out[idx] = t
    return out


def _key(r: Mapping[str, Any]) -> tuple[Any, Any, str]:
    return (r.get("seed"), r.get("fold"), str(r["image"]))


def _value(r: Mapping[str, Any], metric: str) -> float:
    v = r.get(metric)
    if v is None:
        return math.nan
    v = float(v)
    return v if math.isfinite(v) else math.nan


def per_image_means(records: Iterable[Mapping[str, Any]], mode: str, metric: str) -> dict[str, float]:
    """Per-image metric of one mode averaged over seeds (missing values ignored)."""
    acc: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r["mode"] == mode:
            acc[str(r["image"])].append(_value(r, metric))
    return {k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for k, v in acc.items()}


def mode_summary(records: Iterable[Mapping[str, Any]], mode: str, metric: str) -> dict[str, Any]:
    """Mean over seeds of the per-seed mean over images, and the standard deviation across seeds.

    Only seeds that evaluated every image of this mode count (a run cut short by its time budget can leave a
    seed with some folds missing; its mean over other images would not be comparable). Non-finite values are
    left out of their seed's mean.

    Returns:
        ``{"mean", "std", "n_seeds", "n_images", "incomplete_seeds"}``; std is 0 with one seed, NaN without data.
    """
    seen: dict[Any, set[str]] = defaultdict(set)
    values: dict[Any, list[float]] = defaultdict(list)
    for r in records:
        if r["mode"] == mode:
            seen[r.get("seed")].add(str(r["image"]))
            v = _value(r, metric)
            if math.isfinite(v):
                values[r.get("seed")].append(v)
    union: set[str] = set().union(*seen.values()) if seen else set()
    full = [sd for sd in seen if seen[sd] == union]
    incomplete = sorted((sd for sd in seen if sd not in full), key=str)
    seed_means = np.asarray([np.mean(values[sd]) for sd in full if values[sd]], dtype=np.float64)
    if seed_means.size == 0:
        return {"mean": math.nan, "std": math.nan, "n_seeds": 0, "n_images": 0, "incomplete_seeds": incomplete}
    std = float(seed_means.std(ddof=1)) if seed_means.size > 1 else 0.0
    return {
        "mean": float(seed_means.mean()),
        "std": std,
        "n_seeds": int(seed_means.size),
        "n_images": len(union),
        "incomplete_seeds": incomplete,
    }


def paired_by_image(
    records: Sequence[Mapping[str, Any]], mode: str, ref: str, metric: str
) -> tuple[list[str], np.ndarray]:
    """Per-image differences ``mode - ref``, paired on (seed, fold, image) and averaged over seeds.

    Returns:
        image ids (sorted) and their mean differences; images without any finite pair are left out.
    """
    a = {_key(r): _value(r, metric) for r in records if r["mode"] == mode}
    b = {_key(r): _value(r, metric) for r in records if r["mode"] == ref}
    per_image: dict[str, list[float]] = defaultdict(list)
    for k in a.keys() & b.keys():
        d = a[k] - b[k]
        if math.isfinite(d):
            per_image[k[2]].append(d)
    images = sorted(per_image)
    return images, np.asarray([np.mean(per_image[i]) for i in images], dtype=np.float64)


def image_difficulty(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """One difficulty per image (the first finite value seen; it is a property of the image, not of the run)."""
    out: dict[str, float] = {}
    for r in records:
        img = str(r["image"])
        v = r.get("difficulty")
        if img not in out and v is not None and math.isfinite(float(v)):
            out[img] = float(v)
    return out


def difficulty_clashes(a: Iterable[Mapping[str, Any]], b: Iterable[Mapping[str, Any]]) -> list[str]:
    """Images both record sets hold with different difficulties: two runs that cannot be of the same data.

    Difficulty is a property of the image (its heuristic profile), so equal paths with unequal difficulties mean the
    data behind the paths changed between the runs.
    """
    da, db = image_difficulty(a), image_difficulty(b)
    return sorted(i for i in da.keys() & db.keys() if not math.isclose(da[i], db[i], abs_tol=1e-4))


def analyse(
    records: Sequence[Mapping[str, Any]],
    modes: Sequence[str],
    ref: str = "off",
    metrics: Sequence[str] = METRICS,
    n_boot: int = 10000,
    alpha: float = 0.05,
    seed: int = 0,
    compare: Sequence[Sequence[str]] = (),
) -> dict[str, Any]:
    """Everything the report tabulates.

    ``compare`` adds ``(mode, base)`` pairs beyond the standard ones (``"on.enc-vs-on.norm"``: a variant against
    another, over the same seeds and images).

    Returns:
        ``{"summary": {mode: {metric: mode_summary}}, "tercile_of": {image: t}, "tercile_bounds": [...],
        "paired": {mode: {scope: {metric: PairedDifference.to_dict()}}}}`` where scope is ``"overall"`` or a
        name from ``TERCILE_NAMES``; ``paired`` has every mode but ``ref``, plus ``"on-vs-shuffle"`` when both exist
        (and ``"on.V-vs-shuffle.V"`` for a variant ``V`` run in both modes).
    """
    summary = {m: {k: mode_summary(records, m, k) for k in metrics} for m in modes}
    diff_of = image_difficulty(records)
    imgs = sorted(diff_of)
    terc = difficulty_terciles([diff_of[i] for i in imgs]) if imgs else np.zeros(0, dtype=np.int64)
    tercile_of = {i: int(t) for i, t in zip(imgs, terc)}
    bounds = []
    for t in range(3):
        vals = [diff_of[i] for i in imgs if tercile_of[i] == t]
        bounds.append([min(vals), max(vals), len(vals)] if vals else [math.nan, math.nan, 0])

    comparisons = [(m, ref) for m in modes if m != ref and ref in modes]
    # on - shuffle, also per variant (``on.norm`` against ``shuffle.norm``)
    for m in modes:
        base, dot, variant = m.partition(".")
        if base == "on" and f"shuffle{dot}{variant}" in modes:
            comparisons.append((m, f"shuffle{dot}{variant}"))
    comparisons += [(m, b) for m, b in compare if m in modes and b in modes and (m, b) not in comparisons]
    paired: dict[str, Any] = {}
    for mode, base in comparisons:
        name = mode if base == ref else f"{mode}-vs-{base}"
        scopes: dict[str, Any] = {"overall": {}, **{n: {} for n in TERCILE_NAMES}}
        for k in metrics:
            images, d = paired_by_image(records, mode, base, k)
            scopes["overall"][k] = paired_difference(d, n_boot=n_boot, alpha=alpha, seed=seed).to_dict()
            t_idx = np.asarray([tercile_of.get(i, -1) for i in images], dtype=np.int64)
            for t, tname in enumerate(TERCILE_NAMES):
                scopes[tname][k] = paired_difference(d[t_idx == t], n_boot=n_boot, alpha=alpha, seed=seed).to_dict()
        paired[name] = scopes
    return {"ref": ref, "summary": summary, "tercile_of": tercile_of, "tercile_bounds": bounds, "paired": paired}


def sites_of(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The sites the records carry (``site`` key), sorted; empty when none does (a single-datalist run)."""
    return sorted({str(r["site"]) for r in records if r.get("site") is not None})


def analyse_by_site(
    records: Sequence[Mapping[str, Any]], modes: Sequence[str], **kwargs: Any
) -> dict[str, dict[str, Any]]:
    """:func:`analyse` on each site's records alone: ``{site: analysis}`` (empty without sites).

    An image belongs to one site, so each site's paired differences use exactly its own images; difficulty terciles
    are cut within the site.

    Args:
        records: per-image records, each with a ``site``.
        modes: the modes to summarise and compare.
        kwargs: passed to :func:`analyse` (``ref``, ``metrics``, ``n_boot``, ``alpha``, ``seed``).
    """
    return {s: analyse([r for r in records if r.get("site") == s], modes, **kwargs) for s in sites_of(records)}


def _pd(d: Mapping[str, float]) -> PairedDifference:
    return PairedDifference(**{k: d[k] for k in PairedDifference.__dataclass_fields__})


def _fmt_ci(p: PairedDifference, scale: float, unit: str) -> str:
    if p.n == 0:
        return "no paired results (mode not run, or its jobs failed)"
    if not math.isfinite(p.ci_lo):
        return f"{p.mean * scale:+.2f}{unit}, n={p.n} (too few images for an interval)"
    return f"{p.mean * scale:+.2f}{unit} [95% CI {p.ci_lo * scale:+.2f}, {p.ci_hi * scale:+.2f}], n={p.n}"


def verdicts(
    analysis: Mapping[str, Any],
    overall_target: float = 1.0,
    hardest_target: float = 2.0,
    conditioned_modes: Sequence[str] | None = None,
    shuffle_margin: float = 0.5,
) -> list[dict[str, Any]]:
    """Verdicts against the project's targets, each ``{"name", "met": bool | None, "text"}``.

    Rules (Dice in points = 100 x Dice):

    * gain overall / hardest tercile (per conditioned mode): MET when the mean paired difference ``mode - off`` is at
      least the target AND its 95% bootstrap CI lies above 0 (a gain that noise could explain is not counted).
    * shuffle within noise of off: MET when the 95% bootstrap CI of ``shuffle - off`` Dice contains 0, or lies
      entirely within ``±shuffle_margin`` points (a difference too small to matter, which a large test set can
      still resolve).
    * the gain comes from the profile (shown when on and shuffle both ran): MET when the CI of ``on - shuffle``
      Dice lies above 0.
    * no Betti regression (per conditioned mode, Betti-0 and Betti-1 error): MET unless the error rises
      significantly, i.e. unless the 95% CI of ``mode - off`` lies above 0.

    ``conditioned_modes`` defaults to every compared mode whose base is ``on`` or ``oracle``, variants included
    (``on.norm``); the shuffle rules apply to ``shuffle`` and each ``shuffle.V`` likewise.
    ``met`` is None when the comparison has no data (the mode was not run or every job failed).
    """
    out: list[dict[str, Any]] = []
    paired = analysis.get("paired", {})
    if conditioned_modes is None:
        conditioned_modes = [m for m in paired if "-vs-" not in m and m.partition(".")[0] in ("on", "oracle")]

    def add(name: str, met: bool | None, detail: str) -> None:
        word = "NO DATA" if met is None else ("MET" if met else "NOT MET")
        out.append({"name": name, "met": met, "text": f"**{word}** — {name}: {detail}"})

    for mode in conditioned_modes:
        if mode not in paired:
            continue
        for scope, target in (("overall", overall_target), ("hardest", hardest_target)):
            p = _pd(paired[mode][scope]["dice"])
            label = "overall" if scope == "overall" else "hardest difficulty tercile"
            name = f"{mode} − off Dice ≥ +{target:.1f} points, {label}"
            met = None if p.n == 0 else bool(p.mean * 100 >= target and p.ci_lo > 0)
            add(name, met, _fmt_ci(p, 100, " pt"))
        for metric in ("betti0_error", "betti1_error"):
            p = _pd(paired[mode]["overall"][metric])
            name = f"no {METRIC_LABELS[metric]} regression, {mode} vs off"
            met = None if p.n == 0 else not bool(p.ci_lo > 0)
            add(name, met, _fmt_ci(p, 1, "") + " (positive = more topology errors)")
    for sh in [m for m in paired if "-vs-" not in m and m.partition(".")[0] == "shuffle"]:
        p = _pd(paired[sh]["overall"]["dice"])
        m = shuffle_margin / 100
        met = None if p.n == 0 else bool(p.ci_lo <= 0 <= p.ci_hi or (-m <= p.ci_lo and p.ci_hi <= m))
        name = f"{sh} within noise of off (Dice CI contains 0 or lies within ±{shuffle_margin:.1f} point)"
        add(name, met, _fmt_ci(p, 100, " pt"))
    # on − shuffle only (a --compare pair such as on.enc − on.norm is reported, not judged)
    for cmp in [
        m for m in paired if "-vs-" in m and [x.partition(".")[0] for x in m.split("-vs-")] == ["on", "shuffle"]
    ]:
        on, sh = cmp.split("-vs-")
        p = _pd(paired[cmp]["overall"]["dice"])
        met = None if p.n == 0 else bool(p.ci_lo > 0)
        add(f"the gain comes from the per-image profile: {on} − {sh} Dice CI above 0", met, _fmt_ci(p, 100, " pt"))
    return out
