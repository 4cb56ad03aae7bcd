"""Checkpoint loading for the FiLM flow network: one reader of checkpoint files, across the ``use_vlm_film`` switch."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "read_checkpoint",
    "find_resume_checkpoint",
    "FILM_KEY_PREFIXES",
    "unwrap",
    "strip_ddp_prefix",
    "load_state_dict",
    "describe_missing_keys",
    "load_off_checkpoint",
    "load_network_weights",
    "load_network_state",
]

logger = logging.getLogger(__name__)

#: state_dict key prefixes of the modules that exist only when FiLM is on.
FILM_KEY_PREFIXES: tuple[str, ...] = ("profile_encoder.", "film_heads.", "film_encoder_heads.")


class CheckpointError(RuntimeError):
    """A checkpoint file is damaged (truncated, not a checkpoint) or lacks what the caller needs; names the file."""


# the exception class only, taken from torch's own import: the package never imports pickle (tests/test_security.py)
_UnpicklingError = torch.serialization.pickle.UnpicklingError


class UnsafeCheckpointError(CheckpointError, _UnpicklingError):
    """A checkpoint holds pickled objects other than tensors and plain containers: refused, never executed."""


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file: the package's one checkpoint read.

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load``.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError: the file would need to unpickle arbitrary objects (refused by ``weights_only``).
        CheckpointError: the file is damaged (truncated, empty, not a torch checkpoint).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist: train one with `python -m monai.bundle run ...` "
            "or point --ckpt_path at a model.pt"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except _UnpicklingError as e:
        if "weights only" in str(e).lower():
            first = str(e).strip().splitlines()[0]
            raise UnsafeCheckpointError(f"checkpoint {str(path)!r} refused, it holds more than tensors: {first}") from e
        raise CheckpointError(_damaged(path, e)) from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(_damaged(path, e)) from e


def _damaged(path: str | os.PathLike, e: BaseException) -> str:
    size = os.path.getsize(path) if os.path.exists(path) else 0
    why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". This is an internal miniz error")[0]
    return (
        f"checkpoint {str(path)!r} is damaged ({size} bytes; {type(e).__name__}: {why or 'empty file'}); "
        "it was probably cut short by a crash or a full disk: resume from an older checkpoint, or give the "
        "checkpoint folder to --resume_from to pick the newest intact one"
    )


def _progress(ckpt: Mapping) -> tuple[int, int]:
    trainer = ckpt.get("trainer") if isinstance(ckpt, Mapping) else None
    if not isinstance(trainer, Mapping):
        return (0, 0)
    iteration, length = int(trainer.get("iteration", 0) or 0), int(trainer.get("epoch_length", 0) or 0)
    return (iteration // length if length else 0, iteration)


def find_resume_checkpoint(
    path: str | os.PathLike,
    required_keys: Sequence[str] = ("trainer",),
    pattern: str = "checkpoint*.pt",
    map_location: Any = "cpu",
) -> tuple[Path, list[str]]:
    """The checkpoint to resume from: ``path`` itself, or the newest intact checkpoint in the folder ``path``.

    A file is used as given: if it is damaged or lacks ``required_keys`` that is an error naming it (never a
    silent fallback to something else). In a folder every file matching ``pattern`` (the temporary files of
    atomic writes are hidden and never match) is read with :func:`read_checkpoint`; the one with the most training
    progress (the ``trainer`` state's iteration, then the file's modification time) among those that load and hold
    ``required_keys`` wins, and each skipped file is logged with the reason.

    Args:
        path: a checkpoint file or a folder of checkpoints (e.g. the bundle's ``ckpt_dir``).
        required_keys: top-level keys the checkpoint must hold (what the loader will restore).
        pattern: glob of the candidate files in a folder.
        map_location: passed to ``torch.load``.

    Returns:
        the chosen file and its top-level keys.

    Raises:
        FileNotFoundError: ``path`` does not exist, or the folder holds no file matching ``pattern``.
        CheckpointError: the file (or every candidate in the folder) is damaged or incomplete; the message lists
            each file with its reason.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"resume_from {str(p)!r} does not exist (give a checkpoint file or a folder of them)")
    candidates = sorted(p.glob(pattern)) if p.is_dir() else [p]
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        raise FileNotFoundError(f"resume_from {str(p)!r}: no checkpoint matching {pattern!r} in this folder")
    intact: list[tuple[tuple[int, int, int], Path, list[str]]] = []
    problems: list[str] = []
    for c in candidates:
        try:
            ckpt = read_checkpoint(c, map_location)
            missing = [k for k in required_keys if not (isinstance(ckpt, Mapping) and k in ckpt)]
            if missing:
                raise CheckpointError(
                    f"checkpoint {str(c)!r} lacks {missing} (top level: {list(ckpt)[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__}); "
                    "it is not a full training checkpoint (model.pt holds the weights only)"
                )
        except CheckpointError as e:
            if not p.is_dir():
                raise
            problems.append(str(e))
            logger.warning(f"resume: skipped {c}: {e}")
            continue
        intact.append(((*_progress(ckpt), c.stat().st_mtime_ns), c, list(ckpt)))
        del ckpt
    if not intact:
        raise CheckpointError(f"resume_from {str(p)!r}: no intact checkpoint; " + "; ".join(problems))
    intact.sort(key=lambda item: item[0])
    (epoch, iteration, _), chosen, keys = intact[-1]
    if p.is_dir():
        logger.warning(
            f"resume: newest intact checkpoint in {p} is {chosen.name} (epoch {epoch}, iteration {iteration}; "
            f"{len(intact)} intact, {len(problems)} skipped)"
        )
    return chosen, keys


