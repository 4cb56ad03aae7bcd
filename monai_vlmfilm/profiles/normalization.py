"""Per-feature normalisation of profile vectors from data-set statistics.

A profiler's features rarely spread over [0, 1]: on one data set ``thin_structure`` may sit near 0.9 with a
standard deviation of 0.01 while ``clutter`` spans the whole range. Fed raw into the FiLM encoder, the narrow
features are nearly invisible. :func:`compute_profile_norm` measures each feature's mean and standard deviation
on the training images' profiles; :class:`~monai_vlmfilm.networks.ProfileEncoder` then sees
``clip((p - mean) / std, -clip, clip)``. The statistics are stored in the network's state_dict, so a trained
checkpoint carries them to inference and to MONAI Label.

File format (``python -m monai_vlmfilm.profiles stats ... --norm-out FILE``)::

    {"fields": [...VECTOR_FIELDS], "mean": [P floats], "std": [P floats], "images": N, "min_std": 0.02}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .schema import FALLBACK_INDEX, PROFILE_DIM, PROFILE_KEY, VECTOR_FIELDS

__all__ = [
    "DEFAULT_MIN_STD",
    "compute_profile_norm",
    "save_profile_norm",
    "load_profile_norm",
    "NO_PROFILE_NORM",
    "resolve_profile_norm",
    "norm_vectors",
    "training_profile_norm",
]

#: floor of the standard deviation: a feature that is (nearly) constant on the training set is scaled by at
#: most 1 / 0.02 = 50, so noise in a flat feature cannot dominate the encoder's input
DEFAULT_MIN_STD: float = 0.02


def compute_profile_norm(vectors: Any, min_std: float = DEFAULT_MIN_STD) -> dict[str, Any]:
    """Mean and floored standard deviation per feature of ``[N, PROFILE_DIM]`` profile vectors.

    The fallback flag is left as it is (mean 0, std 1): it marks a profile as missing and must stay a 0/1 signal
    whatever the training set's fallback rate.

    Args:
        vectors: profile vectors (``VLMProfile.to_vector()`` rows), at least one.
        min_std: floor applied to every standard deviation.

    Raises:
        ValueError: on an empty or wrongly shaped input, or non-finite values.
    """
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] != PROFILE_DIM:
        raise ValueError(f"profile vectors must have shape [N >= 1, {PROFILE_DIM}], got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("profile vectors contain NaN or infinite values")
    if min_std <= 0:
        raise ValueError(f"min_std must be positive, got {min_std}")
    mean = v.mean(0)
    std = np.maximum(v.std(0), min_std)
    mean[FALLBACK_INDEX], std[FALLBACK_INDEX] = 0.0, 1.0
    return {
        "fields": list(VECTOR_FIELDS),
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "images": int(v.shape[0]),
        "min_std": float(min_std),
    }


def save_profile_norm(path: str | os.PathLike, norm: Mapping[str, Any], **extra: Any) -> Path:
    """Write ``norm`` (from :func:`compute_profile_norm`) plus ``extra`` provenance fields as JSON, atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps({**norm, **extra}, indent=1))
    tmp.replace(p)
    return p


#: values of the bundle key ``profile_norm`` that mean "no normalisation". MONAI's bundle command line drops
#: overrides whose value is ``None`` (``monai.bundle.scripts.update_kwargs(ignore_none=True)``), so
#: ``--profile_norm None`` would silently keep the config's default: ``--profile_norm none`` is the way to say it.
NO_PROFILE_NORM: tuple[str, ...] = ("", "none", "null", "false", "off", "no")


def resolve_profile_norm(spec: Any) -> tuple[list[float], list[float]] | None:
    """The network's ``profile_norm`` from the bundle key of that name: ``None`` (no normalisation) for ``None``,
    ``False`` or a string in :data:`NO_PROFILE_NORM` (any case), else :func:`load_profile_norm` of it (a JSON file
    or a mapping with ``mean`` / ``std``, such as :func:`training_profile_norm`'s).

    Raises:
        ValueError: as :func:`load_profile_norm`, naming the file.
    """
    if spec is None or spec is False or (isinstance(spec, str) and spec.strip().lower() in NO_PROFILE_NORM):
        return None
    return load_profile_norm(spec)


