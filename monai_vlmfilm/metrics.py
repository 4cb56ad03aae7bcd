"""Topology-aware vessel metrics: clDice and Betti-number errors, MONAI-style and as ignite handlers.

All metrics take ``y_pred`` and ``y`` as ``[B, 1, H, W]`` (or ``[B, 1, H, W, D]``) probabilities or binary
masks (a two-channel one-hot input uses channel 1); both are binarised with ``value >= threshold``
(as ``AsDiscrete(threshold=0.5)``). Each returns one value per image, ``[B, 1]``.

Topology conventions (consistent dual pair, so the numbers are well defined on a pixel grid):
foreground is 8-connected in 2D / 26-connected in 3D, background 4-connected / 6-connected.

- ``b0`` = number of foreground components.
- ``b1`` (2D) = number of holes = ``b0 - euler`` (skimage ``euler_number`` with the conventions above);
  a ring has ``b1 = 1``, a figure eight ``b1 = 2``.
- ``b1`` (3D) = ``b0 + b2 - euler`` with ``b2`` the number of enclosed background cavities.

clDice (Shit et al., CVPR 2021) is computed on hard skeletons (``skimage.morphology.skeletonize``) of the
binarised masks: ``Tprec = |S(P) & G| / |S(P)|``, ``Tsens = |S(G) & P| / |S(G)|``,
``clDice = 2 Tprec Tsens / (Tprec + Tsens)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction, optional_import

ndimage, _ = optional_import("scipy.ndimage")
skimage_measure, _ = optional_import("skimage.measure")
skimage_morphology, _ = optional_import("skimage.morphology")

__all__ = ["betti_numbers", "cldice_score", "ClDiceMetric", "BettiErrorMetric", "ClDice", "BettiError"]


def _binarise(x: torch.Tensor, threshold: float, name: str) -> np.ndarray:
    """``[B, C, *spatial]`` -> bool numpy ``[B, *spatial]`` (channel 0, or 1 for one-hot two-channel input)."""
    if x.ndim not in (4, 5):
        raise ValueError(f"{name} must be [B, 1, H, W] or [B, 1, H, W, D], got shape {tuple(x.shape)}.")
    if x.shape[1] == 2:
        x = x[:, 1:2]
    elif x.shape[1] != 1:
        raise ValueError(f"{name} must have one foreground channel (or two one-hot channels), got {x.shape[1]}.")
    return (x[:, 0].detach().float().cpu().numpy() >= threshold).astype(bool)


def betti_numbers(mask: np.ndarray) -> tuple[int, ...]:
    """Betti numbers of a binary 2D mask ``(b0, b1)`` or 3D mask ``(b0, b1, b2)`` (module docstring conventions)."""
    mask = np.asarray(mask).astype(bool)
    if mask.ndim not in (2, 3):
        raise ValueError(f"betti_numbers needs a 2D or 3D mask, got {mask.ndim}D.")
    full = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    b0 = int(ndimage.label(mask, structure=full)[1])
    if not mask.any():
        return (0, 0) if mask.ndim == 2 else (0, 0, 0)
    euler = int(skimage_measure.euler_number(mask, connectivity=mask.ndim))
    if mask.ndim == 2:
        return b0, b0 - euler
    # cavities: background components (6-connected) that do not reach the outside of the volume
    padded = np.pad(~mask, 1, constant_values=True)
    _, n_bg = ndimage.label(padded, structure=ndimage.generate_binary_structure(3, 1))
    b2 = n_bg - 1  # the component touching the padding is the outside
    return b0, b0 + b2 - euler, b2


def cldice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Hard clDice of two binary masks; nan when ``gt`` is empty, 0 when only ``pred`` is empty."""
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if not gt.any():
        return float("nan")
    if not pred.any():
        return 0.0
    s_pred, s_gt = skimage_morphology.skeletonize(pred), skimage_morphology.skeletonize(gt)
    tprec = (s_pred & gt).sum() / max(s_pred.sum(), 1)
    tsens = (s_gt & pred).sum() / max(s_gt.sum(), 1)
    if tprec + tsens == 0:
        return 0.0
    return float(2 * tprec * tsens / (tprec + tsens))


