"""A one-argument view of a flow network, for ``python -m monai.bundle verify_net_in_out``."""

from __future__ import annotations

import torch

__all__ = ["FixedTimeVelocity"]


class FixedTimeVelocity(torch.nn.Module):
    """``network(x)`` at a fixed flow time (and no profile): a one-argument view of a flow network.

    ``python -m monai.bundle verify_net_in_out`` calls ``net(x)`` with one tensor; the flow network also needs
    ``timesteps``. The bundle configs expose ``network_verify`` (this wrapper around ``network_def``) for it.

    Args:
        network: a velocity network called as ``network(x, timesteps=t)``.
        timestep: the flow time used for every call.
    """

    def __init__(self, network: torch.nn.Module, timestep: float = 500.0) -> None:
        super().__init__()
        self.network = network
        self.timestep = float(timestep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.full((x.shape[0],), self.timestep, dtype=torch.float32, device=x.device)
        return self.network(x, timesteps=t)
