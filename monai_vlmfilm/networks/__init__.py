"""Networks: profile encoder, FiLM heads, the FiLM flow-matching UNet, its checkpoint loading and its export."""

from .checkpoint import (
    FILM_KEY_PREFIXES,
    CheckpointError,
    UnsafeCheckpointError,
    describe_missing_keys,
    find_resume_checkpoint,
    load_network_state,
    load_network_weights,
    load_off_checkpoint,
    read_checkpoint,
    unwrap,
)
from .export import FlowODESegmenter
from .film import AdaptiveFiLMHead, ProfileEncoder, film_modulate
from .fixed_time import FixedTimeVelocity
from .flow_unet import FiLMFlowUNet, as_profile_batch
from .image_encoder import ImageSkipEncoder, skip_layout

__all__ = [
    "AdaptiveFiLMHead",
    "CheckpointError",
    "FILM_KEY_PREFIXES",
    "FiLMFlowUNet",
    "FixedTimeVelocity",
    "FlowODESegmenter",
    "ImageSkipEncoder",
    "ProfileEncoder",
    "as_profile_batch",
    "UnsafeCheckpointError",
    "describe_missing_keys",
    "find_resume_checkpoint",
    "film_modulate",
    "load_network_state",
    "load_network_weights",
    "load_off_checkpoint",
    "read_checkpoint",
    "skip_layout",
    "unwrap",
]
