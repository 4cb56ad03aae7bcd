"""Training objective of the flow segmentation network: velocity MSE plus a segmentation loss on the x0 estimate.

Velocity MSE alone weights the mask error by ``1 / s**2`` (``x0 - x0_hat = s * (v - v_hat)``): it spends its effort on
the nearly clean regime that few-step inference never visits, and it is blind to the 5 % foreground imbalance of
vessel masks. :class:`FlowSegLoss` adds MONAI's ``DiceCELoss`` (optionally a soft-clDice term) on the network's
estimate of the clean mask at the sampled time, ``x0_hat = x_t + s * v_hat``, which is exactly what one Euler step
from ``s`` to 0 returns, so training optimises what inference outputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from monai.losses import DiceCELoss, SoftclDiceLoss

__all__ = ["FlowSegLoss", "x0_estimate"]


def x0_estimate(velocity: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The clean mask (flow space, [-1, 1]) implied by a velocity at noise level ``sigma = t / T``.

    With ``x_t = (1 - s) * x0 + s * noise`` and ``v = x0 - noise``: ``x0 = x_t + s * v``.

    Args:
        velocity: predicted velocity ``[B, C, *spatial]``.
        x_t: the noisy mask the velocity was predicted from, same shape.
        sigma: ``[B]`` noise levels in [0, 1].
    """
    s = sigma.to(velocity.dtype).reshape(-1, *([1] * (velocity.ndim - 1)))
    return x_t.to(velocity.dtype) + s * velocity


class FlowSegLoss(nn.Module):
    """``velocity_weight * MSE(v_hat, v) + seg_weight * DiceCE(k * x0_hat, mask) + cldice_weight * softclDice``.

    Used as ``SupervisedTrainer``'s ``loss_function`` with
    ``FlowMatchingPrepareBatch(target="flow")``, whose target is a mapping with ``velocity`` (``x0 - noise``),
    ``x_t``, ``sigma`` (``[B]``, ``t / T``) and ``mask`` (``{0, 1}``). The segmentation terms read
    ``k * x0_hat`` as logits (``logit_scale`` k): the decision boundary ``x0_hat = 0`` is the inferer's
    probability 0.5, and ``x0_hat = +-1`` maps to ``sigmoid(+-k)``.

    A plain velocity tensor as target (``FlowMatchingPrepareBatch(target="velocity")``) gives the velocity MSE
    alone, whatever the weights: old configurations keep their meaning.

    Args:
        velocity_weight: weight of the velocity MSE (keeps the multi-step ODE field meaningful).
        seg_weight: weight of ``DiceCELoss(sigmoid=True)`` on the x0 estimate.
        cldice_weight: weight of MONAI's ``SoftclDiceLoss`` on ``sigmoid(k * x0_hat)`` (0 = off).
        logit_scale: k, the scale from flow space to logits.
        lambda_dice, lambda_ce: the Dice and cross-entropy weights inside ``DiceCELoss``.
        cldice_iterations: soft-skeleton iterations of ``SoftclDiceLoss`` (about the largest vessel radius in pixels).
    """

    def __init__(
        self,
        velocity_weight: float = 1.0,
        seg_weight: float = 1.0,
        cldice_weight: float = 0.0,
        logit_scale: float = 4.0,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        cldice_iterations: int = 5,
    ) -> None:
        super().__init__()
        if min(velocity_weight, seg_weight, cldice_weight) < 0 or velocity_weight + seg_weight + cldice_weight <= 0:
            raise ValueError(
                f"loss weights must be >= 0 with a positive sum, got velocity {velocity_weight}, "
                f"seg {seg_weight}, cldice {cldice_weight}."
            )
        if logit_scale <= 0:
            raise ValueError(f"logit_scale must be positive, got {logit_scale}.")
        self.velocity_weight = float(velocity_weight)
        self.seg_weight = float(seg_weight)
        self.cldice_weight = float(cldice_weight)
        self.logit_scale = float(logit_scale)
        self.dice_ce = DiceCELoss(sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        self.cldice = SoftclDiceLoss(iter_=cldice_iterations, sigmoid=True) if cldice_weight > 0 else None

    def forward(self, velocity: torch.Tensor, target: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """
        Args:
            velocity: the network's output ``[B, C, *spatial]``.
            target: the ``FlowMatchingPrepareBatch(target="flow")`` mapping, or a velocity tensor.
        """
        velocity = velocity.float()
        if isinstance(target, torch.Tensor):
            return torch.mean((velocity - target.float()) ** 2)
        missing = [k for k in ("velocity", "x_t", "sigma", "mask") if k not in target]
        if missing:
            raise KeyError(
                f"FlowSegLoss target lacks {missing}: use FlowMatchingPrepareBatch(target='flow'), got keys "
                f"{sorted(target)}."
            )
        loss = velocity.new_zeros(())
        if self.velocity_weight > 0:
            loss = loss + self.velocity_weight * torch.mean((velocity - target["velocity"].float()) ** 2)
        if self.seg_weight > 0 or self.cldice is not None:
            logits = self.logit_scale * x0_estimate(velocity, target["x_t"].float(), target["sigma"])
            mask = target["mask"].float()
            if self.seg_weight > 0:
                loss = loss + self.seg_weight * self.dice_ce(logits, mask)
            if self.cldice is not None:
                loss = loss + self.cldice_weight * self.cldice(logits, mask)
        return loss
