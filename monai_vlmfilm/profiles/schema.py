"""The image profile a VLM (or a heuristic) writes once per image, and its vector form.

Vector layout (``VLMProfile.to_vector()``, float32, length ``PROFILE_DIM``):

=====  ==========================  ==========================================
index  name                        value
=====  ==========================  ==========================================
0      ``difficulty``              ``(difficulty - 1) / 4`` in [0, 1]
1      ``confidence``              [0, 1]
2      ``focus.boundary``          [0, 1]
3      ``focus.thin_structure``    [0, 1]
4      ``focus.small_objects``     [0, 1]
5      ``focus.clutter``           [0, 1]
6      ``is_fallback``             1.0 when the profile is a fallback, else 0.0
=====  ==========================  ==========================================
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

__all__ = [
    "FOCUS_KEYS",
    "VECTOR_FIELDS",
    "PROFILE_DIM",
    "DIFFICULTY_INDEX",
    "FALLBACK_INDEX",
    "VLMProfile",
    "DEFAULT_PROFILE",
    "PROFILE_KEY",
    "as_profile_batch",
]

#: the key of the profile vector in a data dict, a batch and an image's meta dict (MONAI Label route).
PROFILE_KEY = "vlm_profile"

FOCUS_KEYS: tuple[str, ...] = ("boundary", "thin_structure", "small_objects", "clutter")
VECTOR_FIELDS: tuple[str, ...] = ("difficulty", "confidence", *FOCUS_KEYS, "is_fallback")
PROFILE_DIM: int = len(VECTOR_FIELDS)
DIFFICULTY_INDEX: int = 0
FALLBACK_INDEX: int = VECTOR_FIELDS.index("is_fallback")


def _clamp(value: float, lo: float, hi: float, default: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    if not math.isfinite(v):
        return default
    return min(max(v, lo), hi)


@dataclass(frozen=True)
class VLMProfile:
    """One image's profile.

    Args:
        difficulty: segmentation difficulty in [1, 5] (may be fractional: scored mode gives an expectation).
        confidence: the profiler's confidence in [0, 1].
        focus: exactly the keys of ``FOCUS_KEYS``, each in [0, 1].
        source: profiler name (``"qwen2_5_vl"``, ``"heuristic"``, ``"oracle"``) or ``"fallback"``.
        reason: why a fallback was used, or which fields were filled / clamped ("" when clean).
    """

    difficulty: float = 3.0
    confidence: float = 0.5
    focus: dict[str, float] = field(default_factory=lambda: {k: 0.5 for k in FOCUS_KEYS})
    source: str = "default"
    reason: str = ""

    def __post_init__(self) -> None:
        # Always in range, whatever the caller passed: the network never sees out-of-range values.
        object.__setattr__(self, "difficulty", _clamp(self.difficulty, 1.0, 5.0, 3.0))
        object.__setattr__(self, "confidence", _clamp(self.confidence, 0.0, 1.0, 0.5))
        focus = dict(self.focus or {})
        object.__setattr__(self, "focus", {k: _clamp(focus.get(k, 0.5), 0.0, 1.0, 0.5) for k in FOCUS_KEYS})

    @property
    def is_fallback(self) -> bool:
        return self.source == "fallback"

    def to_json_dict(self) -> dict[str, Any]:
        """The profile JSON (``difficulty``, ``confidence``, ``focus``) plus provenance (``source``, ``reason``)."""
        return {
            "difficulty": self.difficulty,
            "confidence": self.confidence,
            "focus": dict(self.focus),
            "source": self.source,
            "reason": self.reason,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), sort_keys=True)

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> VLMProfile:
        """Strict inverse of ``to_json_dict`` (for trusted, validated documents such as cache entries).

        Raises:
            ValueError: when a field is missing, of the wrong type or out of range.
        """
        if not isinstance(d, dict):
            raise ValueError(f"profile must be a JSON object, got {type(d).__name__}")
        focus = d.get("focus")
        if not isinstance(focus, dict) or set(focus) != set(FOCUS_KEYS):
            raise ValueError(f"profile 'focus' must have exactly the keys {FOCUS_KEYS}")
        checks = [("difficulty", d.get("difficulty"), 1.0, 5.0), ("confidence", d.get("confidence"), 0.0, 1.0)]
        checks += [(f"focus.{k}", focus[k], 0.0, 1.0) for k in FOCUS_KEYS]
        for name, v, lo, hi in checks:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ValueError(f"profile field {name}={v!r} is not a number in [{lo}, {hi}]")
        if not isinstance(d.get("source"), str) or not isinstance(d.get("reason", ""), str):
            raise ValueError("profile 'source' / 'reason' must be strings")
        return cls(d["difficulty"], d["confidence"], dict(focus), d["source"], d.get("reason", ""))

    @classmethod
    def from_json(cls, text: str) -> VLMProfile:
        return cls.from_json_dict(json.loads(text))

    def to_vector(self) -> np.ndarray:
        """float32 ``[PROFILE_DIM]`` in the layout documented in this module's docstring."""
        vec = [(self.difficulty - 1.0) / 4.0, self.confidence, *(self.focus[k] for k in FOCUS_KEYS)]
        vec.append(1.0 if self.is_fallback else 0.0)
        return np.asarray(vec, dtype=np.float32)

    def as_fallback(self, reason: str) -> VLMProfile:
        return replace(self, source="fallback", reason=reason)


