"""Ignite handler that writes the evaluation's metrics as one JSON summary."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["MetricsSummaryJSON"]

logger = logging.getLogger(__name__)


def _to_float(v: Any) -> float | None:
    try:
        f = float(torch.as_tensor(v).float().mean()) if isinstance(v, torch.Tensor) else float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class MetricsSummaryJSON:
    """Write the evaluation's metrics as JSON when the evaluator finishes (next to ``MetricsSaver``'s CSVs).

    ``{"num_images": N, "metrics": {name: aggregate}, "per_metric": {name: {mean, std, median, min, max,
    notnans}}, "extra": {...}}``; per-image statistics come from ``engine.state.metric_details`` (NaN / inf
    excluded and counted). Only rank 0 writes in distributed runs.

    Args:
        save_path: output JSON file.
        extra: anything JSON-serialisable to record with the numbers (e.g. checkpoint path, use_vlm_film).
    """

    def __init__(self, save_path: str, extra: Mapping[str, Any] | None = None) -> None:
        self.save_path = save_path
        self.extra = dict(extra or {})

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def summary(self, engine: Any) -> dict[str, Any]:
        metrics = {k: _to_float(v) for k, v in engine.state.metrics.items()}
        per_metric: dict[str, dict[str, float | int | None]] = {}
        n_images = 0
        for name, details in (getattr(engine.state, "metric_details", None) or {}).items():
            arr = torch.as_tensor(details).float().reshape(len(details), -1).nanmean(dim=1).cpu().numpy()
            n_images = max(n_images, len(arr))
            ok = arr[np.isfinite(arr)]
            stats: dict[str, float | int | None] = {"notnans": int(ok.size), "nonfinite": int(arr.size - ok.size)}
            for op, fn in (("mean", np.mean), ("std", np.std), ("median", np.median), ("min", np.min), ("max", np.max)):
                stats[op] = float(fn(ok)) if ok.size else None
            per_metric[name] = stats
        return {"num_images": n_images, "metrics": metrics, "per_metric": per_metric, "extra": self.extra}

    def __call__(self, engine: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        out = self.summary(engine)
        os.makedirs(os.path.dirname(os.path.abspath(self.save_path)), exist_ok=True)
        tmp = f"{self.save_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2, sort_keys=True)
        os.replace(tmp, self.save_path)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in out["metrics"].items() if v is not None)
        logger.info(f"evaluation summary ({out['num_images']} images): {shown} -> {self.save_path}")