class _PerImageMetric(CumulativeIterationMetric):
    def __init__(self, threshold: float, reduction: MetricReduction | str, get_not_nans: bool) -> None:
        super().__init__()
        self.threshold = threshold
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _per_image(self, pred: np.ndarray, gt: np.ndarray) -> float:
        raise NotImplementedError

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError(f"{type(self).__name__} needs the ground truth y.")
        p = _binarise(y_pred, self.threshold, "y_pred")
        g = _binarise(y, self.threshold, "y")
        if p.shape != g.shape:
            raise ValueError(f"y_pred {p.shape} and y {g.shape} must have the same batch and spatial shape.")
        vals = [self._per_image(pi, gi) for pi, gi in zip(p, g)]
        return torch.tensor(vals, dtype=torch.float32, device=y_pred.device)[:, None]

    def aggregate(self, reduction: MetricReduction | str | None = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Reduce the buffered per-image values (``[N, 1]``) with ``reduction`` (nan entries are skipped)."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class ClDiceMetric(_PerImageMetric):
    """Hard clDice per image (see the module docstring); nan for images whose ground truth is empty.

    Args:
        threshold: binarisation threshold for predictions and labels.
        reduction: ``aggregate()`` reduction (MONAI ``MetricReduction``), default mean over images.
        get_not_nans: ``aggregate()`` also returns the number of non-nan values.
    """

    def __init__(
        self, threshold: float = 0.5, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans=False
    ) -> None:
        super().__init__(threshold, reduction, get_not_nans)

    def _per_image(self, pred: np.ndarray, gt: np.ndarray) -> float:
        return cldice_score(pred, gt)


class BettiErrorMetric(_PerImageMetric):
    """Absolute Betti-number error ``|b_k(pred) - b_k(gt)|`` per image (lower is better).

    Args:
        betti: 0 (connected components) or 1 (loops / holes); 2 (cavities) for 3D inputs.
        threshold: binarisation threshold for predictions and labels.
        reduction: ``aggregate()`` reduction, default mean over images.
        get_not_nans: ``aggregate()`` also returns the number of non-nan values.
    """

    def __init__(
        self,
        betti: int = 0,
        threshold: float = 0.5,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        if betti not in (0, 1, 2):
            raise ValueError(f"betti must be 0, 1 or 2, got {betti}.")
        super().__init__(threshold, reduction, get_not_nans)
        self.betti = betti

    def _per_image(self, pred: np.ndarray, gt: np.ndarray) -> float:
        if self.betti >= pred.ndim:
            raise ValueError(f"Betti-{self.betti} needs a {self.betti + 1}D input, got {pred.ndim}D masks.")
        return float(abs(betti_numbers(pred)[self.betti] - betti_numbers(gt)[self.betti]))


class ClDice(IgniteMetricHandler):
    """Ignite handler of :class:`ClDiceMetric` (for ``key_val_metric`` / ``additional_metrics`` in bundle configs).

    Args:
        threshold: binarisation threshold.
        reduction: reduction over images.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``, e.g. ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: store per-image values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(
            metric_fn=ClDiceMetric(threshold=threshold, reduction=reduction),
            output_transform=output_transform,
            save_details=save_details,
        )


class BettiError(IgniteMetricHandler):
    """Ignite handler of :class:`BettiErrorMetric`.

    Args:
        betti: 0, 1 (or 2 in 3D).
        threshold: binarisation threshold.
        reduction: reduction over images.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``.
        save_details: store per-image values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        betti: int = 0,
        threshold: float = 0.5,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(
            metric_fn=BettiErrorMetric(betti=betti, threshold=threshold, reduction=reduction),
            output_transform=output_transform,
            save_details=save_details,
        )
