"""Datalists, cross-validation folds and profile caches (heuristic, oracle, shuffled) for the ablation."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from monai_vlmfilm.data.datalist import read_datalist, write_datalist

__all__ = [
    "load_datalist",
    "eval_split_of",
    "make_folds",
    "write_fold_datalist",
    "seeded_derangement",
    "has_factors",
    "unique_images",
    "prepare_profile_cache",
    "build_shuffled_cache",
    "profile_vectors",
]


def load_datalist(path: str | os.PathLike) -> dict[str, Any]:
    """A MONAI datalist JSON with every item's ``image`` / ``label`` path absolute and checked to exist.

    Read with :func:`monai_vlmfilm.data.datalist.read_datalist`; the ablation also needs a non-empty ``training``
    list and an ``image`` and a ``label`` in every item.

    Raises:
        ValueError: unreadable JSON, no ``training`` list, an item without ``image``/``label`` or a missing file;
            the message names the datalist and the item.
    """
    try:
        doc = read_datalist(path, check_files=True)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from e
    if not isinstance(doc.get("training"), list) or not doc["training"]:
        raise ValueError(f"datalist {str(path)!r} needs a non-empty 'training' list")
    for split, items in doc.items():
        for i, it in enumerate(items if isinstance(items, list) else []):
            if not isinstance(it, dict) or "image" not in it or "label" not in it:
                raise ValueError(f"datalist {str(path)!r}: item {i} of {split!r} needs 'image' and 'label' keys")
    return doc


def eval_split_of(datalist: Mapping[str, Any], requested: str | None = None) -> str:
    """The split to evaluate on: ``requested``, else ``test`` when non-empty, else ``validation``.

    Raises:
        ValueError: when that split is absent or empty.
    """
    split = requested or ("test" if datalist.get("test") else "validation")
    if not datalist.get(split):
        raise ValueError(f"the datalist has no non-empty {split!r} split to evaluate on")
    return split


def make_folds(items: Sequence[Mapping[str, Any]], k: int, seed: int = 0) -> list[list[Mapping[str, Any]]]:
    """Split ``items`` into ``k`` folds of near-equal size after a seeded shuffle (fixed across training seeds)."""
    if k < 2:
        raise ValueError(f"--folds must be >= 2, got {k}")
    if len(items) < k:
        raise ValueError(f"cannot make {k} folds of {len(items)} items")
    order = np.random.default_rng(seed).permutation(len(items))
    return [[items[i] for i in part] for part in np.array_split(order, k)]


def write_fold_datalist(path: Path, splits: Mapping[str, Sequence[Mapping[str, Any]]], description: str = "") -> Path:
    """Write a fold's datalist JSON (absolute paths) with :func:`monai_vlmfilm.data.datalist.write_datalist`."""
    return write_datalist({"description": description, **{k: list(v) for k, v in splits.items()}}, path)


def seeded_derangement(n: int, seed: int = 0) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` with no fixed point (rejection sampling, ~e draws).

    Raises:
        ValueError: for ``n < 2`` (no derangement exists).
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def has_factors(items: Sequence[Mapping[str, Any]]) -> bool:
    """True when every item carries ``factors`` with a finite ``difficulty`` (the synthetic generator's output)."""
    if not items:
        return False
    for it in items:
        f = it.get("factors")
        if not isinstance(f, Mapping) or not isinstance(f.get("difficulty"), (int, float)):
            return False
        if not math.isfinite(float(f["difficulty"])):
            return False
    return True


def unique_images(datalist: Mapping[str, Any]) -> list[dict[str, Any]]:
    """All items of every list split, first occurrence of each image path kept."""
    seen: set[str] = set()
    out = []
    for v in datalist.values():
        if isinstance(v, list):
            for it in v:
                if it["image"] not in seen:
                    seen.add(it["image"])
                    out.append(it)
    return out


def prepare_profile_cache(cache_dir: Path, items: Sequence[Mapping[str, Any]], profiler: Any) -> list[Any]:
    """Profiles of ``items`` in a :class:`ProfileStore` at ``cache_dir`` (computed on a miss, read on a hit)."""
    from monai_vlmfilm.profiles.store import ProfileStore

    store = ProfileStore(cache_dir)
    return store.get_or_compute([it["image"] for it in items], profiler)


def build_shuffled_cache(
    source_dir: Path, target_dir: Path, items: Sequence[Mapping[str, Any]], profiler: Any, seed: int = 0
) -> dict[str, str]:
    """A cache whose entries hold ``profiler``'s profiles permuted across images.

    Every image keeps its own key (pixel digest + ``profiler``'s fingerprint, exactly what the transform looks up
    at training time) but the entry holds the profile of another image, chosen by a seeded derangement over the
    distinct keys: the multiset of profiles is unchanged, the image-profile link is broken.

    Returns:
        ``{image path: image path whose profile it now holds}``.

    Raises:
        ValueError: when a source profile is missing (prepare ``source_dir`` first) or fewer than 2 distinct images.
    """
    from monai_vlmfilm.profiles.store import ProfileStore

    src = ProfileStore(source_dir, read_only=True)
    dst = ProfileStore(target_dir)
    fp = profiler.fingerprint
    by_key: dict[str, tuple[str, str, Any]] = {}
    owners: dict[str, list[str]] = {}
    for it in items:
        found = src.lookup(it["image"], fp)
        owners.setdefault(found.key, []).append(it["image"])
        if found.key not in by_key:
            if found.profile is None:
                raise ValueError(f"no {profiler.name} profile for {it['image']!r} in {str(source_dir)!r}")
            by_key[found.key] = (it["image"], found.digest, found.profile)
    keys = sorted(by_key)
    perm = seeded_derangement(len(keys), seed)
    mapping: dict[str, str] = {}
    for i, key in enumerate(keys):
        donor_img, _, donor_prof = by_key[keys[perm[i]]]
        img, digest, _ = by_key[key]
        prof = replace(donor_prof, reason=f"shuffle: profile of {os.path.basename(donor_img)}")
        dst.put_by_key(key, prof, fp, digest)
        for owner in owners[key]:
            mapping[owner] = donor_img
    return mapping


def profile_vectors(cache_dir: Path, items: Sequence[Mapping[str, Any]], profiler: Any) -> np.ndarray:
    """``[N, PROFILE_DIM]`` vectors of ``items`` read from a prepared cache (read-only; a miss raises)."""
    from monai_vlmfilm.profiles.store import ProfileStore

    store = ProfileStore(cache_dir, read_only=True)
    out = []
    for it in items:
        prof = store.lookup(it["image"], profiler.fingerprint).profile
        if prof is None:
            raise ValueError(f"no {profiler.name} profile for {it['image']!r} in {str(cache_dir)!r}")
        out.append(prof.to_vector())
    return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)
