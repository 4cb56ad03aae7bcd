"""Networks: profile encoder, FiLM heads and the FiLM flow-matching UNet."""

from .film import AdaptiveFiLMHead, ProfileEncoder, film_modulate
from .flow_unet import FILM_KEY_PREFIXES, FiLMFlowUNet, as_profile_batch, describe_missing_keys, load_off_checkpoint

__all__ = [
    "AdaptiveFiLMHead",
    "FILM_KEY_PREFIXES",
    "FiLMFlowUNet",
    "ProfileEncoder",
    "as_profile_batch",
    "describe_missing_keys",
    "film_modulate",
    "load_off_checkpoint",
]
