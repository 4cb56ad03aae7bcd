"""What does the shipped model take from the profile? Validation Dice with each image's profile swapped at inference.

    python benchmarks/profile_swap_eval.py --data ../shared/data --out benchmarks/results    # CPU, about 5 minutes

The shipped ``bundle/models/model.pt`` (FiLM on, trained on DCA1 + XCAD) segments each site's validation images
(whole image, 1 step x 1 sample, no TTA, threshold 0.5, components under 30 px removed: the bundle's defaults) with:

- ``own``: the image's own heuristic profile (what the bundle does);
- ``same-site``: the profile of another validation image of the same site (a fixed derangement);
- ``other-site``: the profile of a validation image of the other site;
- ``mean-site``: the mean profile of the site's validation images (site information, no per-image information);
- ``null``: no profile (FiLM off at inference; the FiLM parameters are ignored).

With ``--per-feature`` (about 20 minutes on 2 CPU cores) it also asks which of the profile's values the network reads:
for each value of the vector (difficulty, confidence, the four focus values), the image's own profile with only that
value taken from the ``other-site`` profile (``<value> from other-site``: does this value carry the site?) and from
the ``same-site`` profile (``<value> from same-site``: does the network read this value per image?).

No retraining: this asks what the trained network uses, not whether a profile helps training (the ablation does that).
If ``same-site`` and ``mean-site`` score like ``own`` while ``other-site`` and ``null`` fall, the network reads the
profile as a site indicator rather than as a description of the image. Paired differences against ``own`` with
bootstrap 95 % CIs (:mod:`monai_vlmfilm.ablation.stats`). Writes ``profile_swap_eval.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SITES = ("dca1", "xcad")
MODES = ("own", "same-site", "other-site", "mean-site", "null")


def feature_modes() -> tuple[str, ...]:
    """The ``--per-feature`` modes: ``"<value> from other-site"`` and ``"<value> from same-site"`` for each value of
    the profile vector but ``is_fallback`` (0 for every heuristic profile)."""
    from monai_vlmfilm.profiles import VECTOR_FIELDS

    return tuple(f"{f} from {src}" for src in ("other-site", "same-site") for f in VECTOR_FIELDS if f != "is_fallback")


def one_value_swaps(own: np.ndarray, other_site: np.ndarray, same_site: np.ndarray) -> dict[str, np.ndarray]:
    """``own`` with one value replaced by the other-site (or same-site) profile's, for each of :func:`feature_modes`."""
    from monai_vlmfilm.profiles import VECTOR_FIELDS

    out = {}
    for mode in feature_modes():
        field, _, src = mode.partition(" from ")
        p = own.copy()
        k = VECTOR_FIELDS.index(field)
        p[k] = (other_site if src == "other-site" else same_site)[k]
        out[mode] = p
    return out


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from monai_vlmfilm.ablation.stats import paired_difference
    from monai_vlmfilm.inferers import FlowSegInferer
    from monai_vlmfilm.metrics import cldice_score

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from flow_vs_unet import dice, drop_small, load_site, profiles_of
    from seg_inference_profile import shipped_flow

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--max-images", type=int, default=0, help="per site (0: all validation images)")
    ap.add_argument("--per-feature", action="store_true", help="also swap one profile value at a time")
    a = ap.parse_args(argv)
    modes = MODES + (feature_modes() if a.per_feature else ())
    net = shipped_flow(True, torch.device("cpu"))
    inferer = FlowSegInferer(num_steps=1, num_samples=1, divisible_by=8, seed=0, channels_last=True)
    val = {s: [d for d in load_site(Path(a.data), s) if d["split"] == "validation"] for s in SITES}
    if a.max_images:
        val = {s: v[: a.max_images] for s, v in val.items()}
    prof = {s: profiles_of(v) for s, v in val.items()}
    per: dict[str, dict[str, list[dict]]] = {s: {m: [] for m in modes} for s in SITES}
    for site in SITES:
        other = SITES[1 - SITES.index(site)]
        n, n_other = len(val[site]), len(val[other])
        for i, d in enumerate(tqdm(val[site], desc=site, disable=None)):
            choices = {
                "own": prof[site][i],
                "same-site": prof[site][(i + 1) % n],
                "other-site": prof[other][i % n_other],
                "mean-site": prof[site].mean(0),
                "null": None,
            }
            if a.per_feature:
                choices.update(one_value_swaps(choices["own"], choices["other-site"], choices["same-site"]))
            x = torch.as_tensor(d["image"])[None, None]
            gt = d["mask"].astype(bool)
            for mode, p in choices.items():
                with torch.no_grad():
                    pt = None if p is None else torch.as_tensor(p, dtype=torch.float32)[None]
                    prob = inferer(x, net, profile=pt)[0, 0].numpy()
                pred = drop_small(prob >= 0.5, 30)
                per[site][mode].append({"image": d["name"], "dice": dice(pred, gt), "cldice": cldice_score(pred, gt)})
    rows = []
    for site in SITES:
        own = per[site]["own"]
        for mode in modes:
            recs = per[site][mode]
            row = {
                "site": site,
                "mode": mode,
                "n": len(recs),
                "dice": float(np.mean([r["dice"] for r in recs])),
                "cldice": float(np.mean([r["cldice"] for r in recs])),
            }
            if mode != "own":
                for m in ("dice", "cldice"):
                    row[f"delta_{m}"] = paired_difference([100 * (r[m] - o[m]) for r, o in zip(recs, own)]).to_dict()
            rows.append(row)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"CPU, {torch.get_num_threads()} threads",
        "command": " ".join(sys.argv),
        "model": "bundle/models/model.pt",
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_swap_eval.json").write_text(json.dumps({**meta, "rows": rows, "per_image": per}, indent=1))
    lines = [
        f"{meta['date']}, {meta['machine']}, `{meta['command']}`; model {meta['model']}; validation splits, "
        "bundle inference defaults",
        "",
        "| site | profile at inference | images | Dice | clDice | Δ Dice vs own [95 % CI] | Δ clDice vs own |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        cells = ["", ""]
        if "delta_dice" in r:
            cells = [
                f"{r[f'delta_{m}']['mean']:+.2f} [{r[f'delta_{m}']['ci_lo']:+.2f}, {r[f'delta_{m}']['ci_hi']:+.2f}]"
                for m in ("dice", "cldice")
            ]
        lines.append(
            f"| {r['site']} | {r['mode']} | {r['n']} | {100 * r['dice']:.2f} | {100 * r['cldice']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    (out / "profile_swap_eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
