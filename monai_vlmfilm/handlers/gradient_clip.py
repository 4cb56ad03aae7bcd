"""Ignite handler that clips the gradient norm of a MONAI trainer between ``backward`` and ``optimizer.step``."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import IterationEvents

__all__ = ["GradientClipHandler"]


class GradientClipHandler:
    """Clip the global gradient norm of ``engine.network`` at ``max_norm`` after every backward pass.

    ``SupervisedTrainer`` fires ``IterationEvents.BACKWARD_COMPLETED`` after ``loss.backward()`` and before
    ``optimizer.step()``; with AMP the gradients are unscaled first (``GradScaler.unscale_``, which the scaler's
    ``step`` then knows about), so ``max_norm`` always refers to the true gradients. The last norm before clipping
    is kept in ``engine.state.grad_norm`` for loggers.

    Args:
        max_norm: largest allowed L2 norm of all gradients together; ``<= 0`` turns clipping off.
        norm_type: the ``p`` of the norm (``torch.nn.utils.clip_grad_norm_``).
    """

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)

    def attach(self, engine: Any) -> None:
        if self.max_norm <= 0:
            return
        # MONAI workflows register IterationEvents in their constructor
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm, norm_type=self.norm_type)
        engine.state.grad_norm = float(norm)
