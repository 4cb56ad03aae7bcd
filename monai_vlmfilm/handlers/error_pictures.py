"""Ignite handler that draws an evaluation's errors: one overlay per image and a worst / best summary sheet."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from monai.utils import IgniteInfo, min_version, optional_import

from monai_vlmfilm.data.datalist import split_name

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
Image, _ = optional_import("PIL.Image")
skeletonize, _ = optional_import("skimage.morphology", name="skeletonize")

__all__ = ["ERROR_COLOURS", "error_overlay", "ErrorPictureSaver"]

logger = logging.getLogger(__name__)

#: RGB of each class of pixel in the overlay: hits, false vessels, missed vessel, missed centreline (what clDice counts).
ERROR_COLOURS: dict[str, tuple[int, int, int]] = {
    "true_positive": (0, 200, 0),
    "false_positive": (230, 0, 230),
    "false_negative": (0, 120, 255),
    "missed_centreline": (255, 220, 0),
}


def _plane(x: Any) -> np.ndarray:
    """``[C, H, W]`` / ``[H, W]`` tensor or array -> float numpy ``[H, W]`` (channel 0, or 1 of a one-hot pair)."""
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
    while a.ndim > 2:
        a = a[1] if a.shape[0] == 2 else a[0]
    return a


def error_overlay(image: Any, pred: Any, label: Any, threshold: float = 0.5) -> tuple[np.ndarray, dict[str, float]]:
    """An RGB ``uint8 [H, W, 3]`` picture of the errors of one prediction, and its counts.

    The image in grey; vessel pixels found (green), false vessels (magenta), missed vessel pixels (blue), and the
    missed part of the true centreline drawn over them (yellow: the skeleton pixels that clDice's sensitivity counts
    as lost). Colours: :data:`ERROR_COLOURS`.

    Returns:
        ``(rgb, {"dice", "true_positive", "false_positive", "false_negative", "missed_centreline"})`` (pixel counts).
    """
    img = _plane(image)
    p, g = _plane(pred) >= threshold, _plane(label) >= threshold
    if img.shape != p.shape or p.shape != g.shape:
        raise ValueError(f"image {img.shape}, pred {p.shape} and label {g.shape} must have the same size.")
    lo, hi = float(np.min(img)), float(np.max(img))
    grey = ((img - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(img)).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    masks = {
        "true_positive": p & g,
        "false_positive": p & ~g,
        "false_negative": ~p & g,
        "missed_centreline": (skeletonize(g) & ~p) if g.any() else np.zeros_like(g),
    }
    for name, m in masks.items():  # later classes draw over earlier ones (the centreline over the missed area)
        rgb[m] = ERROR_COLOURS[name]
    s = p.sum() + g.sum()
    counts = {k: float(m.sum()) for k, m in masks.items()}
    counts["dice"] = float(2 * masks["true_positive"].sum() / s) if s else 1.0
    return rgb, counts


class ErrorPictureSaver:
    """Write ``<name>_errors.png`` for every evaluated image, ``errors.csv`` and ``errors_summary.png``.

    Attach to a ``SupervisedEvaluator`` whose post-processed output holds ``image``, ``pred`` and ``label``. At the end
    of the run, ``errors.csv`` lists each image with its Dice, its error pixel counts and the path of its picture
    (worst first), and ``errors_summary.png`` shows the ``n_show`` worst and best images by Dice side by side.

    Args:
        output_dir: folder of the pictures (created).
        image_key, pred_key, label_key: keys in each decollated output item.
        threshold: binarisation of ``pred`` and ``label``.
        n_show: images per row of the summary sheet (worst row, best row).
        reverse_indexing: the arrays are in MONAI's ``(x, y)`` layout (``LoadImage`` of a PNG): transpose the pictures
            back to the file's ``(row, column)`` view, as MONAI's PNG writer does.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        image_key: str = "image",
        pred_key: str = "pred",
        label_key: str = "label",
        threshold: float = 0.5,
        n_show: int = 4,
        reverse_indexing: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.image_key, self.pred_key, self.label_key = image_key, pred_key, label_key
        self.threshold = float(threshold)
        self.n_show = int(n_show)
        self.reverse_indexing = bool(reverse_indexing)
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def _name(self, item: dict, index: int) -> str:
        meta = getattr(item.get(self.image_key), "meta", None) or item.get(f"{self.image_key}_meta_dict") or {}
        src = meta.get("filename_or_obj")
        if isinstance(src, (list, tuple)):
            src = src[0] if src else None
        if isinstance(src, (str, os.PathLike)) and str(src):
            return split_name(src)[0]
        return f"image_{index:05d}"

    def iteration_completed(self, engine: Any) -> None:
        items = engine.state.output
        items = items if isinstance(items, list) else [items]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for item in items:
            if not isinstance(item, dict) or item.get(self.label_key) is None:
                continue
            rgb, counts = error_overlay(item[self.image_key], item[self.pred_key], item[self.label_key], self.threshold)
            name = self._name(item, len(self.rows))
            path = self.output_dir / f"{name}_errors.png"
            Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 0, 2)) if self.reverse_indexing else rgb).save(path)
            self.rows.append({"image": name, "picture": str(path), **counts})

    def epoch_completed(self, engine: Any) -> None:
        if not self.rows:
            return
        rows = sorted(self.rows, key=lambda r: r["dice"])
        with open(self.output_dir / "errors.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        self._summary(rows)
        logger.info(f"error pictures of {len(rows)} images -> {self.output_dir} (errors.csv, errors_summary.png)")

    def _summary(self, rows: list[dict[str, Any]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        n = min(self.n_show, len(rows))
        worst, best = rows[:n], rows[::-1][:n]
        fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 7), squeeze=False)
        for r, (title, group) in enumerate((("worst", worst), ("best", best))):
            for c, row in enumerate(group):
                ax = axes[r][c]
                ax.imshow(np.asarray(Image.open(row["picture"])))
                ax.set_title(f"{title}: {row['image']}\nDice {row['dice']:.3f}", fontsize=9)
                ax.axis("off")
        handles = [Patch(color=np.array(c) / 255, label=k.replace("_", " ")) for k, c in ERROR_COLOURS.items()]
        fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        fig.savefig(self.output_dir / "errors_summary.png", dpi=110)
        plt.close(fig)
