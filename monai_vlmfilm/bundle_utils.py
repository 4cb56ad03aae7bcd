"""Small glue for the MONAI bundle (``bundle/configs/*.yaml``): data lists, 2D grayscale input, PNG overlays,
checkpoint loading across the ``use_vlm_film`` switch, a progress display with ETA and a JSON metric summary.

Everything here is referenced from the bundle configs by its dotted path, e.g.
``monai_vlmfilm.bundle_utils.EnsureGrayscale2Dd``.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import sys
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import MapTransform, SaveImaged
from monai.utils import optional_import

Events, _ = optional_import("ignite.engine", name="Events")
ProgressBar, has_progress_bar = optional_import("ignite.handlers", name="ProgressBar")

__all__ = [
    "IMAGE_EXTENSIONS",
    "as_bool",
    "load_split",
    "image_list",
    "EnsureGrayscale2Dd",
    "VesselOverlayd",
    "SaveVesselOverlayd",
    "load_network_weights",
    "NetworkCheckpointLoader",
    "ProgressHandler",
    "MetricsSummaryJSON",
    "FixedTimeVelocity",
]

logger = logging.getLogger(__name__)

#: file endings the bundle's inference accepts when it is given a folder or a glob.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".nii",
    ".nii.gz",
    ".mha",
    ".nrrd",
)


_TRUE = ("1", "true", "yes", "on", "y")
_FALSE = ("0", "false", "no", "off", "n", "none", "")


def as_bool(value: Any, name: str = "value") -> bool:
    """A config switch as a real bool.

    ``python -m monai.bundle run ... --use_vlm_film false`` passes the *string* ``"false"`` (python-fire only
    turns ``False`` into a bool), and ``not "false"`` is False: every switch read from the command line goes
    through this.

    Raises:
        ValueError: for anything that is not a recognisable boolean, naming ``name``.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")


# --------------------------------------------------------------------------------------------- data lists
def load_split(datalist: str | os.PathLike, split: str, base_dir: str | os.PathLike | None = None) -> list[dict]:
    """One split (``"training"``, ``"validation"``, ``"test"``) of a MONAI datalist JSON, paths made absolute.

    Paths in the file are relative to ``base_dir`` (default: the datalist's folder), as
    ``monai.data.load_decathlon_datalist`` does it. Entries may carry extra keys (e.g. ``factors``); they pass through.

    Raises:
        FileNotFoundError: the datalist does not exist.
        ValueError: the file is not a JSON datalist, the split is missing or empty, or an image file is missing.
    """
    path = Path(datalist).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"datalist {str(path)!r} does not exist: generate one with `python -m monai_vlmfilm.data.synthetic --out DIR` "
            "or `python -m monai_vlmfilm.data.datalist`, then pass --datalist DIR/datalist.json"
        )
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(content, dict) or not isinstance(content.get(split), list):
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"datalist {str(path)!r} has no list {split!r} (it has: {keys})")
    items = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=split, base_dir=base_dir)
    if not items:
        raise ValueError(f"datalist {str(path)!r}: split {split!r} is empty")
    for item in items:
        for key in ("image", "label"):
            if key in item and isinstance(item[key], str) and not os.path.exists(item[key]):
                raise ValueError(f"datalist {str(path)!r}, split {split!r}: {key} file {item[key]!r} does not exist")
    return items


def _is_image_file(p: str) -> bool:
    return p.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(p)


