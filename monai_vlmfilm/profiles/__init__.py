"""Image profiles: schema, parsing, content-addressed cache and profilers."""

from .schema import DEFAULT_PROFILE, FALLBACK_INDEX, FOCUS_KEYS, PROFILE_DIM, VECTOR_FIELDS, VLMProfile

__all__ = ["DEFAULT_PROFILE", "FALLBACK_INDEX", "FOCUS_KEYS", "PROFILE_DIM", "VECTOR_FIELDS", "VLMProfile"]
