"""A deterministic, weight-free profiler from image statistics (the embedded default where no VLM is at hand).

Raw features (on the image rescaled to its 1st..99th intensity percentiles, vessels dark):

* ``noise``: log of a robust noise sigma (MAD of a Laplacian);
* ``contrast``: log of the local vessel contrast (surroundings minus vessel on the strongest ridge pixels);
* ``cnr``: ``contrast - noise`` (log contrast-to-noise ratio);
* ``ridge``: mean multi-scale Hessian dark-ridge response (vesselness, scales 1, 2, 4 px);
* ``thin``: share of the ridge response carried by the finest scale on ridge pixels;
* ``small``: ``log(1 + number of small connected ridge fragments)``;
* ``clutter``: low-frequency energy, std of the image blurred at sigma 16 px.

Each field is a logistic of a weighted sum of z-scored features; the z-scores use the feature
mean / std measured on the 80 DCA1 angiograms (``DCA1_CALIBRATION``), so fields spread over
their range on real XCA images instead of sitting at one value. ``HeuristicProfiler.calibrate``
measures the same constants on another data set.

A constant image (equal 1st and 99th intensity percentiles) has no statistic to map: it gets the neutral
profile with confidence 0, marked as a fallback (``is_fallback``), so the network, the transform's counters
and ``precompute`` all see it flagged.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .base import Profiler, canonical_image
from .schema import VLMProfile

__all__ = ["HeuristicProfiler", "DCA1_CALIBRATION", "HEURISTIC_VERSION", "image_features"]

HEURISTIC_VERSION = "heuristic-v1"
FEATURES = ("noise", "contrast", "cnr", "ridge", "thin", "small", "clutter")
_SCALES = (1.0, 2.0, 4.0)
_MAX_SIDE = 512

#: (mean, std) of each raw feature over the 80 DCA1 images (images 35-114), measured with
#: ``HeuristicProfiler.calibrate``; rounded so the fingerprint stays readable.
DCA1_CALIBRATION: dict[str, tuple[float, float]] = {
    "noise": (-4.99, 0.59),
    "contrast": (-2.30, 0.42),
    "cnr": (2.69, 0.37),
    "ridge": (0.0147, 0.0070),
    "thin": (0.128, 0.015),
    "small": (3.40, 0.70),
    "clutter": (0.188, 0.064),
}

# field -> {feature: weight} on z-scores (signs: what makes the field larger)
_WEIGHTS: dict[str, dict[str, float]] = {
    "difficulty": {"cnr": -0.6, "clutter": 0.5, "thin": 0.4, "small": 0.3},
    "confidence": {"cnr": 0.8, "clutter": -0.4},
    "boundary": {"contrast": -0.7, "noise": 0.5},
    "thin_structure": {"thin": 1.0, "ridge": 0.2},
    "small_objects": {"small": 1.0},
    "clutter": {"clutter": 1.0, "ridge": -0.3},
}
_GAIN = 1.4
#: reason of the flagged neutral profile a constant image gets (its z-scored features would be made up)
CONSTANT_IMAGE_REASON = (
    "constant image (no contrast between its 1st and 99th intensity percentiles): nothing to profile"
)


def _smooth(x: np.ndarray, s: float) -> np.ndarray:
    return ndi.gaussian_filter(x, s, mode="reflect", truncate=3.0)


def _ridge(g: np.ndarray, s: float) -> np.ndarray:
    """Scale-normalised dark-ridge response of a smoothed image (largest Hessian eigenvalue, if it dominates)."""
    p = np.pad(g, 1, mode="edge")
    xx = p[1:-1, 2:] - 2 * g + p[1:-1, :-2]
    yy = p[2:, 1:-1] - 2 * g + p[:-2, 1:-1]
    xy = 0.25 * (p[2:, 2:] - p[2:, :-2] - p[:-2, 2:] + p[:-2, :-2])
    tr = xx + yy
    disc = np.sqrt((xx - yy) ** 2 + 4 * xy * xy)
    l1 = 0.5 * (tr + disc)  # largest eigenvalue: positive across a dark line
    l2 = 0.5 * (tr - disc)
    r = np.where(np.abs(l2) < l1, l1, 0.0)
    return (s * s) * r


def image_features(image: Any) -> dict[str, float]:
    """Raw features of one image (see the module docstring); deterministic, about 10 ms for 300x300."""
    x = canonical_image(image)
    h, w = x.shape
    if max(h, w) > _MAX_SIDE:  # keep cost and the pixel scales bounded on large images
        f = _MAX_SIDE / max(h, w)
        # keep a few pixels on the short side (a 60000 x 40 strip would otherwise become 512 x 0)
        x = ndi.zoom(x, [max(f, min(1.0, 8.0 / s)) for s in (h, w)], order=1, prefilter=False)
    flat = x.ravel()
    k1, k99 = int(0.01 * (flat.size - 1)), int(0.99 * (flat.size - 1))
    part = np.partition(flat, (k1, k99))
    lo, hi = float(part[k1]), float(part[k99])
    if not hi > lo:  # constant image: nothing to see
        return {"noise": 0.0, "contrast": 0.0, "cnr": 0.0, "ridge": 0.0, "thin": 0.0, "small": 0.0, "clutter": 0.0}
    xn = np.clip((x - lo) / (hi - lo), -0.5, 1.5).astype(np.float32)
    lap = ndi.laplace(xn)
    noise = float(np.median(np.abs(lap - np.median(lap)))) * 1.4826 / math.sqrt(20.0)
    gs = [_smooth(xn, s) for s in _SCALES]
    rs = [_ridge(g, s) for g, s in zip(gs, _SCALES)]
    r = np.maximum(np.maximum(rs[0], rs[1]), rs[2])
    kr = int(0.92 * (r.size - 1))
    thr = float(np.partition(r.ravel(), kr)[kr])
    vess = r > max(thr, 1e-6)
    nv = int(vess.sum())
    if nv:
        # local contrast: surroundings (sigma 8) minus the vessel itself, robust to global shading
        contrast = float(np.median((_smooth(gs[1], 7.75) - gs[0])[vess]))
        thin = float(rs[0][vess].sum() / max(float(sum(ri[vess].sum() for ri in rs)), 1e-12))
        lab, n = ndi.label(vess)
        sizes = np.bincount(lab.ravel())[1:]
        small = math.log1p(int((sizes < 30).sum()))
    else:
        contrast, thin, small = 0.0, 0.0, 0.0
    # noise and contrast spread over an order of magnitude across XCA images: work in logs
    noise = math.log(max(noise, 1e-4))
    contrast = math.log(max(contrast, 1e-3))
    cnr = contrast - noise
    clutter = float(_smooth(gs[2], 15.5).std())
    return {
        "noise": noise,
        "contrast": contrast,
        "cnr": cnr,
        "ridge": float(r.mean()),
        "thin": thin,
        "small": small,
        "clutter": clutter,
    }


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(z, 40.0), -40.0)))


class HeuristicProfiler(Profiler):
    """Image statistics -> profile; deterministic, no weights, cheap (safe in DataLoader workers).

    Args:
        calibration: ``{feature: (mean, std)}`` for the z-scores, or the path of a JSON file holding that
            mapping (``python -m monai_vlmfilm.profiles calibrate`` writes one); features not given keep
            :data:`DCA1_CALIBRATION`. Calibrate on a data set whose statistics differ from real XCA (e.g.
            the synthetic set) or fields saturate at 0 or 1.
        gain: slope of the logistic mapping (larger spreads fields further toward 0 / 1).
    """

    name = "heuristic"
    heavy = False

    def __init__(
        self, calibration: dict[str, Sequence[float]] | str | os.PathLike | None = None, gain: float = _GAIN
    ) -> None:
        if isinstance(calibration, (str, os.PathLike)):
            calibration = self.load_calibration(calibration)
        cal = dict(DCA1_CALIBRATION)
        for k, v in (calibration or {}).items():
            if not (isinstance(v, (list, tuple)) and len(v) == 2):
                raise ValueError(f"calibration of {k!r} must be [mean, std], got {v!r}")
            mean, std = float(v[0]), float(v[1])
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise ValueError(f"calibration of {k!r} needs a finite mean and a std > 0, got {v!r}")
            cal[k] = (mean, std)
        unknown = set(cal) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown heuristic features in calibration: {sorted(unknown)}")
        self.calibration = cal
        self.gain = float(gain)

    def fingerprint_fields(self) -> dict[str, Any]:
        return {
            **super().fingerprint_fields(),
            "version": HEURISTIC_VERSION,
            "calibration": {k: list(v) for k, v in sorted(self.calibration.items())},
            "weights": _WEIGHTS,
            "gain": self.gain,
        }

    def profile_from_features(self, feats: dict[str, float]) -> VLMProfile:
        if not any(feats.values()):  # what image_features gives a constant image: no statistic to map
            return VLMProfile(confidence=0.0, source="fallback", reason=CONSTANT_IMAGE_REASON)
        z = {k: (feats[k] - m) / (s if s > 0 else 1.0) for k, (m, s) in self.calibration.items()}
        vals = {f: _sigmoid(self.gain * sum(wt * z[k] for k, wt in ws.items())) for f, ws in _WEIGHTS.items()}
        if feats["contrast"] <= 0.0 and feats["ridge"] <= 0.0:  # constant / empty image: nothing to trust
            vals["confidence"] = 0.0
        return VLMProfile(
            difficulty=1.0 + 4.0 * vals["difficulty"],
            confidence=vals["confidence"],
            focus={k: vals[k] for k in ("boundary", "thin_structure", "small_objects", "clutter")},
            source=self.name,
        )

    def profile(self, images: Sequence[Any]) -> list[VLMProfile]:
        return [self.profile_from_features(image_features(img)) for img in images]

    @staticmethod
    def calibrate(images: Sequence[Any]) -> dict[str, tuple[float, float]]:
        """Feature ``(mean, std)`` over ``images`` (paths or arrays), for ``HeuristicProfiler(calibration=...)``."""
        feats = [image_features(img) for img in images]
        out = {}
        for k in FEATURES:
            v = [f[k] for f in feats]
            out[k] = (round(float(np.mean(v)), 6), round(max(float(np.std(v)), 1e-6), 6))
        return out

    @staticmethod
    def save_calibration(
        path: str | os.PathLike, calibration: Mapping[str, Sequence[float]], images: int, **extra: Any
    ) -> Path:
        """Write ``calibration`` (from :meth:`calibrate`) as the JSON :meth:`load_calibration` reads, with the
        heuristic's version, the number of ``images`` it was measured on and any ``extra`` provenance fields."""
        doc = {
            "version": HEURISTIC_VERSION,
            "images": int(images),
            **extra,
            "calibration": {k: list(v) for k, v in calibration.items()},
        }
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(doc, indent=1) + "\n")
        return p

    @staticmethod
    def load_calibration(path: str | os.PathLike) -> dict[str, list[float]]:
        """Read a calibration JSON (``{feature: [mean, std]}``, or ``{"calibration": {...}}``); only data, no code."""
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read heuristic calibration {os.fspath(path)!r}: {e}") from e
        doc = doc.get("calibration", doc) if isinstance(doc, dict) else doc
        if not isinstance(doc, dict):
            raise ValueError(f"heuristic calibration {os.fspath(path)!r} must be a JSON object of [mean, std] pairs")
        return doc