def unwrap(network: Any) -> Any:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper, else ``network`` itself.

    Args:
        network: a network, wrapped or not.
    """
    return network.module if isinstance(getattr(network, "module", None), torch.nn.Module) else network


def strip_ddp_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the ``module.`` prefix that ``DistributedDataParallel`` puts on every key.

    Args:
        state_dict: a state dict; left as it is unless every key carries the prefix.
    """
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_state_dict(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """The network state dict of a checkpoint file: the package's one checkpoint reader.

    Accepts a bare state dict (``CheckpointSaver`` with one object, the bundle's ``model.pt``) or MONAI
    ``CheckpointSaver``'s ``{"model"|"network"|"net"|"state_dict"|"network_def": state_dict, ...}``; a DDP
    ``module.`` prefix is stripped. Read with ``weights_only=True``: nothing in a checkpoint is executed.

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load``.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        CheckpointError: the file is damaged (see :func:`read_checkpoint`).
        ValueError: the file holds no network state dict (the message names the file and its top-level keys).
    """
    obj = read_checkpoint(path, map_location)
    if _is_state_dict(obj):
        return strip_ddp_prefix(obj)
    for k in ("model", "network", "net", "state_dict", "network_def"):
        if isinstance(obj, Mapping) and _is_state_dict(obj.get(k)):
            return strip_ddp_prefix(obj[k])
    keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"checkpoint {str(path)!r} holds no network state dict (top level: {keys})")


