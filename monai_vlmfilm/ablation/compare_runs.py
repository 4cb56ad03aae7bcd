"""Compare two ablation runs on the same test images: does a setting that only a second run can change (the training
window, the data, anything that applies to ``off`` too, which ``--variant`` does not) change FiLM's gain?

    python -m monai_vlmfilm.ablation.compare_runs RUN_A/results.json RUN_B/results.json \\
        --labels "32 px,64 px" --pairs on:off,on:shuffle --seeds 0,1 --out RUN_A/compare.md

For each pair ``MODE:REF`` and metric: ``MODE - REF`` in each run (per image, seeds averaged, paired bootstrap 95 %
CI over images, and per seed), and the difference of the two differences, paired over the images both runs evaluated
with the seeds averaged. The runs must hold the same images: when both carry a per-image difficulty, it must agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .stats import difficulty_clashes, paired_by_image, paired_difference

__all__ = ["compare_runs", "main"]

METRICS = ("dice", "cldice", "betti0_error", "betti1_error")


def _per_seed(records: Sequence[Mapping[str, Any]], mode: str, ref: str, metric: str) -> dict[str, float]:
    seeds = sorted({r.get("seed") for r in records if r["mode"] in (mode, ref)}, key=str)
    out = {}
    for sd in seeds:
        _, d = paired_by_image([r for r in records if r.get("seed") == sd], mode, ref, metric)
        if d.size:
            out[str(sd)] = float(np.nanmean(d))
    return out


def compare_runs(
    a: Mapping[str, Any], b: Mapping[str, Any], pairs: Sequence[tuple[str, str]], metrics: Sequence[str] = METRICS
) -> list[dict[str, Any]]:
    """Rows ``{pair, metric, a, b, a_minus_b}`` (the first three as :meth:`PairedDifference.to_dict` plus ``n``
    and, for ``a`` / ``b``, ``per_seed``), for two ablation ``results.json`` contents ``a`` and ``b``.

    Raises:
        ValueError: a pair's mode is missing from a run, the runs share no image, or a shared image has different
            difficulties in the two runs (they were made from different data).
    """
    ra, rb = a["records"], b["records"]
    clash = difficulty_clashes(ra, rb)
    if clash:
        raise ValueError(f"{len(clash)} image(s) have different difficulties in the two runs, e.g. {clash[0]}: "
                         "they were not made from the same data")  # fmt: skip
    rows = []
    for mode, ref in pairs:
        for name, recs in (("a", ra), ("b", rb)):
            missing = {mode, ref} - {r["mode"] for r in recs}
            if missing:
                raise ValueError(f"run {name} has no {sorted(missing)} records for the pair {mode}:{ref}")
        for metric in metrics:
            scale = 100.0 if metric in ("dice", "cldice") else 1.0
            ia, xa = paired_by_image(ra, mode, ref, metric)
            ib, xb = paired_by_image(rb, mode, ref, metric)
            common = sorted(set(ia) & set(ib))
            if not common:
                raise ValueError(f"the two runs share no evaluated image for {mode}:{ref}")
            va, vb = dict(zip(ia, scale * xa)), dict(zip(ib, scale * xb))
            row: dict[str, Any] = {"pair": f"{mode} - {ref}", "metric": metric}
            for name, v, recs in (("a", va, ra), ("b", vb, rb)):
                row[name] = {
                    **paired_difference([v[i] for i in common]).to_dict(),
                    "n": len(common),
                    "per_seed": {k: scale * x for k, x in _per_seed(recs, mode, ref, metric).items()},
                }
            row["a_minus_b"] = {**paired_difference([va[i] - vb[i] for i in common]).to_dict(), "n": len(common)}
            rows.append(row)
    return rows


def _ci(d: Mapping[str, float]) -> str:
    return f"{d['mean']:+.2f} [{d['ci_lo']:+.2f}, {d['ci_hi']:+.2f}]"


def render(rows: Sequence[Mapping[str, Any]], labels: tuple[str, str], sources: tuple[str, str]) -> str:
    """Markdown table of :func:`compare_runs`' rows (Dice and clDice in points)."""
    la, lb = labels
    lines = [
        f"Run a ({la}): `{sources[0]}`; run b ({lb}): `{sources[1]}`. Per image, seeds averaged, paired bootstrap 95 % "
        "CIs over the images both runs evaluated; Dice / clDice in points.",
        "",
        f"| comparison | metric | images | {la} | per seed | {lb} | per seed | {la} − {lb} |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    for r in rows:
        seeds = [" / ".join(f"{v:+.2f}" for v in r[k]["per_seed"].values()) for k in ("a", "b")]
        lines.append(
            f"| {r['pair']} | {r['metric']} | {r['a_minus_b']['n']} | {_ci(r['a'])} | {seeds[0]} | {_ci(r['b'])} | "
            f"{seeds[1]} | {_ci(r['a_minus_b'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_a", help="results.json of the first run")
    p.add_argument("run_b", help="results.json of the second run")
    p.add_argument("--pairs", default="on:off", help="MODE:REF pairs, comma-separated (e.g. on:off,on:shuffle)")
    p.add_argument("--metrics", default=",".join(METRICS))
    p.add_argument("--labels", default="a,b", help="names of the two runs in the table, comma-separated")
    p.add_argument("--seeds", default=None, help="compare only these training seeds of both runs, e.g. 0,1")
    p.add_argument("--out", default=None, help="write the table here (and its rows as JSON beside it)")
    a = p.parse_args(argv)
    pairs = []
    for spec in a.pairs.split(","):
        mode, sep, ref = spec.strip().partition(":")
        if not (sep and mode and ref):
            p.error(f"--pairs: {spec!r} is not MODE:REF")
        pairs.append((mode, ref))
    labels = tuple(s.strip() for s in a.labels.split(","))
    if len(labels) != 2:
        p.error(f"--labels needs two names, got {a.labels!r}")
    runs = []
    for path in (a.run_a, a.run_b):
        try:
            runs.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            p.error(f"cannot read ablation results {path}: {e}")
    if a.seeds is not None:  # the same seeds on both sides (a run cut short, or one with more seeds)
        keep = {s.strip() for s in a.seeds.split(",")}
        for run in runs:
            run["records"] = [r for r in run["records"] if str(r.get("seed")) in keep]
    try:
        rows = compare_runs(runs[0], runs[1], pairs, [m.strip() for m in a.metrics.split(",") if m.strip()])
    except ValueError as e:
        p.error(str(e))
    table = render(rows, labels, (a.run_a, a.run_b))  # type: ignore[arg-type]
    if a.out:
        Path(a.out).write_text(table)
        Path(a.out).with_suffix(".json").write_text(json.dumps({"runs": [a.run_a, a.run_b], "rows": rows}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
