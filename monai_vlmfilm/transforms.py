"""Dictionary transforms of monai-vlmfilm: profile attachment, input checks, 2D grayscale input, vessel overlay
previews, uncertainty maps."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.image_writer import NibabelWriter, PILWriter
from monai.transforms import MapTransform, SaveImaged
from monai.utils import ensure_tuple_rep

from .atomic import DiskWriteError, atomic_write
from .profiles.base import (
    PIL_SUFFIXES,
    ImageReadError,
    Profiler,
    as_http_error,
    canonical_image,
    create_profiler,
    is_heavy,
    rgb_to_luma,
)
from .profiles.schema import DEFAULT_PROFILE, PROFILE_KEY, VLMProfile
from .profiles.store import ProfileStore

__all__ = [
    "AtomicNibabelWriter",
    "AtomicPILWriter",
    "AtomicSaveImaged",
    "AttachVLMProfiled",
    "EnsureGrayscale2Dd",
    "PRECOMPUTE_HINT",
    "SaveUncertaintyMapd",
    "SaveVesselOverlayd",
    "SplitUncertaintyd",
    "ValidateImaged",
    "VesselOverlayd",
]

logger = logging.getLogger(__name__)

PRECOMPUTE_HINT = (
    "run `python -m monai_vlmfilm.profiles precompute --datalist <datalist.json> --cache-dir <cache> "
    "--profiler <name>` before training so every image is a cache hit"
)
_POLICIES = ("compute", "default", "error")
_MAX_WARNINGS = 10


class _ProfilerStub:
    """Stands in for a heavy profiler in pickled copies (DataLoader workers): keeps the key, never runs."""

    def __init__(self, name: str, fingerprint: str) -> None:
        self.name, self.fingerprint, self.heavy = name, fingerprint, True

    def profile(self, images: Sequence[Any]) -> list[VLMProfile]:
        raise RuntimeError(f"heavy profiler {self.name!r} is not available in this process; {PRECOMPUTE_HINT}")


def _in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


class AttachVLMProfiled(MapTransform):
    """Attach the cached profile of ``d[key]`` as ``d[profile_key]`` (float32 ``[PROFILE_DIM]``).

    Works before ``LoadImaged`` (a path) or after it (a MetaTensor: the file named by
    ``filename_or_obj`` is hashed through the store's path memo, so intensity transforms placed before
    this one do not change the key; without a file the pixels themselves are hashed). When ``d[key]``
    is a MetaTensor its ``meta[PROFILE_KEY]`` (``"vlm_profile"``) gets the same vector, for inferers that receive only
    the image (MONAI Label calls ``inferer(inputs, network)``).

    Args:
        keys: image key(s) to profile.
        store: a :class:`ProfileStore` or a cache directory path (opened lazily, read-write).
        profiler: profiler instance, name (``"heuristic"``, ``"qwen"``, ``"oracle"``), dotted class path or
            dict spec (``{"name": ..., **kwargs}``); built lazily. ``None`` means ``"heuristic"``. Its
            fingerprint selects the cache entries.
        on_missing: what a cache miss does: ``"compute"`` (run the profiler and store the result;
            inside DataLoader workers a heavy profiler is never loaded and the default profile is used
            instead, with a warning), ``"default"`` (``DEFAULT_PROFILE`` marked as fallback, with a
            warning) or ``"error"`` (``KeyError`` naming the image).
        profile_key: output key, or one per key.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        store: ProfileStore | str | os.PathLike,
        profiler: Profiler | str | dict | None = None,
        on_missing: str = "compute",
        profile_key: str | Sequence[str] = PROFILE_KEY,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if on_missing not in _POLICIES:
            raise ValueError(f"on_missing must be one of {_POLICIES}, got {on_missing!r}")
        self.on_missing = on_missing
        self.profile_keys = ensure_tuple_rep(profile_key, len(self.keys))
        self._store_spec = store
        self._store: ProfileStore | None = store if isinstance(store, ProfileStore) else None
        self._profiler_spec = "heuristic" if profiler is None else profiler
        self._profiler: Any = profiler if isinstance(profiler, Profiler) else None
        self._fingerprint: str | None = None
        self._counts = {"hits": 0, "misses": 0, "computed": 0, "fallbacks": 0, "write_errors": 0}
        self._warned = 0
        self._heavy: bool | None = None

    # -- lazy members (picklable: no open handles; heavy models are never pickled into workers)
    @property
    def store(self) -> ProfileStore:
        if self._store is None:
            self._store = ProfileStore(self._store_spec)  # type: ignore[arg-type]
        return self._store

    @property
    def profiler(self) -> Any:
        if self._profiler is None:
            self._profiler = create_profiler(self._profiler_spec)
        return self._profiler

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.profiler.fingerprint
        return self._fingerprint

    @property
    def heavy(self) -> bool:
        """Whether the profiler is heavy (decided from its class: nothing is built or loaded)."""
        if self._heavy is None:
            self._heavy = is_heavy(self._profiler if self._profiler is not None else self._profiler_spec)
        return self._heavy

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.heavy:  # copies (DataLoader workers) get the key, never the model
            fp = self.fingerprint  # builds the profiler object (models load lazily, on first profile())
            state["_profiler"] = _ProfilerStub(getattr(self._profiler, "name", "profiler"), fp)
            state["_fingerprint"] = fp
            state["_heavy"] = True
        if not isinstance(self._store_spec, ProfileStore):
            state["_store"] = None
        state["_counts"] = dict.fromkeys(self._counts, 0)
        state["_warned"] = 0
        return state

    def stats(self) -> dict[str, float]:
        """Per-process counts of hits, misses, computed profiles, fallbacks, cache write errors, and the hit rate."""
        c = dict(self._counts)
        total = c["hits"] + c["misses"]
        return {**c, "total": total, "hit_rate": c["hits"] / total if total else 0.0}

    def _warn(self, msg: str, *args: Any) -> None:
        if self._warned < _MAX_WARNINGS:
            self._warned += 1
            logger.warning(msg + ("" if self._warned < _MAX_WARNINGS else " (further warnings suppressed)"), *args)

    # -- lookup
    @staticmethod
    def _source_path(img: Any) -> str | None:
        if isinstance(img, (str, os.PathLike)):
            return os.fspath(img)
        if isinstance(img, MetaTensor):
            src = img.meta.get("filename_or_obj")
            if isinstance(src, (str, os.PathLike)) and os.path.isfile(src):
                return os.fspath(src)
        return None

    def _fallback(self, reason: str, name: str) -> VLMProfile:
        self._counts["fallbacks"] += 1
        self._warn("profile cache miss for %s: %s; using the default profile", name, reason)
        return DEFAULT_PROFILE.as_fallback(reason)

    def profile_of(self, img: Any) -> VLMProfile:
        """The profile of one image (path, array, Tensor, MetaTensor) under the configured policy."""
        fp = self.fingerprint
        path = self._source_path(img)
        found = self.store.lookup(path if path is not None else img, fp)
        if found.profile is not None:
            self._counts["hits"] += 1
            return found.profile
        self._counts["misses"] += 1
        name = path or f"<{type(img).__name__} {tuple(getattr(img, 'shape', ()))}>"
        if self.on_missing == "error":
            raise KeyError(f"no cached profile for image {name} (fingerprint {fp[:80]}...); {PRECOMPUTE_HINT}")
        if self.on_missing == "default":
            return self._fallback("cache miss", name)
        if _in_worker() and self.heavy:
            return self._fallback(
                f"cache miss in a DataLoader worker (heavy profiler not loaded there); {PRECOMPUTE_HINT}", name
            )
        write_errors: list = []  # read-only / full cache: keep training on the computed profile
        prof = self.store.compute([found], self.profiler, write_errors=write_errors)[0]
        self._counts["computed"] += 1
        for _key, e in write_errors:
            self._counts["write_errors"] += 1
            self._warn("profile for %s computed but not cached: %s", name, e)
        if prof.is_fallback:
            self._counts["fallbacks"] += 1
            self._warn(
                "profiler %s gave a fallback profile for %s: %s", getattr(self.profiler, "name", "?"), name, prof.reason
            )
        return prof

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, pkey in self.key_iterator(d, self.profile_keys):
            vec = torch.from_numpy(self.profile_of(d[key]).to_vector())
            d[pkey] = vec
            if isinstance(d[key], MetaTensor):
                d[key].meta[PROFILE_KEY] = vec.clone()
        return d