def load_network_weights(network: torch.nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a bundle checkpoint into ``network`` across the ``use_vlm_film`` switch.

    The file is read with :func:`load_state_dict`. A FiLM-off network ignores the FiLM parameters of a FiLM-on
    checkpoint; a FiLM-on network loads a FiLM-off checkpoint with its FiLM heads at their identity
    initialisation (:func:`load_off_checkpoint`). Anything else must match exactly.

    Args:
        network: the network (a DDP wrapper is unwrapped).
        path: the checkpoint file.
        map_location: passed to ``torch.load``.

    Returns:
        ``{"missing": [...], "ignored": [...]}``: FiLM keys left at initialisation / FiLM keys dropped.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        RuntimeError: the checkpoint holds no state dict or does not fit the network (other keys or shapes), with a
            plain description.
    """
    try:
        sd = load_state_dict(path, map_location)
    except ValueError as e:
        raise RuntimeError(str(e)) from e
    result = load_network_state(network, sd, source=str(path))
    logger.info(f"loaded network weights from {path}")
    return result


def load_network_state(network: torch.nn.Module, state_dict: Mapping[str, Any], source: str = "checkpoint") -> dict:
    """Load a network state dict into ``network`` across the ``use_vlm_film`` switch (see :func:`load_network_weights`).

    The in-memory half of :func:`load_network_weights`, for callers that already hold the state dict (e.g.
    ``python -m monai.bundle ckpt_export``, which reads the file itself and calls ``load_state_dict``).

    Args:
        network: the network (a DDP wrapper is unwrapped).
        state_dict: the network's state dict (a DDP ``module.`` prefix is stripped).
        source: where the state dict came from, for messages.

    Returns:
        ``{"missing": [...], "ignored": [...]}``: FiLM keys left at initialisation / FiLM keys dropped.

    Raises:
        RuntimeError: the state dict does not fit the network (other keys or shapes), with a plain description.
    """
    sd = strip_ddp_prefix(state_dict)
    net = unwrap(network)
    ignored: list[str] = []
    if not getattr(net, "use_vlm_film", False):
        ignored = [k for k in sd if k.startswith(FILM_KEY_PREFIXES)]
        sd = {k: v for k, v in sd.items() if k not in ignored}
        if ignored:
            logger.warning(
                f"{source}: the checkpoint was trained with use_vlm_film=true; the network has use_vlm_film=false, "
                f"so its {len(ignored)} FiLM parameters are ignored (set use_vlm_film true to use them)."
            )
    if hasattr(net, "use_vlm_film"):
        try:
            missing = load_off_checkpoint(net, sd)
        except RuntimeError as e:
            raise RuntimeError(f"{source}: {e}") from e
        if only_encoder_film(missing):
            stages = encoder_film_stages(missing)
            logger.warning(
                f"{source}: the checkpoint has no encoder FiLM heads (trained with film_encoder_stages []); the "
                f"network's heads for encoder stages {stages} ({len(missing)} parameters) keep their identity "
                "initialisation, so it behaves exactly as the checkpoint's decoder-only FiLM network (set "
                "film_encoder_stages [] to match the checkpoint)."
            )
        elif missing:
            logger.warning(
                f"{source}: FiLM-off checkpoint loaded into a FiLM-on network; {len(missing)} FiLM parameters keep "
                "their identity initialisation (the network behaves exactly as the FiLM-off one)."
            )
    else:
        net.load_state_dict(sd, strict=True)
        missing = []
    return {"missing": missing, "ignored": ignored}


IMAGE_NORM_KEY = "image_norm_flag"
ENCODER_FILM_PREFIX = "film_encoder_heads."


def encoder_film_stages(keys: Sequence[str]) -> list[int]:
    """The encoder stages whose FiLM heads (``film_encoder_heads.<stage>.*``) appear among state-dict ``keys``."""
    return sorted({int(k.split(".")[1]) for k in keys if k.startswith(ENCODER_FILM_PREFIX)})


def only_encoder_film(keys: Sequence[str]) -> bool:
    """Whether ``keys`` (missing state-dict keys) are all encoder FiLM heads: a decoder-only FiLM checkpoint loaded
    into a network built with ``film_encoder_stages``, as opposed to a FiLM-off one."""
    return bool(keys) and all(k.startswith(ENCODER_FILM_PREFIX) for k in keys)


def describe_missing_keys(missing: Sequence[str], unexpected: Sequence[str]) -> str:
    """A plain-language account of a ``load_state_dict(strict=False)`` result for a FiLM network."""
    film = [k for k in missing if k.startswith(FILM_KEY_PREFIXES)]
    other = [k for k in missing if not k.startswith(FILM_KEY_PREFIXES)]
    lines = []
    # the image_norm record (FiLMFlowUNet): name the switch rather than a buffer the user never wrote
    if IMAGE_NORM_KEY in other:
        lines.append(
            "the checkpoint was trained without image_norm and the network is built with it: set image_norm false "
            "(network_def#image_norm) to use this checkpoint."
        )
        other = [k for k in other if k != IMAGE_NORM_KEY]
    if IMAGE_NORM_KEY in unexpected:
        lines.append(
            "the checkpoint was trained with image_norm (each image z-scored inside the network) and the network is "
            "built without it: set image_norm true (network_def#image_norm) to use this checkpoint."
        )
        unexpected = [k for k in unexpected if k != IMAGE_NORM_KEY]
    if only_encoder_film(film):  # decoder-only checkpoint, encoder-FiLM network
        stages = encoder_film_stages(film)
        lines.append(
            f"{len(film)} encoder FiLM parameters (film_encoder_heads for encoder stages {stages}) are not in the "
            "checkpoint; they keep their initialisation (zero last layer), so the network starts exactly as the "
            "checkpoint's decoder-only FiLM network."
        )
    elif film:
        heads = sorted({k.split(".")[1] for k in film if k.startswith("film_heads.")}, key=int)
        lines.append(
            f"{len(film)} FiLM parameters are not in the checkpoint (profile_encoder, film_heads for decoder stages "
            f"{heads}); they keep their initialisation (zero last layer), so the network starts exactly as the "
            "checkpoint's FiLM-off network."
        )
    if other:
        lines.append(f"{len(other)} non-FiLM parameters are missing from the checkpoint: {other[:10]}")
    stages = encoder_film_stages(unexpected)
    if stages:  # name the switch rather than the heads: the checkpoint was trained with FiLM on encoder blocks too
        lines.append(
            f"the checkpoint was trained with FiLM on encoder stages {stages} and the network is built without them: "
            f"set film_encoder_stages {stages} (network_def#film_encoder_stages) to use this checkpoint."
        )
        unexpected = [k for k in unexpected if not k.startswith(ENCODER_FILM_PREFIX)]
    if unexpected:
        lines.append(f"{len(unexpected)} checkpoint entries do not belong to this network: {list(unexpected)[:10]}")
    if not lines:
        lines.append("checkpoint matches the network exactly.")
    return " ".join(lines)


def load_off_checkpoint(network: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a FiLM-off (plain ``DiffusionModelUNet``) checkpoint into a FiLM network.

    Only FiLM keys (``profile_encoder.*``, ``film_heads.*``) may be missing; anything else raises.
    A ``module.`` prefix (DistributedDataParallel) on every key is stripped.

    Args:
        network: a :class:`FiLMFlowUNet` (ON or OFF) or a DDP wrapper around one.
        state_dict: the checkpoint's state dict.

    Returns:
        the FiLM keys left at their initialisation.

    Raises:
        RuntimeError: on missing non-FiLM keys, unexpected keys or shape mismatches, with a plain description.
    """
    net = unwrap(network)
    sd = strip_ddp_prefix(state_dict)
    own = net.state_dict()
    shape_errors = [
        f"{k}: checkpoint {tuple(v.shape)} vs network {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    message = describe_missing_keys(missing, unexpected)
    if shape_errors or unexpected or any(not k.startswith(FILM_KEY_PREFIXES) for k in missing):
        details = f" Shape mismatches: {shape_errors[:10]}" if shape_errors else ""
        raise RuntimeError(f"cannot load the checkpoint into {type(net).__name__}: {message}{details}")
    net.load_state_dict(sd, strict=False)
    logger.info(message)
    return missing
