"""FiLM γ/β magnitudes of a trained network, measured by running its FiLM heads on given profiles."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from monai_vlmfilm.networks.checkpoint import unwrap

__all__ = ["film_magnitudes"]


@torch.no_grad()
def film_magnitudes(network: Any, profiles: np.ndarray | torch.Tensor) -> dict[str, dict[str, float]]:
    """Per decoder stage: mean and max of |γ| and |β| over channels and images, and the mean gate.

    Args:
        network: a :class:`~monai_vlmfilm.networks.FiLMFlowUNet` built with ``use_vlm_film=True``.
        profiles: ``[N, PROFILE_DIM]`` profile vectors (e.g. the evaluation images' profiles).

    Returns:
        ``{stage: {"gamma_abs_mean", "beta_abs_mean", "gamma_abs_max", "beta_abs_max", "gate_mean",
        "gamma_image_std"}}``; ``gamma_image_std`` is the spread of γ across images (mean over channels), which
        is 0 when the heads ignore the profile.
    """
    net = unwrap(network)
    if not getattr(net, "use_vlm_film", False):
        raise ValueError("film_magnitudes needs a network built with use_vlm_film=True")
    net.eval()
    device = next(net.parameters()).device
    p = torch.as_tensor(np.asarray(profiles, dtype=np.float32), device=device)
    out: dict[str, dict[str, float]] = {}
    for stage, (gamma, beta, gate) in net.film_parameters(p).items():
        g = gamma.flatten(1).float()
        b = beta.flatten(1).float()
        out[str(stage)] = {
            "gamma_abs_mean": float(g.abs().mean()),
            "beta_abs_mean": float(b.abs().mean()),
            "gamma_abs_max": float(g.abs().max()),
            "beta_abs_max": float(b.abs().max()),
            "gate_mean": float(gate.float().mean()),
            "gamma_image_std": float(g.std(dim=0).mean()) if g.shape[0] > 1 else 0.0,
        }
    return out
