"""Profiles from the synthetic generator's ground-truth factors: the upper bound for experiments.

Datalist items of ``monai_vlmfilm.data.synthetic`` carry ``"factors"``: ``contrast`` (0..1, higher is
easier), ``noise``, ``blur``, ``catheter`` (0/1), ``overlaps``, ``thin_fraction``, ``clutter`` (0..1)
and ``difficulty`` (1..5). Mapping (clamped to the schema ranges):

=================  =====================================================
field              value
=================  =====================================================
difficulty         ``difficulty``
confidence         ``0.5 * contrast + 0.5 * (1 - noise)`` (image clarity)
boundary           ``0.6 * blur + 0.4 * (1 - contrast)``
thin_structure     ``thin_fraction``
small_objects      ``0.5 * thin_fraction + 0.5 * overlaps``
clutter            ``0.7 * clutter + 0.3 * catheter``
=================  =====================================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from monai_vlmfilm.data.datalist import read_datalist

from .base import Profiler, pixel_digest
from .schema import DEFAULT_PROFILE, VLMProfile

__all__ = ["OracleProfiler", "ORACLE_VERSION", "FACTOR_KEYS"]

ORACLE_VERSION = "oracle-v1"
FACTOR_KEYS = ("contrast", "noise", "blur", "catheter", "overlaps", "thin_fraction", "clutter", "difficulty")
_DEFAULTS = {k: 0.5 for k in FACTOR_KEYS} | {"difficulty": 3.0, "catheter": 0.0}


class OracleProfiler(Profiler):
    """Ground-truth factors -> profile.

    Args:
        table: optional lookup ``{pixel digest or absolute image path: factors}`` used by :meth:`profile`
            (built by :meth:`from_datalist`); ``profile_factors`` needs no table.
    """

    name = "oracle"
    heavy = False

    def __init__(self, table: dict[str, dict[str, float]] | None = None, datalist: str | None = None) -> None:
        self._paths: dict[str, dict[str, float]] = {}
        self._digests: dict[str, dict[str, float]] = {}
        for k, v in (table or {}).items():
            (self._digests if len(k) == 64 and all(c in "0123456789abcdef" for c in k) else self._paths)[k] = v
        self.datalist = datalist
        if datalist is not None:
            self._paths.update(self._read_datalist(datalist))

    def fingerprint_fields(self) -> dict[str, Any]:
        return {**super().fingerprint_fields(), "version": ORACLE_VERSION}

    @staticmethod
    def _read_datalist(path: str | os.PathLike) -> dict[str, dict[str, float]]:
        """``{absolute image path: factors}`` of the items (all sections) that carry ``"factors"``."""
        try:
            doc = read_datalist(path, path_keys=("image",))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read datalist {str(path)!r}: {e}") from e
        return {
            item["image"]: item["factors"]
            for items in doc.values()
            if isinstance(items, list)
            for item in items
            if isinstance(item, dict) and isinstance(item.get("factors"), dict) and isinstance(item.get("image"), str)
        }

    @classmethod
    def from_datalist(cls, path: str | os.PathLike) -> OracleProfiler:
        """Oracle with a lookup table from a datalist's items (all sections) that carry ``"factors"``."""
        return cls(datalist=str(path))

    @staticmethod
    def profile_from_factors(factors: dict[str, Any] | None) -> VLMProfile:
        if not isinstance(factors, dict):
            return DEFAULT_PROFILE.as_fallback("no ground-truth factors for this image")
        f, missing = {}, []
        for k in FACTOR_KEYS:
            try:
                v = float(factors[k])
                if not np.isfinite(v):
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                v = _DEFAULTS[k]
                missing.append(k)
            f[k] = v
        return VLMProfile(
            difficulty=f["difficulty"],
            confidence=0.5 * f["contrast"] + 0.5 * (1.0 - f["noise"]),
            focus={
                "boundary": 0.6 * f["blur"] + 0.4 * (1.0 - f["contrast"]),
                "thin_structure": f["thin_fraction"],
                "small_objects": 0.5 * f["thin_fraction"] + 0.5 * f["overlaps"],
                "clutter": 0.7 * f["clutter"] + 0.3 * f["catheter"],
            },
            source="oracle",
            reason=("filled factors: " + ", ".join(missing)) if missing else "",
        )

    def profile_factors(self, factors: Sequence[dict[str, Any]]) -> list[VLMProfile]:
        return [self.profile_from_factors(f) for f in factors]

    def _digest_table(self) -> dict[str, dict[str, float]]:
        # built lazily: hashing every image of a datalist costs a read per image
        pending = {p: f for p, f in self._paths.items() if p not in getattr(self, "_hashed", set())}
        if pending:
            self._hashed = set(getattr(self, "_hashed", set()))
            for p, f in pending.items():
                try:
                    self._digests[pixel_digest(p)] = f
                except ValueError:
                    pass  # unreadable image: it cannot be looked up by pixels anyway
                self._hashed.add(p)
        return self._digests

    def factors_for(self, image: Any) -> dict[str, Any] | None:
        """Factors of an image given by path (absolute lookup) or pixels (digest lookup)."""
        if isinstance(image, (str, os.PathLike)):
            hit = self._paths.get(os.path.abspath(os.fspath(image)))
            if hit is not None:
                return hit
        return self._digest_table().get(pixel_digest(image))

    def profile(self, images: Sequence[Any]) -> list[VLMProfile]:
        return [self.profile_from_factors(self.factors_for(img)) for img in images]
