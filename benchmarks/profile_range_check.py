"""Which images does ``FlowSegInferer``'s profile range check flag? Each site's images against each training set.

    python benchmarks/profile_range_check.py --data ../shared/data \\
        --jobs benchmarks/results/flow_vs_unet_jobs.jsonl --out benchmarks/results    # CPU, about a minute

The check (``monai_vlmfilm.inferers.warn_profiles_out_of_range``) warns when an image's heuristic profile lies
beyond the FiLM encoder's clip (``|z| > 5`` on a feature, z from the training profiles' mean / std; the fallback flag
aside). Here the statistics come from (a) the shipped ``model.pt`` (DCA1 + XCAD training images), (b) every DCA1
image, (c) every XCAD image, as ``flow_vs_unet.py`` sets them for its one-site jobs; the share of each site's images
flagged against each is a false-alarm rate where the statistics include the site and a detection rate where they do
not. The check runs on the real encoder of the shipped network. Writes ``profile_range_check.{md,json}``.

With ``--jobs benchmarks/results/flow_vs_unet_jobs.jsonl`` it also asks whether FiLM's cost across sites follows the
distance: for each cross-site setting (train on one site, test on the other) the per-image Dice of FiLM on minus off
(``flow-m-ep1+n`` - ``flow-m-ep1+n:off``, averaged over the seeds both have) against the image's largest |z| under the
training site's statistics (Spearman rho, bootstrap 95 % CI), and the mean on - off per tercile of that distance and
for flagged / unflagged images (paired bootstrap 95 % CIs). The same for FiLM on minus the same-site shuffle
(``flow-m-ep1+n:sshuffle``: trained and tested with another image's profile of the same site), where it ran: is the
image's own profile worth more, or less, the further it lies from the training profiles?
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SITES = ("dca1", "xcad")
CROSS = {"dca1_to_xcad": ("dca1", "xcad"), "xcad_to_dca1": ("xcad", "dca1")}  # setting: (training, test) site
ON, OFF, SSHUFFLE = "flow-m-ep1+n", "flow-m-ep1+n:off", "flow-m-ep1+n:sshuffle"
REFS = (OFF, SSHUFFLE)  # what FiLM on is compared with, per test image


def cross_site_gains(
    jobs_file: str, refs: tuple[str, ...] = REFS
) -> dict[str, dict[str, tuple[dict[str, float], list[int]]]]:
    """Per reference model and cross-site setting: ``{test image: Dice points of ON minus the reference}`` averaged
    over the seeds both models ran (``profile_vs_error.paired_gains``), and those seeds.

    Args:
        jobs_file: ``flow_vs_unet.py``'s jobs file, read once for every reference.
        refs: the models FiLM on is compared with (``OFF``, ``SSHUFFLE``).
    """
    from profile_vs_error import oof_dice_by_seed, paired_gains

    from monai_vlmfilm.ablation.stats import seeds_in_common

    dice = oof_dice_by_seed([jobs_file], settings=tuple(CROSS))  # the two settings test different sites
    out: dict[str, dict[str, tuple[dict[str, float], list[int]]]] = {}
    for ref in refs:
        out[ref] = {}
        for setting, (_, test) in CROSS.items():
            seeds = seeds_in_common(dice.get((test, ON), {}), dice.get((test, ref), {}))
            out[ref][setting] = (paired_gains(dice, test, ON, ref), seeds)
    return out


def _distance_row(setting: str, ref: str, gains: dict[str, float], seeds: list[int], names, prof, enc) -> dict:
    """One cross-site comparison's per-image gains against the test images' largest |z|: Spearman rho and the mean
    gain per distance tercile and for flagged / unflagged images."""
    import numpy as np
    from profile_vs_error import spearman_ci

    from monai_vlmfilm.ablation.stats import difficulty_terciles, paired_difference
    from monai_vlmfilm.inferers import profile_range_z

    train, test = CROSS[setting]
    keep = [i for i, n in enumerate(names[test]) if n in gains]
    mean, std = prof[train].mean(0), prof[train].std(0, unbiased=False).clamp_min(1e-3)
    enc.set_normalization(mean, std)
    z = profile_range_z(enc, prof[test][keep]).abs().max(1).values.numpy()
    g = np.array([gains[names[test][i]] for i in keep])
    rho, lo, hi = spearman_ci(z, g)
    row = {"setting": setting, "comparison": f"{ON} - {ref}", "seeds": seeds, "images": len(g), "rho": [rho, lo, hi]}
    ter = difficulty_terciles(z)
    groups = [
        (f"distance tercile {t + 1} (largest abs z {z[ter == t].min():.1f}-{z[ter == t].max():.1f})", ter == t)
        for t in range(3)
    ]
    groups += [(f"flagged (abs z > {enc.clip:g})", z > enc.clip), ("not flagged", z <= enc.clip)]
    row["groups"] = [{"group": label, **paired_difference(g[sel]).to_dict()} for label, sel in groups if sel.any()]
    return row


def distance_rows(jobs_file: str, names: dict[str, list[str]], prof: dict[str, torch.Tensor], enc) -> list[dict]:
    """FiLM on - off (and on - same-site shuffle) across sites against each test image's largest |z| under the
    training site's statistics; ``names`` and ``prof`` hold each site's image names and heuristic profiles in the
    same order."""
    rows = []
    for ref, by_setting in cross_site_gains(jobs_file).items():
        for setting, (gains, seeds) in by_setting.items():
            if gains:
                rows.append(_distance_row(setting, ref, gains, seeds, names, prof, enc))
    return rows


def main(argv: list[str] | None = None) -> int:
    from flow_vs_unet import load_site, profiles_of
    from seg_inference_profile import shipped_flow

    from monai_vlmfilm.inferers import profile_range_z, warn_profiles_out_of_range

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--jobs", help="flow_vs_unet jobs file: relate FiLM's cross-site cost to the distance")
    a = ap.parse_args(argv)
    logging.getLogger("monai_vlmfilm.inferers").setLevel(logging.ERROR)  # counted here, not one warning per image

    names: dict[str, list[str]] = {}
    prof: dict[str, torch.Tensor] = {}
    for s in SITES:  # the images are read once; names keep their order for the cross-site rows
        items = load_site(Path(a.data), s)
        names[s] = [d["name"] for d in items]
        prof[s] = torch.as_tensor(profiles_of(items))
    net = shipped_flow(True, torch.device("cpu"))
    enc = net.profile_encoder
    shipped = (enc.feature_mean.clone(), enc.feature_std.clone())
    stats = {"shipped model.pt (DCA1 + XCAD training images)": shipped}
    for s in SITES:  # one-site statistics as flow_vs_unet.py's jobs set them
        stats[f"all {s.upper()} images"] = (prof[s].mean(0), prof[s].std(0, unbiased=False).clamp_min(1e-3))
    rows = []
    for label, (mean, std) in stats.items():
        enc.set_normalization(mean, std)
        for s in SITES:
            flagged = warn_profiles_out_of_range(net, prof[s])
            z = profile_range_z(enc, prof[s]).abs().max(1).values  # what the check reads
            rows.append(
                {
                    "statistics": label,
                    "site": s,
                    "images": len(prof[s]),
                    "flagged": len(flagged),
                    "share": round(len(flagged) / len(prof[s]), 3),
                    "max_abs_z_median": round(float(z.median()), 2),
                }
            )
    cross = distance_rows(a.jobs, names, prof, enc) if a.jobs else []
    enc.set_normalization(*shipped)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "clip": enc.clip}
    (out / "profile_range_check.json").write_text(json.dumps({**meta, "rows": rows, "cross_site": cross}, indent=1))
    lines = [
        f"{meta['date']}, CPU, `{meta['command']}`; flagged: a heuristic profile with |z| > {enc.clip:g} on a feature",
        "",
        "| training statistics | images of | images | flagged | share | median of the largest abs z |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['statistics']} | {r['site']} | {r['images']} | {r['flagged']} | {r['share']:.0%} | "
        f"{r['max_abs_z_median']:.2f} |"
        for r in rows
    ]
    for r in cross:
        rho, lo, hi = r["rho"]
        lines += [
            "",
            f"{r['setting']}: {r['comparison']} (Dice points, seeds {r['seeds']} averaged) against the "
            f"test image's largest abs z under the training site's statistics: Spearman rho {rho:+.2f} "
            f"[{lo:+.2f}, {hi:+.2f}] over {r['images']} images",
            "",
            f"| images | n | {r['comparison']} [95 % CI] |",
            "|---|---:|---|",
        ]
        lines += [
            f"| {g['group']} | {g['n']} | {g['mean']:+.2f} [{g['ci_lo']:+.2f}, {g['ci_hi']:+.2f}] |"
            for g in r["groups"]
        ]
    (out / "profile_range_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