class ValidateImaged(MapTransform):
    """Refuse an input image the vessel network cannot segment, with an :class:`ImageReadError` naming the problem.

    Put it first in an inference pipeline, before ``LoadImaged``: a server (MONAI Label) hands it whatever a
    client uploaded. A path is checked before anything is decoded at full size: it must exist (404), be
    non-empty and no larger than ``max_pixels`` (413, read from the PIL / NIfTI header), then decode to one
    finite 2D image (422: truncated or non-image files, volumes, NaN / Inf pixels), exactly the way profiles
    read files (:func:`~monai_vlmfilm.profiles.canonical_image`). An array or tensor (MONAI Label may pass one)
    gets the same checks; a folder (a DICOM series) is left to ``LoadImaged``. Valid images pass unchanged, 16-bit
    and RGB(A) included. Without this check MONAI's ``LoadImaged`` raises a ``RuntimeError`` listing its readers,
    NaN pixels give a mask without any error when FiLM is off (one NaN makes ``ScaleIntensityd``'s output all NaN), and a whole-image pass over a huge image
    takes the memory of the machine (on CPU one sample of the bundle network needed 1.9 GB extra for a 1024 x 1024
    image; samples and TTA copies multiply it).

    Where the process serves HTTP with starlette (MONAI Label's FastAPI) the error is also a starlette
    ``HTTPException`` (:func:`~monai_vlmfilm.profiles.as_http_error`), so the client gets that 4xx status with
    the message instead of a bare ``500 Internal Server Error``.

    Args:
        keys: keys of the images (paths before ``LoadImaged``, or arrays / tensors).
        max_pixels: the largest image (height x width) accepted; ``None`` or ``0`` accepts any size.
        allow_missing_keys: don't raise when a key is absent.

    Raises:
        ImageReadError: with ``status_code`` 404, 413 or 422 as above; the message names the file.
    """

    def __init__(self, keys: KeysCollection, max_pixels: int | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if max_pixels is not None and int(max_pixels) < 0:
            raise ValueError(f"max_pixels must be None, 0 or positive, got {max_pixels}")
        self.max_pixels = int(max_pixels) if max_pixels else None

    @staticmethod
    def _header_pixels(path: str) -> tuple[int, ...] | None:
        """Spatial shape from the file header (nothing decoded), or ``None`` where the header says nothing."""
        low = path.lower()
        try:
            if low.endswith(PIL_SUFFIXES):
                from PIL import Image

                with Image.open(path) as im:  # lazy: reads the header only
                    return (im.height, im.width)
            if low.endswith((".nii", ".nii.gz")):
                import nibabel as nib

                shape = nib.load(path).shape  # lazy: header only
                return tuple(int(s) for s in shape if s > 1) or (1,)
        except Exception:  # noqa: BLE001 - an unreadable header is reported by the full read below
            return None
        return None

    def _check_size(self, shape: tuple[int, ...], what: str) -> None:
        pixels = int(np.prod(shape)) if shape else 0
        if self.max_pixels and pixels > self.max_pixels:
            dims = " x ".join(str(s) for s in shape)
            raise ImageReadError(
                f"{what} is too large: {dims} = {pixels / 1e6:.1f} Mpx, more than max_pixels {self.max_pixels} "
                f"({self.max_pixels / 1e6:.2f} Mpx) of this pipeline; downsample it, or raise max_pixels "
                "(whole-image inference needs memory in proportion to the pixels)",
                status_code=413,
            )

    def _check(self, img: Any) -> None:
        if isinstance(img, (str, os.PathLike)):
            path = os.fspath(img)
            what = f"image file {path!r}"
            if not path:  # MONAI Label resolves an image id it does not know to ""
                raise ImageReadError("no image file given (empty path: an unknown image id?)", status_code=404)
            if os.path.isdir(path):  # a DICOM series folder: left to LoadImaged's readers, as before this check
                return
            if not os.path.isfile(path):
                raise ImageReadError(f"{what} does not exist", status_code=404)
            if os.path.getsize(path) == 0:
                raise ImageReadError(f"{what} is empty (0 bytes)")
            shape = self._header_pixels(path)
            if shape is not None:
                self._check_size(shape, what)
        else:
            src = getattr(img, "meta", {}).get("filename_or_obj") if hasattr(img, "meta") else None
            what = f"image from {src!r}" if src else "image array"
        arr = canonical_image(img)  # decodes: truncated / non-image / volume / NaN -> ImageReadError naming it
        self._check_size(tuple(arr.shape), what)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                self._check(d[key])
            except ImageReadError as e:
                raise as_http_error(e) from e.__cause__
        return d


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
        if c in (3, 4):  # alpha dropped
            gray = rgb_to_luma(img.float(), channel_axis=0)[None]
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


# the last failed atomic write of this thread: MONAI's SaveImage turns every writer error into "cannot find a suitable
# writer ... install the writer libraries", which is wrong for a full disk; AtomicSaveImaged re-raises the real one
_write_error = threading.local()


class _AtomicWriterMixin:
    """``write`` through :func:`~monai_vlmfilm.atomic.atomic_write`: an output file is complete or absent."""

    def write(self, filename: Any, verbose: bool = False, **kwargs: Any) -> None:
        suffix = "".join(Path(str(filename)).suffixes[-2:])  # the writer picks the format by it (.nii.gz, .png)
        try:
            with atomic_write(filename, suffix=suffix) as tmp:
                super().write(str(tmp), verbose=verbose, **kwargs)  # type: ignore[misc]
        except DiskWriteError as e:
            _write_error.last = e
            raise


class AtomicNibabelWriter(_AtomicWriterMixin, NibabelWriter):
    """MONAI ``NibabelWriter`` (NIfTI) writing atomically: a full disk or a kill never leaves a partial file."""


class AtomicPILWriter(_AtomicWriterMixin, PILWriter):
    """MONAI ``PILWriter`` (PNG, JPEG, ...) writing atomically: a full disk or a kill never leaves a partial file."""


_ATOMIC_WRITERS = {".nii": AtomicNibabelWriter, ".nii.gz": AtomicNibabelWriter, ".png": AtomicPILWriter,
                   ".jpg": AtomicPILWriter, ".jpeg": AtomicPILWriter, ".bmp": AtomicPILWriter}  # fmt: skip


class AtomicSaveImaged(SaveImaged):
    """MONAI ``SaveImaged`` whose files are written atomically; a failed write raises the real error.

    For ``.nii`` / ``.nii.gz`` / ``.png`` / ``.jpg`` / ``.bmp`` (unless ``writer`` is given) it writes with
    :class:`AtomicNibabelWriter` / :class:`AtomicPILWriter`, so a full disk or a kill leaves each output complete or
    absent. A write that fails for lack of space raises :class:`~monai_vlmfilm.atomic.DiskWriteError` naming the
    file and "no space left ... file size limit", instead of MONAI's "cannot find a suitable writer". It is still a
    ``SaveImaged`` (MONAI Label drops it from a bundle's post-processing as before).

    Args:
        keys, output_ext, writer, kwargs: as ``SaveImaged``.
    """

    def __init__(self, keys: KeysCollection, output_ext: str = ".nii.gz", writer: Any = None, **kwargs: Any) -> None:
        writer = writer or _ATOMIC_WRITERS.get(output_ext.lower() if output_ext.startswith(".") else f".{output_ext}")
        super().__init__(keys=keys, output_ext=output_ext, writer=writer, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        _write_error.last = None
        try:
            return super().__call__(data)
        except RuntimeError:
            err = getattr(_write_error, "last", None)
            if err is None:
                raise
            _write_error.last = None
            raise err from None


def _rgb_png_saver_args(
    keys: list[str], output_dir: str, output_postfix: str, separate_folder: bool, data_root_dir: str, print_log: bool
) -> dict[str, Any]:
    """``SaveImaged`` arguments of the PNG previews (overlay, uncertainty heat map): RGB in [0, 1] written as 8-bit
    PNG at the input's own size; the preview keys are internal, so a missing one is skipped."""
    return {
        "keys": keys,
        "output_dir": output_dir,
        "output_postfix": output_postfix,
        "output_ext": ".png",
        "resample": False,
        "scale": 255,
        "output_dtype": np.uint8,
        "separate_folder": separate_folder,
        "data_root_dir": data_root_dir,
        "print_log": print_log,
        "allow_missing_keys": True,
    }


class SaveVesselOverlayd(AtomicSaveImaged):
    """Write the :class:`VesselOverlayd` preview of each mask key as an RGB PNG (``<name>_overlay.png``), atomically.

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
        super().__init__(**_rgb_png_saver_args(overlay_keys, output_dir, output_postfix, separate_folder,
                                               data_root_dir, print_log))  # fmt: skip

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        super().__call__(self.overlay(data))
        return dict(data)


class SplitUncertaintyd(MapTransform):
    """Move the spread that :class:`~monai_vlmfilm.inferers.FlowSegInferer` appends with ``return_uncertainty=True``
    (channels ``[C:]`` of the prediction, the per-pixel standard deviation of the probability over noise samples and
    test-time-augmented copies) to its own key, and summarise it in the result dictionary MONAI Label returns.

    A prediction with ``mask_channels`` channels only (no spread appended) passes through unchanged, so the same
    post-processing serves both settings.

    Args:
        keys: the prediction key(s), e.g. ``"pred"``.
        mask_channels: channels of the mask (the rest is the spread).
        uncertainty_key: output key of the spread (``"{key}_{uncertainty_key}"`` when several keys are given).
        summary_key: a dictionary in the data that receives ``uncertainty_mean``, ``uncertainty_p95`` and
            ``uncertainty_max`` (MONAI Label's infer task returns ``data["result"]`` as the response JSON);
            None skips it.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_channels: int = 1,
        uncertainty_key: str = "uncertainty",
        summary_key: str | None = "result",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_channels = int(mask_channels)
        self.uncertainty_key = uncertainty_key
        self.summary_key = summary_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            pred = d[key]
            c = self.mask_channels
            if pred.shape[0] == c:
                continue
            if pred.shape[0] != 2 * c:
                raise ValueError(
                    f"{key!r} has {pred.shape[0]} channels: expected {c} (mask) or {2 * c} (mask + spread)"
                )
            out_key = self.uncertainty_key if len(keys) == 1 else f"{key}_{self.uncertainty_key}"
            d[key], d[out_key] = pred[:c], pred[c:]
            if self.summary_key is not None:
                u = torch.as_tensor(d[out_key]).detach().float().flatten()
                summary = dict(d.get(self.summary_key) or {})
                summary.update(
                    {
                        f"{out_key}_mean": round(float(u.mean()), 5),
                        f"{out_key}_p95": round(float(torch.quantile(u[:: max(1, u.numel() // 2**20)], 0.95)), 5),
                        f"{out_key}_max": round(float(u.max()), 5),
                    }
                )
                d[self.summary_key] = summary
        return d


class SaveUncertaintyMapd(AtomicSaveImaged):
    """Write an uncertainty map as a heat-map PNG (``<name>_uncertainty.png``, matplotlib's ``magma`` colour map),
    atomically.

    The colour scale runs from 0 to ``vmax``, or to the image's own 99.5th percentile when ``vmax`` is None (the
    spread of a one-step model is small, a few hundredths at most, and a fixed scale would show black); the
    NIfTI written beside it keeps the values. Dropped by MONAI Label, like every ``SaveImaged``.

    Args:
        keys: uncertainty key(s) (missing keys are skipped: no spread, no file).
        output_dir, output_postfix, separate_folder, data_root_dir, print_log: as ``SaveImaged``.
        vmax: top of the colour scale; None scales each image to its own 99.5th percentile.
        cmap: matplotlib colour map name.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str = "./",
        output_postfix: str = "uncertainty",
        separate_folder: bool = False,
        data_root_dir: str = "",
        print_log: bool = True,
        vmax: float | None = None,
        cmap: str = "magma",
    ) -> None:
        import matplotlib

        self.cmap = matplotlib.colormaps[cmap]
        self.vmax = vmax
        self.source_keys = [keys] if isinstance(keys, str) else [str(k) for k in keys]
        heat_keys = [f"_{k}_heat" for k in self.source_keys]
        super().__init__(**_rgb_png_saver_args(heat_keys, output_dir, output_postfix, separate_folder,
                                               data_root_dir, print_log))  # fmt: skip

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.source_keys:
            if key not in d:
                continue
            src = d[key]
            u = torch.as_tensor(src).detach().float().cpu()[0].numpy()
            top = self.vmax if self.vmax is not None else float(np.quantile(u, 0.995))
            rgb = self.cmap(np.clip(u / top, 0, 1) if top > 0 else np.zeros_like(u))[..., :3]
            out = MetaTensor(torch.as_tensor(rgb, dtype=torch.float32).permute(2, 0, 1))
            if isinstance(src, MetaTensor):
                out.copy_meta_from(src, copy_attr=False)
            d[f"_{key}_heat"] = out
        super().__call__(d)
        return dict(data)
