"""What the profile is worth, per setting: one forest plot and one table of the shipped recipe's FiLM comparisons.

    python benchmarks/profile_worth.py --jobs benchmarks/results/flow_vs_unet_jobs.jsonl \\
        --synthetic benchmarks/ablation/synthetic_06_recipe/results.json \\
        --synthetic-shuffle benchmarks/ablation/synthetic_06_window/crop64/results.json \\
            benchmarks/ablation/synthetic_06_shuffle/seed2/results.json \\
        --out benchmarks/results                                  # CPU, about 30 s

Real settings come from the per-image rows of ``benchmarks/flow_vs_unet.py`` (summarised by its own
:func:`summarise`, so the figures equal ``results/flow_vs_unet.md``): for the shipped recipe ``flow-m-ep1+n``, FiLM
on − off, on − same-site shuffle (``:sshuffle``), encoder FiLM (``+ne``) against decoder-only FiLM and against
off, and FiLM trained with profile jitter (``+nj``) or condition dropout (``+nd``) against off, in each setting
where they were run. Synthetic rows come from ``python -m monai_vlmfilm.ablation`` reports (``results.json``):
heuristic profiles with training-set normalisation (``on.norm``) and ground-truth profiles (``oracle.norm``) against
off, and on − shuffle. Several reports of one data set (e.g. seeds run at different times) are pooled: their
per-image records are paired again over all their seeds. Writes ``profile_worth.png`` and ``profile_worth.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flow_vs_unet import read_job_rows, summarise  # noqa: E402  (the script's folder is not a package)

SHIPPED = "flow-m-ep1+n"
ENCODER = "flow-m-ep1+ne"
JITTER = "flow-m-ep1+nj"
DROPOUT = "flow-m-ep1+nd"
# (label, comparison key in flow_vs_unet's summary); summarise pairs encoder FiLM with the shipped recipe's FiLM-off
# run (off_twin: with FiLM off, encoder FiLM changes nothing)
COMPARISONS = (
    ("FiLM on − off", f"{SHIPPED} - {SHIPPED}:off"),
    ("on − same-site shuffle", f"{SHIPPED} - {SHIPPED}:sshuffle"),
    ("encoder FiLM − decoder FiLM", f"{ENCODER} - {SHIPPED}"),
    ("encoder FiLM − off", f"{ENCODER} - {SHIPPED}:off"),
    # trained with profile jitter (FiLMFlowUNet(profile_noise=0.5)), the memorisation test
    ("FiLM with profile jitter − off", f"{JITTER} - {SHIPPED}:off"),
    # trained with condition dropout (FiLMFlowUNet(profile_dropout=0.5)), the other regulariser of that test
    ("FiLM with condition dropout − off", f"{DROPOUT} - {SHIPPED}:off"),
)
SETTINGS = (
    ("dca1_cv", "dca1", "DCA1 5-fold CV"),
    ("xcad_cv", "xcad", "XCAD 5-fold CV"),
    ("mixed_cv", "dca1", "two-site CV, DCA1 images"),
    ("mixed_cv", "xcad", "two-site CV, XCAD images"),
    ("dca1_to_xcad", "xcad", "DCA1 → XCAD"),
    ("xcad_to_dca1", "dca1", "XCAD → DCA1"),
)


def real_rows(summary: dict) -> list[dict]:
    """One row per (setting, comparison) present in ``summary`` (flow_vs_unet's), Dice and clDice in points."""
    out = []
    for setting, site, where in SETTINGS:
        d = summary.get(setting, {}).get(site, {})
        for label, key in COMPARISONS:
            if key not in d:
                continue
            dice, cldice = d[key]["dice"], d[key]["cldice"]
            out.append(
                {
                    "setting": where,
                    "comparison": label,
                    "seeds": sorted(int(s) for s in dice.get("per_seed", {})),
                    "n": dice["n"],
                    "dice": [dice["mean"], dice["ci_lo"], dice["ci_hi"]],
                    "cldice": [cldice["mean"], cldice["ci_lo"], cldice["ci_hi"]],
                }
            )
    return out


def synthetic_report(paths: list[str]) -> dict:
    """One ablation report from one or more ``results.json``: a single one as it is; several pooled.

    Pooling re-runs the ablation's own analysis (:func:`monai_vlmfilm.ablation.stats.analyse`) on the union of
    their per-image records, so a comparison pairs on (seed, fold, image) across reports and averages over every
    seed, as one run with all the seeds would. Reports must be of the same images (same paths, and the same
    difficulties, as ``compare_runs`` checks) and share no (mode, seed).

    Raises:
        ValueError: a (mode, seed) in two reports, or reports of different images (both named).
    """
    reports = [json.loads(Path(p).read_text()) for p in paths]
    if len(reports) == 1:
        return reports[0]
    from monai_vlmfilm.ablation.stats import analyse, difficulty_clashes

    first, base = paths[0], reports[0]["records"]
    images = {str(r["image"]) for r in base}
    records: list[dict] = []
    owner: dict[tuple, str] = {}
    for path, rep in zip(paths, reports):
        if {str(r["image"]) for r in rep["records"]} != images or difficulty_clashes(base, rep["records"]):
            raise ValueError(f"{path}: not the images of {first}; pool runs of the same data set only")
        for r in rep["records"]:
            key = (r["mode"], r.get("seed"))
            if owner.setdefault(key, path) != path:
                raise ValueError(f"{path}: mode {key[0]!r} seed {key[1]} is also in {owner[key]}; pool disjoint runs")
        records += rep["records"]
    modes = sorted({r["mode"] for r in records}, key=lambda m: (m != "off", m))
    return {
        "title": " + ".join(paths),
        "seeds": sorted({r.get("seed") for r in records}),
        "analysis": analyse(records, modes, ref="off"),
    }


def synthetic_rows(report: dict, mode_labels: dict[str, str], where: str) -> list[dict]:
    """Rows from an ablation ``results.json``: its paired comparisons (fractions) turned into points."""
    out = []
    paired = report["analysis"]["paired"]
    for mode, label in mode_labels.items():
        if mode not in paired:
            raise KeyError(f"{report.get('title', 'ablation report')}: no paired comparison {mode!r}")
        o = paired[mode]["overall"]
        out.append(
            {
                "setting": where,
                "comparison": label,
                "seeds": list(report["seeds"]),
                "n": o["dice"]["n"],
                "dice": [100 * o["dice"][k] for k in ("mean", "ci_lo", "ci_hi")],
                "cldice": [100 * o["cldice"][k] for k in ("mean", "ci_lo", "ci_hi")],
            }
        )
    return out


def fmt(m: list[float]) -> str:
    return f"{m[0]:+.2f} [{m[1]:+.2f}, {m[2]:+.2f}]"


def table(rows: list[dict]) -> str:
    lines = [
        "| setting | comparison | seeds | images | Δ Dice [95 % CI] | Δ clDice [95 % CI] |",
        "|---|---|---|---:|---|---|",
    ]
    for r in rows:
        seeds = ", ".join(map(str, r["seeds"]))
        lines.append(
            f"| {r['setting']} | {r['comparison']} | {seeds} | {r['n']} | {fmt(r['dice'])} | {fmt(r['cldice'])} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Forest plot, Dice and clDice side by side; green / red where the CI excludes 0, grey where it does not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 0.34 * len(rows) + 1.6), sharey=True, constrained_layout=True)
    labels = [
        f"{r['setting']}: {r['comparison']} (seed{'s' if len(r['seeds']) > 1 else ''} {','.join(map(str, r['seeds']))}"
        f"; {r['n']} images)"
        for r in rows
    ]
    for ax, metric in zip(axes, ("dice", "cldice")):
        for y, r in enumerate(rows):
            m, lo, hi = r[metric]
            colour = "tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:gray"
            ax.errorbar(m, y, xerr=[[m - lo], [hi - m]], fmt="o", color=colour)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"Δ {'Dice' if metric == 'dice' else 'clDice'} (points), paired 95 % CI over images")
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("What the profile is worth: the shipped recipe's FiLM, heuristic profiles")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", required=True, help="flow_vs_unet per-image rows (JSON lines)")
    ap.add_argument("--synthetic", nargs="+", help="ablation results.json with off / on.norm / oracle.norm")
    ap.add_argument(
        "--synthetic-shuffle", nargs="+", help="ablation results.json with on / shuffle (normalised profiles)"
    )
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    summary, _ = summarise(read_job_rows(a.jobs))
    rows = real_rows(summary)
    if a.synthetic:
        rep = synthetic_report(a.synthetic)
        labels = {"on.norm": "FiLM on − off", "oracle.norm": "ground-truth profiles − off"}
        rows += synthetic_rows(rep, labels, "synthetic")
    if a.synthetic_shuffle:
        rep = synthetic_report(a.synthetic_shuffle)
        rows += synthetic_rows(rep, {"on-vs-shuffle": "on − shuffle"}, "synthetic")
    if not rows:
        raise SystemExit(f"{a.jobs}: no {SHIPPED} FiLM comparison in these rows")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "profile_worth.png")
    sources = ", ".join(f"`{p}`" for p in [a.jobs, *(a.synthetic or []), *(a.synthetic_shuffle or [])])
    (out / "profile_worth.md").write_text(
        f"{date.today().isoformat()}, CPU. What the profile is worth per setting (`benchmarks/profile_worth.py`; from "
        f"{sources}). Dice points, paired "
        "95 % bootstrap CIs over images of per-image seed means; seeds: those every image of the setting has for "
        "both models.\n\n" + table(rows) + "\n\n![forest plot](profile_worth.png)\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
