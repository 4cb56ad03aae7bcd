"""The ablation report: ``report.md``, ``results.json`` and PNG plots from a results dictionary.

The results dictionary (what ``results.json`` holds) has these keys, all written by the CLI:

* ``command``, ``datalist``, ``card``, ``date``, ``wall_time_s``, ``modes``, ``seeds``, ``folds``, ``profiler``,
  ``eval_split``, ``difficulty_source``, ``settings`` (iterations, image size, overrides ...);
* ``jobs``: ``[{"mode", "seed", "fold", "status": "ok"|"failed"|"skipped", "log", "wall_s", "error"}]``;
* ``records``: per-image records (see :mod:`monai_vlmfilm.ablation.stats`);
* ``film``: ``[{"mode", "seed", "fold", "stages": {stage: {"gamma_abs_mean", "beta_abs_mean", "gamma_abs_max",
  "beta_abs_max", "gate_mean"}}}]`` measured on the evaluation images' profiles;
* ``profiles``: ``{source: {"fields": [...], "images": [...], "vectors": [[...], ...]}}``;
* ``analysis`` and ``verdicts``: from :func:`stats.analyse` / :func:`stats.verdicts` (filled in here when absent);
  ``analysis["sites"]``: :func:`stats.analyse_by_site` when the records carry two or more sites;
* with several datalists only: ``setting`` (``"mixed-site"`` or ``"cross-site"``), ``sites`` (``{name: datalist}``
  trained on), ``test_site`` (cross-site: ``{name: datalist}`` evaluated), ``shuffle_within_site`` and
  ``eval_splits`` (mixed-site without folds: ``{name: split}``); each record then has its image's ``site``.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .stats import (
    HIGHER_IS_BETTER,
    METRIC_LABELS,
    METRICS,
    TERCILE_NAMES,
    analyse,
    analyse_by_site,
    per_image_means,
    sites_of,
    verdicts,
)

__all__ = ["PLOT_FILES", "write_report", "render_markdown", "make_plots"]

PLOT_FILES: dict[str, str] = {
    "scatter": "dice_on_vs_off.png",
    "difficulty": "metric_vs_difficulty.png",
    "film": "film_magnitude.png",
    "profiles": "profile_features.png",
    "paired": "paired_dice.png",
}
MODE_COLORS = {"off": "#555555", "on": "#1f77b4", "shuffle": "#ff7f0e", "oracle": "#2ca02c"}
MODE_DESCRIPTIONS = {
    "off": "FiLM off (plain flow-matching UNet)",
    "on": "FiLM on, the configured profiler's profiles",
    "shuffle": "FiLM on, profiles permuted across images (same distribution, no per-image information)",
    "oracle": "FiLM on, the synthetic generator's ground-truth factors",
}


def _color(mode: str) -> str:
    return MODE_COLORS.get(mode, "#9467bd")


def _base_modes(modes: Sequence[str]) -> list[str]:
    """The plain modes (``on``, not variants such as ``on.norm``): per-image plots stay readable with many variants."""
    return [m for m in modes if "." not in m]


def _num(v: float, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _scale(metric: str) -> tuple[float, str]:
    # Dice-like metrics in points (x100) in the difference tables, as the targets are stated
    return (100.0, " pt") if metric in ("dice", "cldice") else (1.0, "")


def _fmt_diff(p: Mapping[str, float], metric: str) -> str:
    if not p or p.get("n", 0) == 0:
        return "n/a"
    s, unit = _scale(metric)
    return f"{p['mean'] * s:+.2f}{unit} [{p['ci_lo'] * s:+.2f}, {p['ci_hi'] * s:+.2f}]"


# ----------------------------------------------------------------------------------------------------- markdown


def render_markdown(results: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    """The report text (markdown)."""
    an = results["analysis"]
    modes: list[str] = list(results["modes"])
    metrics = [m for m in METRICS if any(m in r for r in results.get("records", []))] or list(METRICS)
    lines: list[str] = []
    add = lines.append
    title = results.get("title") or "FiLM conditioning ablation"
    if not results.get("title") and results.get("setting") == "cross-site":
        title += (
            f" — cross-site, {' + '.join(results.get('sites') or {})} → {' + '.join(results.get('test_site') or {})}"
        )
    elif not results.get("title") and results.get("setting") == "mixed-site":
        title += f" — mixed-site, {' + '.join(results.get('sites') or {})}"
    add(f"# {title}\n")
    add("## Run\n")
    add(f"- command: `{results.get('command', '')}`")
    folds = results.get("folds")
    setting = results.get("setting")
    if setting in ("mixed-site", "cross-site"):
        lines.extend(_setting_lines(results))
    else:
        add(f"- datalist: `{results.get('datalist', '')}` — evaluated on the `{results.get('eval_split', '?')}` split")
    add(f"- cross-validation: {f'{folds}-fold, per-image results pooled over folds' if folds else 'none'}")
    add(f"- modes: {', '.join(modes)}; seeds: {', '.join(str(s) for s in results.get('seeds', []))}")
    add(f"- profiler for `on`/`shuffle`: {results.get('profiler', '?')}")
    add(f"- difficulty used for terciles: {results.get('difficulty_source', '?')}")
    add(f"- card: {results.get('card', '?')}; date: {results.get('date', '?')}")
    wall = results.get("wall_time_s")
    add(f"- wall time: {wall:.0f} s" if isinstance(wall, (int, float)) else "- wall time: ?")
    for k, v in (results.get("settings") or {}).items():
        add(f"- {k}: `{v}`")
    add("")
    add(
        f"- heuristic calibration: {results.get('calibration', 'default')}; profile normalisation: "
        f"{results.get('profile_norm', 'none')}"
    )
    variants = results.get("variants") or {}
    for m in modes:
        base, _, var = m.partition(".")
        desc = MODE_DESCRIPTIONS.get(base, base)
        if var:
            desc += "; variant: " + ", ".join(f"{k}={v}" for k, v in variants.get(var, {}).items())
        add(f"- `{m}`: {desc}")
    add("")

    jobs = results.get("jobs", [])
    failed = [j for j in jobs if j.get("status") == "failed"]
    n_ok = sum(1 for j in jobs if j.get("status") in ("ok", "skipped"))
    not_run = [j["name"] for j in jobs if j.get("status") == "not_run"]
    add(f"Jobs: {n_ok} of {len(jobs)} finished" + (f", **{len(failed)} failed**:" if failed else "."))
    for j in failed:
        fold = f" fold {j['fold']}" if j.get("fold") is not None else ""
        add(f"- {j['mode']} seed {j['seed']}{fold}: {j.get('error', '')} — log `{j.get('log', '')}`")
    if not_run:
        add(
            f"\n**{len(not_run)} jobs not started** (time budget spent): {', '.join(not_run)}. "
            "Differences are paired, so they use only images evaluated in both modes of a seed."
        )
    steps = [j.get("step_s") or {} for j in jobs if j.get("step_s")]
    if steps:
        parts = []
        for name in ("train", "evaluate", "collect"):
            v = [s_[name] for s_ in steps if name in s_]
            if v:
                parts.append(f"{name} {np.median(v):.0f} s")
        add(f"\nMedian time per job step: {', '.join(parts)} ({len(steps)} jobs).")
    add("")

    add("## Verdicts\n")
    add(
        "Targets: `on − off` ≥ +1.0 Dice point overall and ≥ +2.0 on the hardest difficulty tercile; `shuffle` "
        "within noise of `off`; no Betti-0/1 regression. A gain is MET only when its mean reaches the target AND "
        "its 95% paired-bootstrap CI lies above 0; a regression is a Betti error whose CI lies above 0.\n"
    )
    for v in results.get("verdicts", []):
        add(f"- {v['text']}")
    add("")

    add("## Metrics per mode\n")
    add("Mean over seeds of the per-seed mean over images ± standard deviation across seeds.\n")
    lines.extend(_mode_table(an, modes, metrics))
    add("")

    add("## Paired differences\n")
    add(
        "Per image: the difference between the two modes' metrics for the same seed (and fold), averaged over "
        "seeds; then mean over images with a 95% CI (paired bootstrap over images, 10 000 resamples; Student's t "
        "interval in results.json). Dice and clDice in points (×100); positive = higher.\n"
    )
    bounds = an.get("tercile_bounds", [])
    scopes = ["overall", *TERCILE_NAMES]
    for name, per_scope in an.get("paired", {}).items():
        add(f"### {_comparison_label(name)}\n")
        add("| scope | images | " + " | ".join(METRIC_LABELS[k] for k in metrics) + " |")
        add("|---" * (len(metrics) + 2) + "|")
        for sc in scopes:
            ps = per_scope.get(sc, {})
            n = max((ps[k]["n"] for k in metrics if k in ps), default=0)
            scope_label = sc
            if sc in TERCILE_NAMES:
                b = bounds[TERCILE_NAMES.index(sc)] if bounds else None
                if b and b[2]:
                    scope_label = f"{sc} (difficulty {b[0]:.2f}–{b[1]:.2f})"
            add(f"| {scope_label} | {n} | " + " | ".join(_fmt_diff(ps.get(k, {}), k) for k in metrics) + " |")
        add("")

    per_site = an.get("sites") or {}
    if per_site:
        add("## Per site\n")
        add(
            "The tables above pool every site; here each site's images alone (every image belongs to one site): "
            "its metrics per mode, and its paired differences with 95% paired-bootstrap CIs over its images. "
            "Difficulty terciles within each site are in results.json (`analysis.sites`).\n"
        )
        for site, san in per_site.items():
            add(f"### Site `{site}`\n")
            lines.extend(_mode_table(san, modes, metrics))
            add("")
            add("| difference | images | " + " | ".join(METRIC_LABELS[k] for k in metrics) + " |")
            add("|---" * (len(metrics) + 2) + "|")
            for name, per_scope in san.get("paired", {}).items():
                ps = per_scope.get("overall", {})
                n = max((ps[k]["n"] for k in metrics if k in ps), default=0)
                add(
                    f"| {_comparison_label(name)} | {n} | "
                    + " | ".join(_fmt_diff(ps.get(k, {}), k) for k in metrics)
                    + " |"
                )
            add("")

    film = results.get("film") or []
    if film:
        add("## FiLM modulation\n")
        add(
            "Per decoder stage (0 = deepest), mean over seeds: mean |γ| and |β| over channels and evaluation images, "
            "the mean difficulty gate, and the spread of γ across images (std over images, mean over channels; "
            "0 means every image gets the same modulation, i.e. the profile is ignored).\n"
        )
        table = _film_table(film)
        stages = sorted({st for m in table for st in table[m]}, key=lambda x: int(x))
        add("| mode | " + " | ".join(f"stage {st}: \\|γ\\| / \\|β\\| / gate / γ spread" for st in stages) + " |")
        add("|---" * (len(stages) + 1) + "|")
        for m, per_stage in table.items():
            cells = []
            for st in stages:
                v = per_stage.get(st)
                cells.append(
                    f"{v['gamma_abs_mean']:.4f} / {v['beta_abs_mean']:.4f} / {v['gate_mean']:.2f} / "
                    f"{v.get('gamma_image_std', float('nan')):.4f}"
                    if v
                    else "n/a"
                )
            add(f"| {m} | " + " | ".join(cells) + " |")
        add("")

    profiles = results.get("profiles") or {}
    if profiles:
        add("## Profiles\n")
        add(
            "Spread of each profile feature across the evaluation images (mean ± std); a feature that barely varies "
            "cannot tell images apart.\n"
        )
        fields = next(iter(profiles.values()))["fields"]
        add("| source | images | " + " | ".join(fields) + " |")
        add("|---" * (len(fields) + 2) + "|")
        for src, p in profiles.items():
            v = np.asarray(p["vectors"], dtype=np.float64)
            if v.size == 0:
                continue
            cells = [f"{v[:, i].mean():.3f} ± {v[:, i].std():.3f}" for i in range(v.shape[1])]
            add(f"| {src} | {v.shape[0]} | " + " | ".join(cells) + " |")
        add("")

    add("## Plots\n")
    captions = {
        "scatter": "Per-image Dice, each conditioned mode against off (mean over seeds)",
        "paired": "Paired Dice differences of every mode and variant, overall and per difficulty tercile",
        "difficulty": "Per-image metrics against difficulty (mean over seeds), with tercile means",
        "film": "FiLM γ/β magnitude per decoder stage",
        "profiles": "Profile feature distributions",
    }
    for key, fname in plots.items():
        add(f"![{captions.get(key, key)}]({fname})\n")
    add("All numbers, per-image records and per-job status are in `results.json`.")
    return "\n".join(lines) + "\n"


def _comparison_label(name: str) -> str:
    """``on`` -> ``on − off``, ``on-vs-shuffle`` -> ``on − shuffle``."""
    return f"{name} − off" if "-vs-" not in name else name.replace("-vs-", " − ")


def _setting_lines(results: Mapping[str, Any]) -> list[str]:
    """The run lines naming a mixed-site or cross-site setting, its sites and datalists, and how shuffle permutes."""
    sites = results.get("sites") or {}
    test = results.get("test_site") or {}
    out = []
    if results.get("setting") == "cross-site":
        tname = ", ".join(test) or "?"
        out.append(
            f"- setting: **cross-site** — trained on {', '.join(sites)} (every training+validation item), "
            f"evaluated on {tname} (every item of its datalist)"
        )
    else:
        how = (
            "folds stratified by site (each fold holds out its share of every site; training uses the other folds "
            "of every site)"
            if results.get("folds")
            else f"training = the sites' training splits, evaluation = their evaluation splits "
            f"({', '.join(f'{k}: `{v}`' for k, v in (results.get('eval_splits') or {}).items())})"
        )
        out.append(f"- setting: **mixed-site** training on {len(sites)} sites ({', '.join(sites)}); {how}")
    for name, path in sites.items():
        out.append(f"- site `{name}` (training): `{path}`")
    for name, path in test.items():
        out.append(f"- site `{name}` (test): `{path}`")
    out.append(f"- evaluated on: {results.get('eval_split', '?')}")
    has_shuffle = any(m.partition(".")[0] == "shuffle" for m in results.get("modes", []))
    within = results.get("shuffle_within_site") if has_shuffle else None
    if within is True:
        out.append("- `shuffle` permutes profiles within each site (per-image information broken, the site kept)")
    elif within is False:
        out.append("- `shuffle` permutes profiles across all images of every site (the site information broken too)")
    return out


def _mode_table(an: Mapping[str, Any], modes: Sequence[str], metrics: Sequence[str]) -> list[str]:
    """The per-mode metric table of an analysis (its ``summary``), with the seeds it had to leave out."""
    out = []
    header = "| mode | " + " | ".join(f"{METRIC_LABELS[k]} {'↑' if HIGHER_IS_BETTER[k] else '↓'}" for k in metrics)
    out.append(header + " | images | seeds |")
    out.append("|---" * (len(metrics) + 3) + "|")
    for m in modes:
        s = an["summary"].get(m, {})
        cells = [f"{_num(s[k]['mean'])} ± {_num(s[k]['std'])}" if k in s else "n/a" for k in metrics]
        n_img = max((s[k]["n_images"] for k in metrics if k in s), default=0)
        n_seeds = max((s[k]["n_seeds"] for k in metrics if k in s), default=0)
        out.append(f"| {m} | " + " | ".join(cells) + f" | {n_img} | {n_seeds} |")
    dropped = {m: an["summary"][m][metrics[0]].get("incomplete_seeds") for m in modes if m in an["summary"]}
    dropped = {m: v for m, v in dropped.items() if v}
    if dropped:
        out.append(
            "\nLeft out of this table because they did not evaluate every image (the paired differences below "
            "still use their images): " + "; ".join(f"{m}: seeds {v}" for m, v in dropped.items()) + "."
        )
    return out


def _film_table(film: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    acc: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for f in film:
        for st, vals in f.get("stages", {}).items():
            for k, v in vals.items():
                acc[f["mode"]][str(st)][k].append(float(v))
    return {
        m: {st: {k: float(np.mean(v)) for k, v in d.items()} for st, d in per_stage.items()}
        for m, per_stage in acc.items()
    }


# ---------------------------------------------------------------------------------------------------------- plots


def make_plots(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write the PNG plots into ``out_dir``; returns ``{key: file name}`` of those written."""
    import matplotlib

    matplotlib.use("Agg")  # headless: GPU machines have no display
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = results.get("records", [])
    all_modes = list(results["modes"])
    modes = _base_modes(all_modes)  # variants appear in the paired-difference plot
    written: dict[str, str] = {}

    # 1. per-image Dice: every other mode against off
    if records and "off" in modes and len(modes) > 1:
        off = per_image_means(records, "off", "dice")
        fig, ax = plt.subplots(figsize=(5.5, 5.5))
        lo, hi = 1.0, 0.0
        for m in modes:
            if m == "off":
                continue
            other = per_image_means(records, m, "dice")
            imgs = sorted(set(off) & set(other))
            x = np.asarray([off[i] for i in imgs])
            y = np.asarray([other[i] for i in imgs])
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.any():
                ax.scatter(x[ok], y[ok], s=14, alpha=0.7, color=_color(m), label=f"{m} (n={int(ok.sum())})")
                lo, hi = min(lo, x[ok].min(), y[ok].min()), max(hi, x[ok].max(), y[ok].max())
        lo, hi = (0.0, 1.0) if lo > hi else (max(0.0, lo - 0.02), min(1.0, hi + 0.02))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("Dice, off")
        ax.set_ylabel("Dice, conditioned mode")
        ax.set_title("Per-image Dice (mean over seeds)")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / PLOT_FILES["scatter"], dpi=120)
        plt.close(fig)
        written["scatter"] = PLOT_FILES["scatter"]

    # 2. metric vs difficulty
    difficulty: dict[str, float] = {}
    for r in records:
        d = r.get("difficulty")
        if d is not None and math.isfinite(float(d)):
            difficulty.setdefault(str(r["image"]), float(d))
    metrics = [k for k in METRICS if any(k in r for r in records)]
    if records and difficulty and metrics:
        tercile_of = results["analysis"].get("tercile_of", {})
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6), squeeze=False)
        for ax, k in zip(axes[0], metrics):
            for m in modes:
                vals = per_image_means(records, m, k)
                imgs = [i for i in vals if i in difficulty and math.isfinite(vals[i])]
                if not imgs:
                    continue
                x = np.asarray([difficulty[i] for i in imgs])
                y = np.asarray([vals[i] for i in imgs])
                ax.scatter(x, y, s=8, alpha=0.35, color=_color(m))
                tx, ty = [], []
                for t in range(3):
                    sel = [j for j, i in enumerate(imgs) if tercile_of.get(i) == t]
                    if sel:
                        tx.append(float(np.mean(x[sel])))
                        ty.append(float(np.mean(y[sel])))
                ax.plot(tx, ty, "-o", color=_color(m), lw=2, ms=5, label=m)
            ax.set_xlabel(f"difficulty ({results.get('difficulty_source', '')})"[:60])
            ax.set_title(METRIC_LABELS[k])
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / PLOT_FILES["difficulty"], dpi=110)
        plt.close(fig)
        written["difficulty"] = PLOT_FILES["difficulty"]

    # 3. FiLM magnitudes per stage
    film = results.get("film") or []
    if film:
        per: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for f in film:
            for st, v in f.get("stages", {}).items():
                per[f["mode"]][str(st)]["gamma"].append(float(v["gamma_abs_mean"]))
                per[f["mode"]][str(st)]["beta"].append(float(v["beta_abs_mean"]))
        stages = sorted({st for m in per for st in per[m]}, key=int)
        fmodes = [m for m in modes if m in per]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        width = 0.8 / max(1, len(fmodes))
        for ax, which, sym in zip(axes, ("gamma", "beta"), ("|γ|", "|β|")):
            for j, m in enumerate(fmodes):
                means = [np.mean(per[m][st][which]) if per[m][st][which] else np.nan for st in stages]
                stds = [np.std(per[m][st][which]) if per[m][st][which] else 0.0 for st in stages]
                xs = np.arange(len(stages)) + (j - (len(fmodes) - 1) / 2) * width
                ax.bar(xs, means, width, yerr=stds, color=_color(m), label=m, capsize=2)
            ax.set_xticks(np.arange(len(stages)), [f"stage {s}" for s in stages])
            ax.set_ylabel(f"mean {sym}")
            ax.set_title(f"FiLM {sym} per decoder stage (0 = deepest)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / PLOT_FILES["film"], dpi=110)
        plt.close(fig)
        written["film"] = PLOT_FILES["film"]

    # 4. paired Dice difference against off, every mode and variant, overall and per tercile (a forest plot)
    paired = results["analysis"].get("paired", {}) if results.get("analysis") else {}
    names = [m for m in all_modes if m in paired] + [m for m in paired if "-vs-" in m]
    if names:
        scopes = [
            ("overall", "overall", "k"),
            *[(t, t, c) for t, c in zip(TERCILE_NAMES, ("#8fbc8f", "#daa520", "#b22222"))],
        ]
        fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(names) + 1.4))
        for j, (scope, label, color) in enumerate(scopes):
            ys, xs, lo, hi = [], [], [], []
            for i, m in enumerate(names):
                d = paired[m].get(scope, {}).get("dice")
                if not d or not d.get("n") or d.get("mean") is None or not math.isfinite(d.get("ci_lo", math.nan)):
                    continue
                ys.append(len(names) - 1 - i + (1.5 - j) * 0.17)
                xs.append(100 * d["mean"])
                lo.append(100 * (d["mean"] - d["ci_lo"]))
                hi.append(100 * (d["ci_hi"] - d["mean"]))
            if xs:
                ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", ms=4 if scope == "overall" else 3, color=color,
                            lw=1.6 if scope == "overall" else 1, capsize=2, label=label)  # fmt: skip
        ax.axvline(0, color="grey", lw=1)
        for target in (1.0, 2.0):
            ax.axvline(target, color="grey", lw=0.8, ls=":")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(
            [n.replace("-vs-", " − ") if "-vs-" in n else f"{n} − off" for n in reversed(names)], fontsize=8
        )
        ax.set_xlabel("Dice difference, points (mean and 95% paired-bootstrap CI); dotted: +1 / +2 targets")
        ax.set_title("Paired Dice differences per mode and variant")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / PLOT_FILES["paired"], dpi=110)
        plt.close(fig)
        written["paired"] = PLOT_FILES["paired"]

    # 5. profile feature distributions
    profiles = results.get("profiles") or {}
    if profiles:
        fields = next(iter(profiles.values()))["fields"]
        ncol = min(4, len(fields))
        nrow = math.ceil(len(fields) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.8 * nrow), squeeze=False)
        src_colors = {
            "heuristic": MODE_COLORS["on"],
            "shuffle": MODE_COLORS["shuffle"],
            "oracle": MODE_COLORS["oracle"],
        }
        for i, name in enumerate(fields):
            ax = axes[i // ncol][i % ncol]
            for src, p in profiles.items():
                v = np.asarray(p["vectors"], dtype=np.float64)
                if v.size == 0:
                    continue
                ax.hist(
                    v[:, i],
                    bins=20,
                    range=(0.0, 1.0),
                    histtype="step",
                    lw=1.5,
                    color=src_colors.get(src, "#9467bd"),
                    label=src,
                )
            ax.set_title(name, fontsize=9)
        for j in range(len(fields), nrow * ncol):
            axes[j // ncol][j % ncol].axis("off")
        axes[0][0].legend(fontsize=7)
        fig.suptitle("Profile vector features over the evaluation images")
        fig.tight_layout()
        fig.savefig(out / PLOT_FILES["profiles"], dpi=110)
        plt.close(fig)
        written["profiles"] = PLOT_FILES["profiles"]
    return written


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def write_report(results: dict[str, Any], out_dir: str | os.PathLike, n_boot: int = 10000) -> Path:
    """Analyse (when not done), plot and write ``report.md`` and ``results.json`` into ``out_dir``.

    Returns:
        the path of ``report.md``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = results.get("compare") or ()
    if "analysis" not in results:
        results["analysis"] = analyse(results.get("records", []), results["modes"], n_boot=n_boot, compare=extra)
    if "sites" not in results["analysis"] and len(sites_of(results.get("records", []))) >= 2:
        results["analysis"]["sites"] = analyse_by_site(
            results.get("records", []), results["modes"], n_boot=n_boot, compare=extra
        )
    if "verdicts" not in results:
        results["verdicts"] = verdicts(results["analysis"])
    plots = make_plots(results, out)
    results["plots"] = plots
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=1, allow_nan=False))
    report = out / "report.md"
    report.write_text(render_markdown(results, plots))
    return report
