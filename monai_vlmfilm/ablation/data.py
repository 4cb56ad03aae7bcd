"""Datalists (one per site), cross-validation folds and profile caches (heuristic, oracle, shuffled) for the ablation."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from monai_vlmfilm.data.datalist import read_datalist, write_datalist

__all__ = [
    "load_datalist",
    "Site",
    "parse_site_spec",
    "load_sites",
    "tag_site",
    "training_pool",
    "merge_datalists",
    "eval_split_of",
    "make_folds",
    "make_site_folds",
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


#: a site name: what ``NAME=PATH`` may name (a report heading and a record field, so no spaces or path separators)
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass(frozen=True)
class Site:
    """One site's datalist, as read by :func:`load_datalist` (items without a ``site`` key; see :func:`tag_site`).

    Attributes:
        name: the site name (``NAME`` of ``NAME=PATH``, else the datalist's folder name).
        path: the datalist file (absolute).
        datalist: its contents, every item's paths absolute.
    """

    name: str
    path: Path
    datalist: dict[str, Any]


def parse_site_spec(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` -> ``(site name, resolved path)``; without a name, the datalist's folder name.

    A ``=`` counts as the separator only when the text before it is a valid site name, so a path that itself holds
    ``=`` still reads as a path.

    Args:
        spec: a ``--datalist`` / ``--test-datalist`` value.

    Raises:
        ValueError: an empty path, or a path whose folder name is not a valid site name (name it with NAME=PATH).
    """
    name, eq, rest = spec.partition("=")
    if eq and _SITE_NAME.fullmatch(name):
        path = rest
    else:
        name, path = "", spec
    if not path:
        raise ValueError(f"datalist {spec!r} names no file (expected PATH or NAME=PATH)")
    given = Path(path).expanduser().absolute()
    if not name:
        name = given.parent.name  # the folder as given, not a symlink's target
        if not _SITE_NAME.fullmatch(name):
            raise ValueError(
                f"datalist {str(given)!r}: its folder name {name!r} is not a usable site name; "
                "name the site with NAME=PATH (letters, digits, '_', '.', '+', '-')"
            )
    return name, given.resolve()


def load_sites(specs: Sequence[str], taken: Sequence[Site] = ()) -> list[Site]:
    """Read one datalist per site with :func:`load_datalist`, checking that sites and their images are distinct.

    Args:
        specs: ``PATH`` or ``NAME=PATH`` per site (see :func:`parse_site_spec`).
        taken: sites already read (the training sites, when reading the cross-site test datalist): their names and
            images may not appear again.

    Raises:
        ValueError: a bad spec or datalist (see :func:`load_datalist`), a site name given twice, or an image in two
            datalists (mixed training would count it twice; a cross-site test would evaluate an image it trained
            on); the message names both files.
    """
    sites = list(taken)
    owner: dict[str, Site] = {}
    for s in sites:
        for it in unique_images(s.datalist):
            owner.setdefault(os.path.realpath(it["image"]), s)
    for spec in specs:
        name, path = parse_site_spec(spec)
        same = next((s for s in sites if s.name == name), None)
        if same is not None:
            what = "the same datalist is given twice" if same.path == path else f"site name {name!r} is given twice"
            raise ValueError(
                f"{what}: {str(same.path)!r} and {str(path)!r}; every datalist is one site with its own name "
                "(the folder name unless given as NAME=PATH)"
            )
        site = Site(name, path, load_datalist(path))
        for it in unique_images(site.datalist):
            real = os.path.realpath(it["image"])
            if real in owner:
                other = owner[real]
                raise ValueError(
                    f"image {it['image']!r} is in two datalists: {str(other.path)!r} (site {other.name!r}) and "
                    f"{str(path)!r} (site {name!r}); each site's images must be its own"
                )
            owner[real] = site
        sites.append(site)
    return sites[len(taken) :]


def tag_site(datalist: Mapping[str, Any], site: str) -> dict[str, Any]:
    """A copy of ``datalist`` whose items carry ``"site": site`` (per-site results follow each evaluated item)."""
    return {k: [{**it, "site": site} for it in v] if isinstance(v, list) else v for k, v in datalist.items()}


def training_pool(datalist: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``training`` then the ``validation`` items: what cross-validation folds and cross-site training use."""
    return list(datalist["training"]) + list(datalist.get("validation") or [])


def merge_datalists(datalists: Sequence[Mapping[str, Any]], description: str = "") -> dict[str, Any]:
    """One datalist whose every list split is the concatenation of that split over ``datalists`` (in order)."""
    out: dict[str, Any] = {"description": description}
    for dl in datalists:
        for k, v in dl.items():
            if isinstance(v, list):
                out.setdefault(k, []).extend(v)
    return out


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


def make_site_folds(
    pools: Mapping[str, Sequence[Mapping[str, Any]]], k: int, seed: int = 0
) -> list[list[Mapping[str, Any]]]:
    """``k`` folds stratified by site: fold ``f`` is fold ``f`` of every site's pool (:func:`make_folds`, same seed).

    Each fold then holds each site's share of the items (sizes within one per site), so every training set mixes
    the sites in the same proportions as the whole.

    Args:
        pools: site name -> its items (in the order folds list them).
        k: number of folds.
        seed: the fold seed (fixed across training seeds).

    Raises:
        ValueError: ``k < 2`` or a site with fewer than ``k`` items (the message names the site).
    """
    folds: list[list[Mapping[str, Any]]] = [[] for _ in range(max(k, 0))]
    for site, items in pools.items():
        try:
            parts = make_folds(items, k, seed)
        except ValueError as e:
            raise ValueError(f"site {site!r}: {e}") from e
        for f, part in enumerate(parts):
            folds[f].extend(part)
    return folds


def write_fold_datalist(path: Path, splits: Mapping[str, Sequence[Mapping[str, Any]]], description: str = "") -> Path:
    """Write a fold's datalist JSON (absolute paths) with :func:`monai_vlmfilm.data.datalist.write_datalist`."""
    return write_datalist({"description": description, **{k: list(v) for k, v in splits.items()}}, path)


def seeded_derangement(n: int, seed: int | Sequence[int] = 0) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` with no fixed point (rejection sampling, ~e draws).

    ``seed`` is anything :func:`numpy.random.default_rng` takes (an int, or a sequence such as ``(seed, group)``).

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
    source_dir: Path,
    target_dir: Path,
    items: Sequence[Mapping[str, Any]],
    profiler: Any,
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A cache whose entries hold ``profiler``'s profiles permuted across images.

    Every image keeps its own key (pixel digest + ``profiler``'s fingerprint, exactly what the transform looks up
    at training time) but the entry holds the profile of another image, chosen by a seeded derangement over the
    distinct keys: the multiset of profiles is unchanged, the image-profile link is broken.

    Args:
        source_dir: the store holding the true profiles.
        target_dir: the store to write.
        items: the images to cover (datalist items).
        profiler: the profiler whose fingerprint keys both stores.
        seed: seed of the derangement.
        groups: image path -> group (site); when given, profiles are permuted within each group only (group ``g``,
            in sorted order, with seed ``(seed, g)``), so a donor always comes from the same group: what a profile
            says about its site survives, only the per-image information is broken.

    Returns:
        ``{image path: image path whose profile it now holds}``.

    Raises:
        ValueError: when a source profile is missing (prepare ``source_dir`` first), an image has no group, or fewer
            than 2 distinct images (in a group).
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
    blocks: list[tuple[list[str], int | tuple[int, int], str]] = [(keys, seed, "")]
    if groups is not None:
        by_group: dict[str, list[str]] = {}
        for key in keys:
            img = by_key[key][0]
            if img not in groups:
                raise ValueError(f"image {img!r} has no group (site) for a within-group shuffle")
            by_group.setdefault(groups[img], []).append(key)
        blocks = [(by_group[g], (seed, b), f" of group {g!r}") for b, g in enumerate(sorted(by_group))]
    mapping: dict[str, str] = {}
    for block, block_seed, label in blocks:
        try:
            perm = seeded_derangement(len(block), block_seed)
        except ValueError as e:
            raise ValueError(f"cannot shuffle the profiles{label}: {e}") from e
        for i, key in enumerate(block):
            donor_img, _, donor_prof = by_key[block[perm[i]]]
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
