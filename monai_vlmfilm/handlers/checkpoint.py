"""Ignite handler that loads a bundle checkpoint into the network across the ``use_vlm_film`` switch."""

from __future__ import annotations

from typing import Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_vlmfilm.networks.checkpoint import load_network_weights

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["NetworkCheckpointLoader"]


class NetworkCheckpointLoader:
    """Ignite handler (or callable on an engine) that loads network weights with :func:`load_network_weights`.

    Unlike ``monai.handlers.CheckpointLoader`` it accepts FiLM-on checkpoints in FiLM-off networks and vice
    versa, so one shipped ``model.pt`` serves both settings of ``use_vlm_film``.

    Args:
        load_path: the checkpoint file.
        network: the network (DDP wrappers are unwrapped).
        map_location: passed to ``torch.load``.
    """

    def __init__(self, load_path: str, network: torch.nn.Module, map_location: Any = "cpu") -> None:
        self.load_path = load_path
        self.network = network
        self.map_location = map_location

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        load_network_weights(self.network, self.load_path, self.map_location)
