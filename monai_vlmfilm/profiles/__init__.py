"""Image profiles: schema, parsing, content-addressed cache and profilers.

``QwenVLProfiler`` is imported lazily (on first attribute access) so that importing this package
never pulls in transformers, and a missing or broken ``qwen`` module never breaks other imports
(it is left out of ``__all__`` for the same reason: ``from ... import *`` must not import it).
"""

from typing import Any

from .base import ImageReadError, Profiler, as_http_error, canonical_image, create_profiler, is_heavy, pixel_digest
from .heuristic import HeuristicProfiler
from .oracle import OracleProfiler
from .parsing import parse_profile
from .schema import DEFAULT_PROFILE, FALLBACK_INDEX, FOCUS_KEYS, PROFILE_DIM, VECTOR_FIELDS, VLMProfile
from .store import ProfileStore, ProfileStoreError

__all__ = [
    "DEFAULT_PROFILE",
    "FALLBACK_INDEX",
    "FOCUS_KEYS",
    "PROFILE_DIM",
    "VECTOR_FIELDS",
    "VLMProfile",
    "parse_profile",
    "ProfileStore",
    "ProfileStoreError",
    "Profiler",
    "ImageReadError",
    "as_http_error",
    "canonical_image",
    "pixel_digest",
    "create_profiler",
    "is_heavy",
    "HeuristicProfiler",
    "OracleProfiler",
]


def __getattr__(name: str) -> Any:
    if name == "QwenVLProfiler":
        from .qwen import QwenVLProfiler

        return QwenVLProfiler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
