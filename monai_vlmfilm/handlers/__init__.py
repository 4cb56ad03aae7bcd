"""Ignite handlers of monai-vlmfilm (referenced from the bundle configs as ``monai_vlmfilm.handlers.<Name>``)."""

from .checkpoint import (
    AtomicCheckpointSaver,
    AtomicDiskSaver,
    EMAMomentumState,
    NetworkCheckpointLoader,
    ResumeCheckpointLoader,
    TrainingRandomState,
)
from .error_pictures import ErrorPictureSaver
from .film_stats import FiLMStatsHandler
from .gradient_clip import GradientClipHandler
from .metrics_summary import MetricsSummaryJSON
from .progress import ProgressHandler

__all__ = [
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "EMAMomentumState",
    "ErrorPictureSaver",
    "FiLMStatsHandler",
    "GradientClipHandler",
    "MetricsSummaryJSON",
    "NetworkCheckpointLoader",
    "ProgressHandler",
    "ResumeCheckpointLoader",
    "TrainingRandomState",
]
