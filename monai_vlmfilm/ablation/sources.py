"""The ablation's profile sources: one profile store per profiler (and calibration), its shuffled copy, the oracle's."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import data as D

__all__ = ["ProfileSource", "ProfileSources"]


@dataclass(frozen=True)
class ProfileSource:
    """A filled profile store and who wrote it.

    Attributes:
        dir: the store's cache folder (the bundle's ``profile_cache_dir``).
        profiler: the profiler whose fingerprint keys the entries.
        spec: the bundle's ``profiler`` value that builds the same profiler.
    """

    dir: Path
    profiler: Any
    spec: Any


class ProfileSources:
    """Fills the stores of an ablation run under ``<out>/profiles`` and says which store each mode reads.

    One store of the configured profiler (and one shuffled copy when shuffle runs) per heuristic calibration in
    use; the base calibration's stores are named after the profiler and ``shuffle`` (``shuffle-in-site`` when
    profiles are permuted within each site), the others get a ``-cal-<calibration>`` suffix. Synthetic data (items
    with ``factors``) also gets the oracle's store.

    Args:
        out: the ablation's output folder.
        datalist_path: the datalist (the oracle reads its factors).
        datalist: the datalist read by :func:`~monai_vlmfilm.ablation.data.load_datalist`.
        synthetic: whether every item carries ground-truth ``factors``.
        profiler: the configured profiler's name (``--profiler``).
        calibration: the base heuristic calibration (``default`` or ``train``).
        calibration_of: a mode's calibration (its ``--variant`` may change it).
        shuffle_seed: seed of the shuffled store's derangement.
        shuffle_groups: image path -> site, to permute profiles within each site only (None: across all images).
    """

    def __init__(
        self,
        out: Path,
        datalist_path: Path,
        datalist: Mapping[str, Any],
        synthetic: bool,
        profiler: str,
        calibration: str,
        calibration_of: Callable[[str], str],
        shuffle_seed: int,
        shuffle_groups: Mapping[str, str] | None = None,
    ) -> None:
        self.root = out / "profiles"
        self.datalist_path = datalist_path
        self.datalist = datalist
        self.synthetic = synthetic
        self.profiler = profiler
        self.calibration = calibration
        self.calibration_of = calibration_of
        self.shuffle_seed = shuffle_seed
        self.shuffle_groups = shuffle_groups
        self.stores: dict[str, ProfileSource] = {}
        self.names: dict[tuple[str, str], str] = {}

    @property
    def profiler_name(self) -> str:
        """The store name of the configured profiler at the base calibration (after :meth:`prepare`)."""
        return self.names[("on", self.calibration)]

    def _profiler(self, calibration: str) -> tuple[Any, Any]:
        """``(bundle spec, profiler)`` of the configured profiler with the given heuristic calibration."""
        from monai_vlmfilm.profiles.base import create_profiler

        spec: Any = self.profiler
        if calibration == "train":
            if spec != "heuristic":
                raise ValueError(f"calibration 'train' applies to the heuristic profiler only, not {spec!r}")
            path = self.root / "heuristic_calibration_train.json"
            if not path.is_file():
                from monai_vlmfilm.profiles.heuristic import HeuristicProfiler

                images = sorted({it["image"] for it in self.datalist["training"]})
                HeuristicProfiler.save_calibration(
                    path,
                    HeuristicProfiler.calibrate(images),
                    len(images),
                    source=f"training split of {self.datalist_path}",
                )
            spec = {"_target_": "monai_vlmfilm.profiles.HeuristicProfiler", "calibration": str(path)}
        return spec, create_profiler(spec)

    def prepare(self, modes: Sequence[str]) -> dict[str, ProfileSource]:
        """Fill the stores ``modes`` read (once; filled stores are read back); returns ``{name: source}``.

        Args:
            modes: every mode of the run, variants included (``on``, ``shuffle.norm``, ...).
        """
        from monai_vlmfilm.profiles.oracle import OracleProfiler

        items = D.unique_images(self.datalist)
        cals = [self.calibration] + sorted({self.calibration_of(m) for m in modes} - {self.calibration})
        for cal in cals:
            spec, prof = self._profiler(cal)
            suffix = "" if cal == self.calibration else f"-cal-{cal}"
            name = prof.name + suffix
            t0 = time.time()
            # the profiler's profiles are always made: real data takes its difficulty terciles from them
            D.prepare_profile_cache(self.root / name, items, prof)
            self.stores[name] = ProfileSource(self.root / name, prof, spec)
            self.names[("on", cal)] = name
            print(f"[ablation] {name} profiles of {len(items)} images in {self.root / name} ({time.time() - t0:.1f} s)")
            if any(m.partition(".")[0] == "shuffle" and self.calibration_of(m) == cal for m in modes):
                # its own name: a store permuted the other way is other profiles (the jobs' commands change too)
                sname = ("shuffle" if self.shuffle_groups is None else "shuffle-in-site") + suffix
                D.build_shuffled_cache(
                    self.root / name, self.root / sname, items, prof, seed=self.shuffle_seed, groups=self.shuffle_groups
                )
                self.stores[sname] = ProfileSource(self.root / sname, prof, spec)
                self.names[("shuffle", cal)] = sname
        if self.synthetic:
            oracle = OracleProfiler(datalist=str(self.datalist_path))
            D.prepare_profile_cache(self.root / "oracle", items, oracle)
            self.stores["oracle"] = ProfileSource(self.root / "oracle", oracle, "oracle")
            for cal in cals:
                self.names[("oracle", cal)] = "oracle"
        return self.stores

    def name_of(self, mode: str) -> str | None:
        """Name of the profile store a mode reads (None for ``off``).

        Args:
            mode: a mode such as ``on`` or ``shuffle.norm``.
        """
        return self.names.get((mode.partition(".")[0], self.calibration_of(mode)))

    def of(self, mode: str) -> ProfileSource | None:
        """The store a mode reads (None for ``off``).

        Args:
            mode: a mode such as ``on`` or ``shuffle.norm``.
        """
        name = self.name_of(mode)
        return self.stores.get(name) if name else None

    def norm_file(self, mode: str, fold: int | None, train_items: Sequence[Mapping[str, Any]]) -> Path:
        """The normalisation JSON of a mode's store over a split's training images (written once).

        Args:
            mode: the mode whose store is summarised.
            fold: the cross-validation fold (None: the single split).
            train_items: the split's training items.

        Raises:
            ValueError: the mode reads no store (``off``).
        """
        from monai_vlmfilm.profiles.normalization import compute_profile_norm, save_profile_norm

        name = self.name_of(mode)
        if name is None:
            raise ValueError(f"mode {mode!r} reads no profiles: it has no normalisation")
        st = self.stores[name]
        path = self.root / "norm" / f"{name}_{'main' if fold is None else f'fold{fold}'}.json"
        if not path.is_file():
            vecs = D.profile_vectors(st.dir, train_items, st.profiler)
            save_profile_norm(
                path, compute_profile_norm(vecs), source=f"{name} profiles of {len(train_items)} training images"
            )
        return path
