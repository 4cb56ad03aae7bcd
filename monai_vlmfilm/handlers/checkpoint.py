"""Checkpoint handlers: crash-safe saving, resuming from the newest intact checkpoint, weights across the FiLM switch.

- :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` whose files are written atomically and durably
  (:func:`monai_vlmfilm.atomic.atomic_write`), and whose old files are removed only after the new one is whole.
- :class:`ResumeCheckpointLoader`: MONAI's ``CheckpointLoader`` given a file or a folder; picks the newest intact
  checkpoint (:func:`monai_vlmfilm.networks.checkpoint.find_resume_checkpoint`).
- :class:`TrainingRandomState`: the random streams of a run as a checkpoint entry, so a resumed run draws the same
  crops, augmentations, shuffles and flow noise as an uninterrupted one.
- :class:`EMAMomentumState`: the position of ignite ``EMAHandler``'s momentum warm-up as a checkpoint entry.
- :class:`NetworkCheckpointLoader`: network weights only, across the ``use_vlm_film`` switch.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.transforms import Randomizable
from monai.utils import IgniteInfo, min_version, optional_import

from monai_vlmfilm.atomic import atomic_write, remove_stale_temp_files
from monai_vlmfilm.networks.checkpoint import find_resume_checkpoint, load_network_weights

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
DiskSaver, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "DiskSaver")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")

__all__ = [
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
    "EMAMomentumState",
    "NetworkCheckpointLoader",
    "ResumeCheckpointLoader",
    "TrainingRandomState",
]

logger = logging.getLogger(__name__)


class AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` that writes through :func:`~monai_vlmfilm.atomic.atomic_write` and removes old files last.

    ignite's own ``atomic=True`` renames a temporary file but never ``fsync``s it or the directory (a power loss can
    still leave an empty newest file), and MONAI's ``CheckpointSaver`` turns atomicity off altogether. ignite's
    ``Checkpoint`` also removes the file that falls out of ``n_saved`` *before* writing the new one, so with
    ``n_saved=1`` a kill in between leaves no checkpoint at all: here a removal waits until the next write is
    complete on disk.

    Args:
        dirname: the checkpoint folder (created if needed).
        filename: a fixed file name for every save (MONAI's ``final_filename`` / ``key_metric_filename``); None
            keeps ignite's generated names.
        fsync: ``fsync`` each file and the folder (durable after a power loss, not only after a process kill).
        kwargs: passed to ``torch.save``.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, fsync: bool = True, **kwargs: Any):
        super().__init__(dirname=dirname, atomic=True, create_dir=True, require_empty=False, **kwargs)
        self.filename = filename
        self.fsync = fsync
        self._pending_removal: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename or filename
        super().__call__(checkpoint, name, metadata)
        if idist.get_rank() == self.save_on_rank:
            # the new file is whole on disk: only now drop what ignite asked to remove (never the file just written)
            pending, self._pending_removal = self._pending_removal, []
            for old in pending:
                if old != name:
                    (self.dirname / old).unlink(missing_ok=True)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        with atomic_write(path, fsync=self.fsync) as tmp, open(tmp, "wb") as f:
            func(checkpoint, f, **self.kwargs)  # a file object: on a failed write torch keeps the OSError's errno

    def remove(self, filename: str) -> None:
        if idist.get_rank() == self.save_on_rank:
            self._pending_removal.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose every file (interval, final, key metric) is written by :class:`AtomicDiskSaver`.

    A kill, a full disk or a file size limit at any moment leaves every checkpoint either as it was or complete;
    the newest file on disk is never a partial one. A failed write raises
    :class:`~monai_vlmfilm.atomic.DiskWriteError` naming the file and the reason. Temporary files that a killed run
    left in ``save_dir`` are removed (and logged) when the saver is built.

    With ``save_key_metric``, :meth:`state_dict` returns the key-metric history (which scores the saved files
    had), so that a resumed run keeps the best ``model.pt`` instead of overwriting it with its first validation:
    put this saver in the training checkpoint's ``save_dict`` and the resume ``load_dict``.

    Args:
        save_dir, save_dict, kwargs: as MONAI's ``CheckpointSaver``.
        fsync: ``fsync`` each file and the folder.
    """

    def __init__(self, save_dir: str, save_dict: dict, fsync: bool = True, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:  # MONAI builds one ignite Checkpoint per kind, each with its own _DiskSaver
                ckpt.save_handler = AtomicDiskSaver(save_dir, getattr(ckpt.save_handler, "filename", None), fsync)
        if idist.get_rank() == 0:
            remove_stale_temp_files(save_dir, self.logger)

    def attach(self, engine: Any) -> None:
        super().attach(engine)
        if self._interval_checkpoint is not None and self._interval_checkpoint.n_saved is not None:
            engine.add_event_handler(Events.EPOCH_STARTED, self._adopt_earlier_files)

    def _adopt_earlier_files(self, engine: Any) -> None:
        """In a resumed run, count the interval checkpoints of the earlier processes towards ``n_saved``.

        ignite's ``Checkpoint`` only knows the files its own process wrote, so every resume would leave the last
        checkpoint of the killed process behind. Once per run, before the first save of a resumed run (the trainer
        state was restored), the files of this saver's name pattern from earlier epochs become its history; all but
        the newest ``n_saved`` of them are deleted now (the newest is kept until the next save is complete). A fresh
        run (iteration 0) never touches files in the folder: they are not its own.
        """
        if getattr(self, "_adopted", False):
            return
        self._adopted = True
        ckpt = self._interval_checkpoint
        if engine.state.iteration == 0 or ckpt is None or idist.get_rank() != 0:
            return
        now = engine.state.epoch - 1 if self.epoch_level else engine.state.iteration
        unit = "epoch" if self.epoch_level else "iteration"
        prefix = f"{ckpt.filename_prefix}_" if ckpt.filename_prefix else ""
        found = re.compile(rf"^{re.escape(prefix)}[^/]*_{unit}=(\d+)\.{re.escape(ckpt.ext)}$")
        ours = {item.filename for item in ckpt._saved}
        earlier = sorted(
            (int(m.group(1)), p.name)
            for p in Path(self.save_dir).iterdir()
            if (m := found.match(p.name)) and p.name not in ours and int(m.group(1)) <= now
        )
        keep = earlier[-ckpt.n_saved :] if ckpt.n_saved > 0 else []
        for _, name in earlier[: len(earlier) - len(keep)]:
            (Path(self.save_dir) / name).unlink(missing_ok=True)
            self.logger.info(f"removed {name}: an older checkpoint of this run beyond n_saved={ckpt.n_saved}")
        # ignite's own history list (MONAI's CheckpointSaver reads it too): the next save removes these after writing
        ckpt._saved = sorted([*ckpt._saved, *(type(ckpt).Item(p, n) for p, n in keep)], key=lambda it: it[0])

    def state_dict(self) -> dict:
        """The key-metric history (``{"_saved": [(score, filename), ...]}``), empty without ``save_key_metric``."""
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self._key_metric_checkpoint is not None and state_dict:
            self._key_metric_checkpoint.load_state_dict(state_dict)


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` that resumes from a checkpoint file or from the newest intact one in a folder.

    The file is chosen when the loader is built (before training starts) by
    :func:`~monai_vlmfilm.networks.checkpoint.find_resume_checkpoint`: a damaged file given by name is an error that
    names it; in a folder, damaged or incomplete files are skipped with a logged reason. Entries of
    ``optional_keys`` that the chosen checkpoint lacks (it was written before they existed) are not restored, with a
    warning; every other entry of ``load_dict`` must be there.

    Args:
        load_path: a checkpoint file or a folder of checkpoints.
        load_dict: as MONAI's ``CheckpointLoader``.
        optional_keys: entries of ``load_dict`` that may be missing from the checkpoint.
        pattern: glob of the candidate files in a folder.
        name, map_location, strict, strict_shape: as MONAI's ``CheckpointLoader``.
    """

    def __init__(
        self,
        load_path: str,
        load_dict: dict,
        optional_keys: Sequence[str] = (),
        pattern: str = "checkpoint*.pt",
        name: str | None = None,
        map_location: Any = None,
        strict: bool = True,
        strict_shape: bool = True,
    ) -> None:
        required = [k for k in load_dict if k not in optional_keys]
        path, keys = find_resume_checkpoint(load_path, required, pattern, map_location or "cpu")
        absent = [k for k in load_dict if k not in keys]
        if absent:
            logger.warning(f"resume: {path} has no {absent} (an older checkpoint); they start fresh")
        load_dict = {k: v for k, v in load_dict.items() if k in keys}
        super().__init__(str(path), load_dict, name, map_location, strict, strict_shape)


class EMAMomentumState:
    """Where ignite ``EMAHandler``'s momentum warm-up stands, as a checkpoint entry (``state_dict`` / ``load_state_dict``).

    The warm-up is a parameter scheduler that counts its own events from 0 in every process, not the trainer's
    iteration, so without this entry a resumed run restarts the warm-up and its EMA weights (validation, ``model.pt``)
    drift from an uninterrupted run's. The scheduler's own ``state_dict`` holds a Python object that
    ``torch.load(weights_only=True)`` refuses; this keeps the event count only.

    Args:
        ema: the ``EMAHandler``, attached before the checkpoint is saved or loaded (no warm-up: nothing to keep).
    """

    def __init__(self, ema: Any) -> None:
        self.ema = ema

    def state_dict(self) -> dict:
        scheduler = getattr(self.ema, "momentum_scheduler", None)
        return {"event_index": int(scheduler.event_index)} if scheduler is not None else {}

    def load_state_dict(self, state: Mapping) -> None:
        scheduler = getattr(self.ema, "momentum_scheduler", None)
        if scheduler is not None and "event_index" in state:
            scheduler.event_index = int(state["event_index"])


def _randomizables(obj: Any, seen: set[int] | None = None, depth: int = 0) -> list[Randomizable]:
    """Every ``Randomizable`` reachable from ``obj`` (lists, tuples, attributes), in a stable order."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 8 or isinstance(obj, (str, bytes, int, float, torch.Tensor, np.ndarray)):
        return []
    seen.add(id(obj))
    found: list[Randomizable] = [obj] if isinstance(obj, Randomizable) else []
    items = obj if isinstance(obj, (list, tuple)) else list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    for item in items:
        found += _randomizables(item, seen, depth + 1)
    return found


def _np_state(state: tuple) -> dict:
    # plain tensors and numbers: readable by torch.load(weights_only=True)
    return {"keys": torch.from_numpy(state[1].astype(np.int64)), "pos": state[2], "gauss": [state[3], state[4]]}


def _np_set(rs: np.random.RandomState, d: Mapping) -> None:
    rs.set_state(("MT19937", d["keys"].numpy().astype(np.uint32), int(d["pos"]), int(d["gauss"][0]), d["gauss"][1]))


class TrainingRandomState:
    """The random streams of a training run as one checkpoint entry (``state_dict`` / ``load_state_dict``).

    Saved with the training checkpoint at the end of an epoch and restored at resume, it makes the resumed epochs
    draw what the uninterrupted run drew: torch's global generator (DataLoader shuffling, worker seeds, flow-matching
    noise and timesteps), NumPy's and Python's global generators, CUDA's, and the private ``RandomState`` of every
    MONAI random transform reachable from ``transforms`` (crops, flips, affine, intensity). Everything is stored as
    tensors and numbers, so ``torch.load(weights_only=True)`` reads it.

    Args:
        transforms: objects holding the random transforms (the training dataset, a ``Compose``, ...).
        restore: apply a loaded state; False leaves this process's streams as seeded (e.g. DDP ranks other than 0,
            whose streams differ from rank 0's, which alone saves checkpoints).
    """

    def __init__(self, transforms: Any = None, restore: bool = True) -> None:
        self.transforms = transforms
        self.restore = restore

    def state_dict(self) -> dict:
        rand = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
            "numpy": _np_state(np.random.get_state()),
            "python": [rand[0], list(rand[1]), rand[2]],
            "transforms": [_np_state(t.R.get_state()) for t in _randomizables(self.transforms)],
        }

    def load_state_dict(self, state: Mapping) -> None:
        if not self.restore:
            return
        torch.set_rng_state(state["torch"])
        if state.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        _np_set(np.random.mtrand._rand, state["numpy"])
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        own = _randomizables(self.transforms)
        if len(own) != len(state["transforms"]):
            logger.warning(
                f"resume: the checkpoint has random states for {len(state['transforms'])} transforms, the run has "
                f"{len(own)} (the transform list changed); the transforms keep their fresh seeds"
            )
            return
        for t, s in zip(own, state["transforms"]):
            _np_set(t.R, s)


class NetworkCheckpointLoader:
    """Ignite handler (or callable on an engine) that loads network weights with :func:`load_network_weights`.

    Unlike ``monai.handlers.CheckpointLoader`` it accepts FiLM-on checkpoints in FiLM-off networks and vice
    versa, so one shipped ``model.pt`` serves both settings of ``use_vlm_film``.

    Args:
        load_path: the checkpoint file.
        network: the network (DDP wrappers are unwrapped).
        map_location: passed to ``torch.load``.
    """

    def __init__(self, load_path: str, network: torch.nn.Module, map_location: Any = "cpu") -> None:
        self.load_path = load_path
        self.network = network
        self.map_location = map_location

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        load_network_weights(self.network, self.load_path, self.map_location)