def image_list(source: str | os.PathLike | Sequence[str], split: str = "test") -> list[dict]:
    """The inference inputs as ``[{"image": path, ...}, ...]`` from whatever the user points at.

    Args:
        source: a MONAI datalist JSON (its ``split`` list is used), a folder (every image file in it, sorted),
            a glob pattern, a single image file, or a list of image paths.
        split: the datalist key to read when ``source`` is a JSON datalist.

    Raises:
        ValueError: when nothing usable is found, naming the source.
    """
    if isinstance(source, (list, tuple)):
        paths = [str(p) for p in source]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"input image files do not exist: {missing[:5]}")
        return [{"image": p} for p in paths]
    src = os.path.expanduser(str(source))
    if src.endswith(".json"):
        return [{k: v for k, v in d.items() if k != "label"} for d in load_split(src, split)]
    if os.path.isdir(src):
        paths = sorted(str(p) for p in Path(src).rglob("*") if _is_image_file(str(p)))
        if not paths:
            raise ValueError(f"input folder {src!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return [{"image": p} for p in paths]
    if os.path.isfile(src):
        return [{"image": src}]
    paths = sorted(p for p in glob.glob(src) if _is_image_file(p))
    if not paths:
        raise ValueError(
            f"input {src!r} is neither a datalist JSON, a folder, an image file nor a glob matching images"
        )
    return [{"image": p} for p in paths]


# --------------------------------------------------------------------------------------------- transforms
class EnsureGrayscale2Dd(MapTransform):
    """Make channel-first 2D images single-channel: ``[C, H, W]`` RGB(A) -> luminance, ``[1, H, W, 1]`` -> ``[1, H, W]``.

    Angiograms are grayscale but often stored as RGB PNGs or as 2D NIfTI with a trailing singleton axis; the
    network takes one image channel. Put it right after ``LoadImaged(..., ensure_channel_first=True)``.

    Args:
        keys: keys of the images to convert.
        allow_missing_keys: don't raise when a key is absent.

    Raises:
        ValueError: for a truly 3D volume or an unexpected channel count, naming the file.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    @staticmethod
    def _name(img: Any) -> str:
        meta = getattr(img, "meta", {}) or {}
        return str(meta.get("filename_or_obj", "<array>"))

    def _convert(self, img: torch.Tensor) -> torch.Tensor:
        while img.ndim > 3 and img.shape[-1] == 1:
            img = img[..., 0]
        if img.ndim != 3:
            raise ValueError(
                f"{self._name(img)}: expected a 2D image (channel-first [C, H, W]), got shape {tuple(img.shape)}"
            )
        c = img.shape[0]
        if c == 1:
            return img
        if c in (3, 4):  # ITU-R BT.601 luma, alpha dropped
            w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32, device=img.device).reshape(3, 1, 1)
            gray = (img[:3].float() * w).sum(0, keepdim=True)
            return gray.to(img.dtype) if img.dtype.is_floating_point else gray
        if c == 2:  # gray + alpha
            return img[:1]
        raise ValueError(f"{self._name(img)}: expected 1 (gray), 2, 3 or 4 (RGB[A]) channels, got {c}")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._convert(d[key])
        return d


class VesselOverlayd(MapTransform):
    """Add an RGB preview (channel-first ``[3, H, W]`` in [0, 1]): the image in gray, the mask tinted red.

    Save it with ``SaveImaged(keys="overlay", output_ext=".png", scale=255, output_dtype=uint8)``; it carries
    the image's meta data, so the file is named after the input.

    Args:
        keys: the mask key (e.g. ``"pred"``); one overlay per mask key.
        image_key: the grayscale image ``[1, H, W]`` (any range: min-max scaled for display).
        overlay_key: output key (``"{key}_overlay"`` when several mask keys are given).
        color: RGB of the mask tint.
        alpha: opacity of the tint.
        threshold: mask values ``>= threshold`` are tinted (channel 0 of the mask).
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        overlay_key: str = "overlay",
        color: Sequence[float] = (1.0, 0.1, 0.1),
        alpha: float = 0.5,
        threshold: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.overlay_key = overlay_key
        self.color = torch.tensor([float(c) for c in color], dtype=torch.float32).reshape(3, 1, 1)
        self.alpha = float(alpha)
        self.threshold = float(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.image_key]
        g = torch.as_tensor(img).detach().float().cpu()[:1]
        lo, hi = float(g.min()), float(g.max())
        g = (g - lo) / (hi - lo) if hi > lo else torch.zeros_like(g)
        keys = list(self.key_iterator(d))
        for key in keys:
            m = (torch.as_tensor(d[key]).detach().float().cpu()[:1] >= self.threshold).float()
            if m.shape[1:] != g.shape[1:]:
                raise ValueError(f"overlay: mask {key!r} {tuple(m.shape)} and image {tuple(g.shape)} differ in size")
            rgb = g.expand(3, *g.shape[1:]) * (1 - self.alpha * m) + self.color * (self.alpha * m)
            out = MetaTensor(rgb.clamp(0, 1))
            if isinstance(img, MetaTensor):
                out.copy_meta_from(img, copy_attr=False)
            d[self.overlay_key if len(keys) == 1 else f"{key}_{self.overlay_key}"] = out
        return d


class SaveVesselOverlayd(SaveImaged):
    """Write the :class:`VesselOverlayd` preview of each mask key as an RGB PNG (``<name>_overlay.png``).

    A ``SaveImaged`` (MONAI's writer stack, file names from the image's meta data) that builds the overlay on
    the fly and leaves the data dict unchanged. Being a ``SaveImaged``, it is dropped by MONAI Label, which
    removes every ``SaveImaged`` from a bundle's post-processing.

    Args:
        keys: mask key(s), e.g. ``"pred"``.
        image_key: the image shown under the mask.
        output_dir, output_postfix, separate_folder, data_root_dir, print_log: as ``SaveImaged``.
        color, alpha, threshold: as :class:`VesselOverlayd`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        output_dir: str = "./",
        output_postfix: str = "overlay",
        separate_folder: bool = False,
        data_root_dir: str = "",
        print_log: bool = True,
        color: Sequence[float] = (1.0, 0.1, 0.1),
        alpha: float = 0.5,
        threshold: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        self.overlay = VesselOverlayd(keys, image_key, "_overlay", color, alpha, threshold, allow_missing_keys)
        mask_keys = list(self.overlay.keys)
        overlay_keys = ["_overlay"] if len(mask_keys) == 1 else [f"{k}__overlay" for k in mask_keys]
        super().__init__(
            keys=overlay_keys,
            output_dir=output_dir,
            output_postfix=output_postfix,
            output_ext=".png",
            resample=False,
            scale=255,
            output_dtype=np.uint8,
            separate_folder=separate_folder,
            data_root_dir=data_root_dir,
            print_log=print_log,
            allow_missing_keys=True,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        super().__call__(self.overlay(data))
        return dict(data)


# --------------------------------------------------------------------------------------------- checkpoints
def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if isinstance(getattr(network, "module", None), torch.nn.Module) else network


def load_network_weights(network: torch.nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a bundle checkpoint into ``network`` across the ``use_vlm_film`` switch.

    Accepts a plain state dict (``CheckpointSaver`` with one object) or a dict with a ``"model"`` entry
    (``CheckpointSaver`` with several objects). A FiLM-off network ignores the FiLM parameters of a FiLM-on
    checkpoint; a FiLM-on network loads a FiLM-off checkpoint with its FiLM heads at their identity
    initialisation (``monai_vlmfilm.networks.load_off_checkpoint``). Anything else must match exactly.

    Returns:
        ``{"missing": [...], "ignored": [...]}``: FiLM keys left at initialisation / FiLM keys dropped.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        RuntimeError: the checkpoint does not fit the network (other keys or shapes), with a plain description.
    """
    from monai_vlmfilm.networks import FILM_KEY_PREFIXES, load_off_checkpoint

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist: train one with `python -m monai.bundle run training ...` "
            "or point --ckpt_path at a model.pt"
        )
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(ckpt, Mapping) and "model" in ckpt and isinstance(ckpt["model"], Mapping):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, Mapping):
        raise RuntimeError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, not a state dict")
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in ckpt.items()}
    net = _unwrap(network)
    ignored: list[str] = []
    if not getattr(net, "use_vlm_film", False):
        ignored = [k for k in sd if k.startswith(FILM_KEY_PREFIXES)]
        sd = {k: v for k, v in sd.items() if k not in ignored}
        if ignored:
            logger.warning(
                f"{path}: the checkpoint was trained with use_vlm_film=true; the network has use_vlm_film=false, "
                f"so its {len(ignored)} FiLM parameters are ignored (set use_vlm_film true to use them)."
            )
    if hasattr(net, "use_vlm_film"):
        try:
            missing = load_off_checkpoint(net, sd)
        except RuntimeError as e:
            raise RuntimeError(f"{path}: {e}") from e
        if missing:
            logger.warning(
                f"{path}: FiLM-off checkpoint loaded into a FiLM-on network; {len(missing)} FiLM parameters keep "
                "their identity initialisation (the network behaves exactly as the FiLM-off one)."
            )
    else:
        net.load_state_dict(sd, strict=True)
        missing = []
    logger.info(f"loaded network weights from {path}")
    return {"missing": missing, "ignored": ignored}


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


