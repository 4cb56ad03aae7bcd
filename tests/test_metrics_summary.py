"""The evaluation's JSON summary handler (``monai_vlmfilm.handlers.MetricsSummaryJSON``)."""

from __future__ import annotations

import json

import pytest
import torch

from monai_vlmfilm.handlers import MetricsSummaryJSON


def test_metrics_summary_json(tmp_path):
    class State:
        metrics = {"dice": 0.5, "hd95": float("inf")}
        metric_details = {"dice": torch.tensor([[0.4], [0.6]]), "hd95": torch.tensor([[3.0], [float("inf")]])}

    class Engine:
        state = State()

    h = MetricsSummaryJSON(str(tmp_path / "s.json"), extra={"split": "test"})
    h(Engine())
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["num_images"] == 2 and s["metrics"] == {"dice": 0.5, "hd95": None} and s["extra"] == {"split": "test"}
    assert s["per_metric"]["dice"]["mean"] == pytest.approx(0.5) and s["per_metric"]["dice"]["std"] == pytest.approx(
        0.1
    )
    assert s["per_metric"]["hd95"]["notnans"] == 1 and s["per_metric"]["hd95"]["nonfinite"] == 1
