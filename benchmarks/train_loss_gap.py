"""Does FiLM fit the training images better while it scores worse on held-out ones? Training loss against test Dice.

    python benchmarks/train_loss_gap.py --jobs benchmarks/results/flow_vs_unet_jobs.jsonl \\
        --out benchmarks/results               # CPU, about 15 s (most of it importing flow_vs_unet)

Reads the rows of ``benchmarks/flow_vs_unet.py``: each job records its training loss every 100 iterations (one
batch each, ``losses``) and its per-image test Dice (``records``). For the shipped recipe (``flow-m-ep1+n``) with FiLM
on, with site-shuffled profiles (``:sshuffle``), with encoder FiLM (``flow-m-ep1+ne``) and trained with profile jitter or
condition dropout (``+nj`` / ``+nd``, whose logged loss is the one with jittered / dropped profiles), each against FiLM off
(``flow-m-ep1+n:off``) of the same setting, fold and seed (same training images, same crop stream), it pairs the jobs
and reports the mean training loss over the last ``--tail`` snapshots and the mean test Dice, as differences with a
bootstrap 95 % CI over the (fold, seed) pairs. A profile that acts as a per-image key the decoder memorises shows as a
lower training loss with a lower test Dice, for shuffled profiles as much as for the image's own (ablation README,
Update 10). Writes ``train_loss_gap.md``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flow_vs_unet import read_job_rows  # noqa: E402  (the script's folder is not a package)

OFF = "flow-m-ep1+n:off"
COMPARED = (
    ("flow-m-ep1+n", "FiLM on − off"),
    ("flow-m-ep1+n:sshuffle", "site-shuffled profiles − off"),
    ("flow-m-ep1+ne", "encoder FiLM − off"),
    # training-time regularisers of the profile path (their loss is logged with the jittered / dropped profiles)
    ("flow-m-ep1+nj", "FiLM with profile jitter − off"),
    ("flow-m-ep1+nd", "FiLM with condition dropout − off"),
)
SETTINGS = ("dca1_cv", "xcad_cv", "mixed_cv", "dca1_to_xcad", "xcad_to_dca1")


def job_summary(row: dict, tail: int) -> tuple[float, float]:
    """(mean of the last ``tail`` training-loss snapshots, mean test Dice in points) of one job row."""
    losses = row["losses"][-tail:]
    return float(np.mean(losses)), 100.0 * float(np.mean([r["dice"] for r in row["records"]]))


def loss_gaps(rows: list[dict], tail: int = 10) -> list[dict]:
    """One entry per (setting, compared model) with at least two (fold, seed) pairs against FiLM off.

    Args:
        rows: job rows of ``flow_vs_unet.py`` (rows without ``records`` or ``losses`` are skipped).
        tail: how many of the last training-loss snapshots (one per 100 iterations) each job's loss averages.

    Returns:
        dicts with setting, comparison, pairs, the off model's mean loss, and ``loss`` / ``dice``: (mean difference,
        CI low, CI high), plus ``lower_loss``: in how many pairs the compared model's loss was lower.
    """
    from monai_vlmfilm.ablation.stats import bootstrap_ci

    by_key: dict[tuple, dict[str, tuple[float, float]]] = {}
    for r in rows:
        if "records" not in r or not r.get("losses"):
            continue
        by_key.setdefault((r["setting"], r["fold"], r["seed"]), {})[r["model"]] = job_summary(r, tail)
    twinned = [(key[0], v) for key, v in sorted(by_key.items(), key=str) if OFF in v]
    out = []
    for setting in SETTINGS:
        for model, label in COMPARED:
            pairs = [v for s, v in twinned if s == setting and model in v]
            if len(pairs) < 2:
                continue
            dl = np.array([v[model][0] - v[OFF][0] for v in pairs])
            dd = np.array([v[model][1] - v[OFF][1] for v in pairs])
            out.append(
                {
                    "setting": setting,
                    "comparison": label,
                    "pairs": len(pairs),
                    "off_loss": float(np.mean([v[OFF][0] for v in pairs])),
                    "loss": (float(dl.mean()), *bootstrap_ci(dl)),
                    "dice": (float(dd.mean()), *bootstrap_ci(dd)),
                    "lower_loss": int((dl < 0).sum()),
                }
            )
    return out


def to_markdown(gaps: list[dict], tail: int, command: str) -> str:
    def fmt(t: tuple[float, float, float], digits: int) -> str:
        return f"{t[0]:+.{digits}f} [{t[1]:+.{digits}f}, {t[2]:+.{digits}f}]"

    lines = [
        f"# Training loss against test Dice, FiLM against FiLM off ({date.today().isoformat()})",
        "",
        f"`{command}`. Jobs of `benchmarks/flow_vs_unet.py` paired by setting, fold and seed (same training images, "
        f"same crop stream); training loss: mean of the last {tail} snapshots (one batch every 100 iterations, the "
        "flow loss: velocity MSE + DiceCE of the one-step mask); test Dice: mean over the fold's held-out images, "
        "points. 95 % bootstrap CIs over the pairs.",
        "",
        "| setting | comparison | pairs | off's training loss | Δ training loss [95 % CI] | pairs with lower loss | "
        "Δ test Dice [95 % CI] |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for g in gaps:
        lines.append(
            f"| {g['setting']} | {g['comparison']} | {g['pairs']} | {g['off_loss']:.3f} | {fmt(g['loss'], 4)} | "
            f"{g['lower_loss']} / {g['pairs']} | {fmt(g['dice'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", required=True, help="flow_vs_unet_jobs.jsonl")
    ap.add_argument("--out", required=True, help="folder for train_loss_gap.md")
    ap.add_argument("--tail", type=int, default=10, help="training-loss snapshots averaged per job (default 10)")
    a = ap.parse_args(argv)
    gaps = loss_gaps(read_job_rows(a.jobs), a.tail)
    if not gaps:
        raise SystemExit(f"{a.jobs}: no FiLM job has a FiLM-off twin of the same setting, fold and seed.")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/train_loss_gap.py --jobs {a.jobs} --out {a.out}" + (
        f" --tail {a.tail}" if a.tail != 10 else ""
    )
    text = to_markdown(gaps, a.tail, command)
    (out / "train_loss_gap.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