# --------------------------------------------------------------------------------------------- progress
def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:d}:{s % 60:02d}"


class ProgressHandler:
    """Progress with iteration / epoch and ETA for a trainer.

    On a terminal: ignite's tqdm ``ProgressBar`` (``Epoch [e/E]: [i/N] ..% loss=.. [elapsed<ETA]``). Otherwise
    (logs, CI, pipes), one log line every ``log_every`` iterations and at each epoch end, e.g.
    ``epoch 2/5 iter 24/60 (40%) loss 0.41 | 3.1 s/it | elapsed 1:14, ETA 1:51``.

    Args:
        output_transform: engine output -> loss value shown, e.g. ``monai.handlers.from_engine(["loss"], first=True)``.
        use_tqdm: ``None`` = tqdm bar only when stderr is a terminal; True / False to force.
        log_every: iterations between log lines when not using tqdm (0: epoch ends only).
        name: logger name.
    """

    def __init__(
        self,
        output_transform: Any = None,
        use_tqdm: bool | None = None,
        log_every: int = 0,
        name: str = "monai_vlmfilm.progress",
    ) -> None:
        self.output_transform = output_transform
        self.use_tqdm = use_tqdm
        self.log_every = int(log_every)
        self.logger = logging.getLogger(name)
        self._t0 = 0.0
        self._done0 = 0

    def attach(self, engine: Any) -> None:
        use_tqdm = self.use_tqdm if self.use_tqdm is not None else sys.stderr.isatty()
        if use_tqdm and has_progress_bar:
            ot = self.output_transform
            ProgressBar(persist=True).attach(engine, output_transform=(lambda o: {"loss": ot(o)}) if ot else None)
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _started(self, engine: Any) -> None:
        self._t0 = time.perf_counter()
        self._done0 = engine.state.iteration  # resumed runs: time only what runs now

    def _line(self, engine: Any, what: str) -> str:
        st = engine.state
        per_epoch = st.epoch_length or 0
        total = (st.max_epochs or 0) * per_epoch
        done = st.iteration - self._done0
        elapsed = time.perf_counter() - self._t0
        rate = elapsed / done if done else math.nan
        left = (total - st.iteration) * rate if done else math.nan
        loss = ""
        if self.output_transform is not None and st.output is not None:
            try:
                loss = f" loss {float(self.output_transform(st.output)):.4f}"
            except Exception:  # a display helper never stops training
                loss = ""
        eta = _fmt_s(left) if math.isfinite(left) else "?"
        it = (st.iteration - 1) % per_epoch + 1 if per_epoch else st.iteration
        return (
            f"{what} epoch {st.epoch}/{st.max_epochs} iter {it}/{per_epoch} "
            f"({100.0 * st.iteration / total if total else 0:.0f}%){loss} | {rate:.2f} s/it | "
            f"elapsed {_fmt_s(elapsed)}, ETA {eta}"
        )

    def _iteration(self, engine: Any) -> None:
        if self.log_every and engine.state.iteration % self.log_every == 0:
            self.logger.info(self._line(engine, "progress:"))

    def _epoch(self, engine: Any) -> None:
        self.logger.info(self._line(engine, "progress: finished"))