def load_profile_norm(spec: str | os.PathLike | Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """``(mean, std)`` from a JSON file written by :func:`save_profile_norm` or from such a mapping.

    Raises:
        ValueError: the file is unreadable, its fields do not match this version's vector layout, the lengths are
            wrong, or a std is not positive; the message names the file.
    """
    where = "profile normalisation"
    if isinstance(spec, Mapping):
        doc: Any = spec
    else:
        where = f"profile normalisation file {str(spec)!r}"
        try:
            doc = json.loads(Path(spec).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where} is not readable JSON: {e}") from e
    if not isinstance(doc, Mapping) or "mean" not in doc or "std" not in doc:
        raise ValueError(f"{where} needs 'mean' and 'std' lists")
    fields = doc.get("fields")
    if fields is not None and list(fields) != list(VECTOR_FIELDS):
        raise ValueError(f"{where} was made for the vector layout {list(fields)}, not {list(VECTOR_FIELDS)}")
    try:
        mean = [float(x) for x in doc["mean"]]
        std = [float(x) for x in doc["std"]]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: 'mean' and 'std' must be lists of numbers ({e})") from e
    if len(mean) != PROFILE_DIM or len(std) != PROFILE_DIM:
        raise ValueError(f"{where}: 'mean' and 'std' need {PROFILE_DIM} values, got {len(mean)} and {len(std)}")
    if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
        raise ValueError(f"{where}: means must be finite and standard deviations positive")
    return mean, std


def norm_vectors(vectors: Sequence[Sequence[float]] | np.ndarray, norm: Mapping[str, Any]) -> np.ndarray:
    """``(v - mean) / std`` with numpy (what the encoder does before its clip), for reports and tests."""
    mean, std = load_profile_norm(norm)
    return (np.asarray(vectors, dtype=np.float64) - np.asarray(mean)) / np.asarray(std)


def training_profile_norm(
    items: Sequence[Mapping[str, Any]],
    transforms: Sequence[Any],
    profile_key: str = PROFILE_KEY,
    min_std: float = DEFAULT_MIN_STD,
) -> dict[str, Any] | None:
    """:func:`compute_profile_norm` of the training images' profiles, got the way training gets them.

    Each item goes through ``transforms`` (the bundle's ``train#deterministic_transforms``; ``None`` entries, the
    disabled ones, are skipped) until one of them has attached ``profile_key``, so the profiles are those of the
    unaugmented images that training sees, and the profile transform's cache serves them again to the dataset.
    This is ``train.yaml``'s default ``profile_norm``; the checkpoint keeps the statistics, so inference needs none.

    Args:
        items: datalist entries of the training split (``{"image": path, ...}``).
        transforms: the transforms that load an image and attach its profile, in order.
        profile_key: where the profile transform puts the profile vector.
        min_std: floor of each standard deviation (:func:`compute_profile_norm`).

    Returns:
        The statistics, or ``None`` when no transform attaches a profile (FiLM off: nothing to normalise).

    Raises:
        ValueError: no training items, or the statistics cannot be computed (:func:`compute_profile_norm`).
    """
    chain = [t for t in transforms if t is not None]
    if not items:
        raise ValueError("training_profile_norm needs at least one training item")
    vectors = []
    for item in items:
        d: Any = dict(item)
        for t in chain:
            d = t(d)
            if profile_key in d:
                break
        else:
            return None  # no transform attaches a profile
        vectors.append(np.asarray(d[profile_key], dtype=np.float64).reshape(-1))
    return {**compute_profile_norm(vectors, min_std=min_std), "source": f"profiles of {len(items)} training images"}