#: The neutral profile (difficulty 3, every other value 0.5). Fallbacks are ``DEFAULT_PROFILE.as_fallback(reason)``.
DEFAULT_PROFILE = VLMProfile()


def as_profile_batch(
    profile: Any,
    batch_size: int | None = None,
    profile_dim: int | None = None,
    device: torch.device | str | None = None,
    non_blocking: bool = False,
) -> torch.Tensor:
    """A profile batch as a detached float32 ``[B, P]`` tensor: the one coercion of the engine, inferer and network.

    The result is detached: no gradient ever flows back into whatever produced the profile (the VLM is frozen), and
    a MetaTensor becomes a plain tensor (no meta bookkeeping in the forward pass).

    Args:
        profile: tensor / MetaTensor / array / list, ``[P]``, ``[1, P]`` or ``[B, P]``, or a list of ``[P]`` tensors
            (a decollated batch).
        batch_size: the input's batch size; a single profile is broadcast to it. None: not checked.
        profile_dim: the expected ``P``; None: not checked.
        device: target device.
        non_blocking: passed to ``Tensor.to``.

    Raises:
        ValueError: when the shape does not fit ``batch_size`` x ``profile_dim``.
    """
    if isinstance(profile, torch.Tensor):
        p = profile.detach()
    elif isinstance(profile, (list, tuple)) and profile and isinstance(profile[0], torch.Tensor):
        p = torch.stack([q.detach() for q in profile])
    else:
        p = torch.as_tensor(np.asarray(profile, dtype=np.float32))
    if hasattr(p, "as_tensor"):  # MetaTensor
        p = p.as_tensor()
    # only when it changes something: a traced network (networks/export.py) would record `device` as a constant
    # and then move the profile back to the tracing device on every other device
    if p.dtype != torch.float32 or (device is not None and p.device != torch.device(device)):
        p = p.to(device=device, dtype=torch.float32, non_blocking=non_blocking)
    if p.ndim == 1:
        p = p[None]
    dim = "P" if profile_dim is None else profile_dim
    if p.ndim != 2 or (profile_dim is not None and p.shape[1] != profile_dim):
        raise ValueError(f"profile must have shape [B, {dim}] (or [{dim}]), got {tuple(p.shape)}.")
    if batch_size is not None and p.shape[0] == 1 and batch_size > 1:
        p = p.expand(batch_size, -1)
    if batch_size is not None and p.shape[0] != batch_size:
        raise ValueError(f"profile batch size {p.shape[0]} does not match the input batch size {batch_size}.")
    return p