# --------------------------------------------------------------------------------------------- evaluation
def _to_float(v: Any) -> float | None:
    try:
        f = float(torch.as_tensor(v).float().mean()) if isinstance(v, torch.Tensor) else float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class MetricsSummaryJSON:
    """Write the evaluation's metrics as JSON when the evaluator finishes (next to ``MetricsSaver``'s CSVs).

    ``{"num_images": N, "metrics": {name: aggregate}, "per_metric": {name: {mean, std, median, min, max,
    notnans}}, "extra": {...}}``; per-image statistics come from ``engine.state.metric_details`` (NaN / inf
    excluded and counted). Only rank 0 writes in distributed runs.

    Args:
        save_path: output JSON file.
        extra: anything JSON-serialisable to record with the numbers (e.g. checkpoint path, use_vlm_film).
    """

    def __init__(self, save_path: str, extra: Mapping[str, Any] | None = None) -> None:
        self.save_path = save_path
        self.extra = dict(extra or {})

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def summary(self, engine: Any) -> dict[str, Any]:
        metrics = {k: _to_float(v) for k, v in engine.state.metrics.items()}
        per_metric: dict[str, dict[str, float | int | None]] = {}
        n_images = 0
        for name, details in (getattr(engine.state, "metric_details", None) or {}).items():
            arr = torch.as_tensor(details).float().reshape(len(details), -1).nanmean(dim=1).cpu().numpy()
            n_images = max(n_images, len(arr))
            ok = arr[np.isfinite(arr)]
            stats: dict[str, float | int | None] = {"notnans": int(ok.size), "nonfinite": int(arr.size - ok.size)}
            for op, fn in (("mean", np.mean), ("std", np.std), ("median", np.median), ("min", np.min), ("max", np.max)):
                stats[op] = float(fn(ok)) if ok.size else None
            per_metric[name] = stats
        return {"num_images": n_images, "metrics": metrics, "per_metric": per_metric, "extra": self.extra}

    def __call__(self, engine: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        out = self.summary(engine)
        os.makedirs(os.path.dirname(os.path.abspath(self.save_path)), exist_ok=True)
        tmp = f"{self.save_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2, sort_keys=True)
        os.replace(tmp, self.save_path)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in out["metrics"].items() if v is not None)
        logger.info(f"evaluation summary ({out['num_images']} images): {shown} -> {self.save_path}")


# --------------------------------------------------------------------------------------------- verification
class FixedTimeVelocity(torch.nn.Module):
    """``network(x)`` at a fixed flow time (and no profile): a one-argument view of a flow network.

    ``python -m monai.bundle verify_net_in_out`` calls ``net(x)`` with one tensor; the flow network also needs
    ``timesteps``. The bundle configs expose ``network_verify`` (this wrapper around ``network_def``) for it.

    Args:
        network: a velocity network called as ``network(x, timesteps=t)``.
        timestep: the flow time used for every call.
    """

    def __init__(self, network: torch.nn.Module, timestep: float = 500.0) -> None:
        super().__init__()
        self.network = network
        self.timestep = float(timestep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.full((x.shape[0],), self.timestep, dtype=torch.float32, device=x.device)
        return self.network(x, timesteps=t)
