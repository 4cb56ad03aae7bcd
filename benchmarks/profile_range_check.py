"""Which images does ``FlowSegInferer``'s profile range check flag? Each site's images against each training set.

    python benchmarks/profile_range_check.py --data ../shared/data --out benchmarks/results    # CPU, about a minute

The check (``monai_vlmfilm.inferers.warn_profiles_out_of_range``) warns when an image's heuristic profile lies
beyond the FiLM encoder's clip (``|z| > 5`` on a feature, z from the training profiles' mean / std; the fallback flag
aside). Here the statistics come from (a) the shipped ``model.pt`` (DCA1 + XCAD training images), (b) every DCA1
image, (c) every XCAD image, as ``flow_vs_unet.py`` sets them for its one-site jobs; the share of each site's images
flagged against each is a false-alarm rate where the statistics include the site and a detection rate where they do
not. The check runs on the real encoder of the shipped network. Writes ``profile_range_check.{md,json}``.
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


def main(argv: list[str] | None = None) -> int:
    from flow_vs_unet import load_site, profiles_of
    from seg_inference_profile import shipped_flow

    from monai_vlmfilm.inferers import profile_range_z, warn_profiles_out_of_range

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    logging.getLogger("monai_vlmfilm.inferers").setLevel(logging.ERROR)  # counted here, not one warning per image

    prof = {s: torch.as_tensor(profiles_of(load_site(Path(a.data), s))) for s in SITES}
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
    enc.set_normalization(*shipped)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "clip": enc.clip}
    (out / "profile_range_check.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
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
    (out / "profile_range_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
