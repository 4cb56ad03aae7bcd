"""Profiler interface, the canonical image form every profiler and the store share, and the pixel hash.

Canonical image: one 2D ``float32`` array of raw intensities (no rescaling). Files are read in
display orientation ``(H, W)`` (as PIL shows them); arrays and tensors keep the orientation they
arrive in, after singleton / equal-colour channel dimensions are dropped. MONAI's ``LoadImage``
(PIL reader) transposes 2D images to ``(W, H)``, so :func:`pixel_digest` is transpose-invariant:
an image and its transpose share one digest, whichever route it took.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .schema import VLMProfile

__all__ = [
    "Profiler",
    "ImageReadError",
    "as_http_error",
    "canonical_image",
    "pixel_digest",
    "create_profiler",
    "is_heavy",
    "PIL_SUFFIXES",
    "LUMA_WEIGHTS",
    "rgb_to_luma",
]

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".pbm", ".bmp", ".tif", ".tiff", ".gif", ".webp")
_DIGEST_VERSION = b"vlmfilm-pixels/v1"
# PIL modes whose values are intensities (plus "I;16*"); others are converted to RGB(A) first
_PIL_INTENSITY_MODES = ("1", "L", "LA", "I", "F", "RGB", "RGBA")


class ImageReadError(ValueError):
    """An image that cannot be turned into a canonical 2D array (message names the file and the problem).

    Args:
        message: what is wrong, naming the file (or the array's source).
        status_code: the HTTP status a server should answer with when the image came from a client: 404 (no such
            file), 413 (too large) or 422 (anything else: empty, undecodable, not 2D, NaN pixels, ...).
            :func:`as_http_error` turns the error into one a FastAPI server (MONAI Label) answers with it.
    """

    def __init__(self, message: str = "", status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code
        # the attributes FastAPI's handler of starlette's HTTPException reads (see as_http_error)
        self.detail = message
        self.headers: dict[str, str] | None = None

    def __str__(self) -> str:  # the message alone, also when starlette's HTTPException is a base
        return str(self.detail)

    def __reduce__(self) -> tuple:
        # pickled (DataLoader workers) with its status; the HTTP subclass is made at run time, so rebuild through
        # as_http_error on the receiving side
        return (_unpickle_image_read_error, (self.detail, self.status_code))


def _unpickle_image_read_error(message: str, status_code: int) -> ImageReadError:
    return as_http_error(ImageReadError(message, status_code))


_HTTP_ERROR_CLASSES: dict[type, type] = {}


def as_http_error(err: ImageReadError) -> ImageReadError:
    """``err``, also a ``starlette.exceptions.HTTPException`` where this process serves HTTP with starlette.

    MONAI Label 0.8.5 has no exception handler of its own: anything its ``/infer`` route raises becomes a bare
    ``500 Internal Server Error`` with no message, and it calls the bundle's pre-transforms one by one (not
    through ``Compose``, which would wrap the error in a ``RuntimeError``), so an error raised by a transform
    reaches FastAPI as it is. An instance of a subclass of both :class:`ImageReadError` and starlette's
    ``HTTPException`` is answered by FastAPI's own handler with ``err.status_code`` and ``{"detail": message}``,
    and stays an ``ImageReadError`` / ``ValueError`` for everything else. Nothing is imported: where starlette is
    not loaded already (the command line, training) ``err`` is returned unchanged.
    """
    import sys

    base = getattr(sys.modules.get("starlette.exceptions"), "HTTPException", None)
    if not isinstance(base, type) or isinstance(err, base):
        return err
    cls = _HTTP_ERROR_CLASSES.get(base)
    if cls is None:
        cls = type("ImageReadHTTPError", (ImageReadError, base), {"__module__": __name__})
        _HTTP_ERROR_CLASSES[base] = cls
    new = cls(err.detail, err.status_code)
    new.__cause__, new.__traceback__ = err.__cause__, err.__traceback__
    return new


class Profiler(ABC):
    """Writes a :class:`VLMProfile` per image.

    Subclasses set ``name`` and ``heavy`` (True for a model that must never be loaded inside a
    DataLoader worker), implement :meth:`profile`, and extend :meth:`fingerprint_fields` with
    everything that changes their outputs (model id and revision, prompt, mode, version of the code).
    """

    name: str = "profiler"
    heavy: bool = False

    def fingerprint_fields(self) -> dict[str, Any]:
        """JSON-serialisable settings that change the outputs (the base covers class and name)."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "name": self.name}

    @property
    def fingerprint(self) -> str:
        """Stable string of everything that changes outputs; part of every cache key."""
        return json.dumps(self.fingerprint_fields(), sort_keys=True, separators=(",", ":"), default=str)

    @abstractmethod
    def profile(self, images: Sequence[np.ndarray]) -> list[VLMProfile]:
        """Profiles of a batch of canonical 2D float32 arrays ``(H, W)`` in display orientation."""

    def __call__(self, images: Sequence[np.ndarray]) -> list[VLMProfile]:
        return self.profile(images)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, heavy={self.heavy})"


def _read_file(path: str) -> np.ndarray:
    low = path.lower()
    if not os.path.isfile(path):
        raise ImageReadError(f"image file {path!r} does not exist", status_code=404)
    if os.path.getsize(path) == 0:
        raise ImageReadError(f"image file {path!r} is empty (0 bytes)")
    if low.endswith(PIL_SUFFIXES):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                if im.mode not in _PIL_INTENSITY_MODES and not im.mode.startswith("I;16"):
                    # palette indices, CMYK, YCbCr, LAB, HSV are not intensities: convert like PIL's own "RGB"
                    alpha = "a" in im.mode.lower() or "transparency" in im.info
                    im = im.convert("RGBA" if alpha else "RGB")
                arr = np.asarray(im)
        except Image.DecompressionBombError as e:  # PIL's size limit: say which file and how to lift it
            raise ImageReadError(
                f"image file {path!r} is too large: {e} (raise PIL.Image.MAX_IMAGE_PIXELS if it is trusted)",
                status_code=413,
            ) from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageReadError(f"cannot read image file {path!r}: {type(e).__name__}: {e}") from e
        return arr
    from monai.transforms import LoadImage

    try:
        arr = LoadImage(image_only=True, dtype=None)(path)  # the file's own dtype: overflow is named below
    except Exception as e:  # MONAI raises several types for unreadable files
        raise ImageReadError(f"cannot read image file {path!r}: {type(e).__name__}: {e}") from e
    arr = np.asarray(arr.detach().cpu() if isinstance(arr, torch.Tensor) else arr)
    if sum(s > 1 for s in arr.shape) > 2:  # a volume with 3 or 4 slices is not an RGB(A) picture
        raise ImageReadError(f"image file {path!r}: expected a 2D image, got a volume of shape {arr.shape}")
    return arr


#: ITU-R BT.601 luma weights of R, G, B: the conversion PIL's "L" mode uses.
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)


def rgb_to_luma(rgb: Any, channel_axis: int = -1) -> Any:
    """BT.601 luma of the first three channels of a float array or tensor, the channel axis removed.

    The one RGB -> gray conversion of the package (profile hashing and ``EnsureGrayscale2Dd``), written as one
    weighted sum so that hashed pixels stay bit-identical across versions.

    Args:
        rgb: float ``numpy`` array or ``torch`` tensor with 3 or 4 (alpha, ignored) channels on ``channel_axis``.
        channel_axis: the channel axis.
    """
    x = rgb.movedim(channel_axis, 0) if hasattr(rgb, "movedim") else np.moveaxis(rgb, channel_axis, 0)
    return x[0] * LUMA_WEIGHTS[0] + x[1] * LUMA_WEIGHTS[1] + x[2] * LUMA_WEIGHTS[2]


def _drop_channels(arr: np.ndarray, what: str) -> np.ndarray:
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    while arr.ndim > 2 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and 2 in (arr.shape[0], arr.shape[-1]):  # gray + alpha: alpha is not an intensity
        arr = arr[..., 0] if arr.shape[-1] == 2 and arr.shape[0] != 2 else arr[0]
    if arr.ndim == 3:
        if arr.shape[-1] in (3, 4) and arr.shape[0] not in (3, 4):
            rgb = arr[..., :3]
        elif arr.shape[0] in (3, 4):
            rgb = np.moveaxis(arr[:3], 0, -1)
        else:
            raise ImageReadError(f"{what}: expected a 2D image (optionally with 1/3/4 channels), got shape {arr.shape}")
        first = rgb[..., 0]
        if np.array_equal(first, rgb[..., 1]) and np.array_equal(first, rgb[..., 2]):
            arr = first
        else:
            arr = rgb_to_luma(rgb.astype(np.float32), channel_axis=-1)
    if arr.ndim != 2:
        raise ImageReadError(f"{what}: expected a 2D image, got shape {arr.shape}")
    return arr


def canonical_image(x: Any, *, check_finite: bool = True) -> np.ndarray:
    """One canonical 2D ``float32`` array (raw intensities) from a path, array, Tensor or MetaTensor.

    Args:
        x: a file path (PNG/PGM/JPEG/... through PIL in display orientation ``(H, W)``, other formats
            such as NIfTI through MONAI ``LoadImage``), a numpy array, a torch Tensor or a MONAI
            MetaTensor; shapes ``(H, W)``, ``(1, H, W)``, ``(H, W, 1)``, ``(3|4, H, W)``,
            ``(H, W, 3|4)``, gray + alpha ``(H, W, 2)`` / ``(2, H, W)`` (equal channels are collapsed, colour
            goes to luma, alpha is dropped; CMYK / YCbCr / palette files are converted to RGB first).
        check_finite: raise on NaN / Inf pixels (a profile of such an image would be silently wrong).

    Raises:
        ImageReadError: unreadable / empty file, wrong dimensions, non-finite or empty image; the
            message names the file (or the array's source) and the problem.
    """
    what = "image array"
    if isinstance(x, (str, os.PathLike)):
        what = f"image file {os.fspath(x)!r}"
        arr = _read_file(os.fspath(x))
    elif isinstance(x, torch.Tensor):
        src = getattr(x, "meta", {}).get("filename_or_obj") if hasattr(x, "meta") else None
        if src:
            what = f"image tensor from {src!r}"
        arr = x.detach().cpu().numpy() if x.dtype != torch.bfloat16 else x.detach().float().cpu().numpy()
    else:
        arr = np.asarray(x)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise ImageReadError(f"{what}: pixel dtype {arr.dtype} is not numeric")
    arr = _drop_channels(arr, what)
    if arr.size == 0:
        raise ImageReadError(f"{what}: image is empty (shape {arr.shape})")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by name
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if check_finite and not np.isfinite(out).all():
        if arr.dtype.kind == "f" and np.isfinite(arr).all():
            big = float(np.abs(arr).max())
            raise ImageReadError(f"{what}: pixel values beyond the float32 range (|x| up to {big:.3g})")
        raise ImageReadError(f"{what}: image has NaN or Inf pixels")
    return out


def _orientation_digest(arr: np.ndarray) -> str:
    h = hashlib.sha256(_DIGEST_VERSION)
    h.update(f"|{arr.shape[0]}x{arr.shape[1]}|float32-le|".encode())
    # row blocks of ~8 MiB: the bytes of the whole array in order, without full-size copies of large images
    rows = max(1, (8 << 20) // max(4 * arr.shape[1], 1))
    for i in range(0, arr.shape[0], rows):
        h.update(np.ascontiguousarray(arr[i : i + rows] + np.float32(0.0), dtype="<f4"))  # -0.0 -> 0.0
    return h.hexdigest()


def pixel_digest(image: Any) -> str:
    """Transpose-invariant sha256 of the canonical pixels (float32 of raw intensities) and shape.

    uint8 and float32 arrays of the same values, ``(H, W)`` and MONAI's transposed ``(W, H)``, and
    channel-first / channel-last forms of one image all give the same digest.
    """
    arr = image if isinstance(image, np.ndarray) and image.ndim == 2 and image.dtype == np.float32 else None
    if arr is None:
        arr = canonical_image(image)
    return min(_orientation_digest(arr), _orientation_digest(arr.T))


_BUILTIN = {
    "heuristic": "monai_vlmfilm.profiles.heuristic.HeuristicProfiler",
    "oracle": "monai_vlmfilm.profiles.oracle.OracleProfiler",
    "qwen": "monai_vlmfilm.profiles.qwen.QwenVLProfiler",
    "qwen2_5_vl": "monai_vlmfilm.profiles.qwen.QwenVLProfiler",
}


def _locate(name: str) -> Any:
    path = _BUILTIN.get(name.lower(), name)
    mod, _, attr = path.rpartition(".")
    if not mod:
        raise ValueError(f"unknown profiler {name!r}: use one of {sorted(_BUILTIN)} or a dotted class path")
    return getattr(importlib.import_module(mod), attr)


def is_heavy(spec: Any) -> bool:
    """Whether a profiler (instance or spec) is heavy, without building or loading it."""
    if isinstance(spec, (str, Path)):
        return bool(getattr(_locate(str(spec)), "heavy", False))
    if isinstance(spec, dict):
        target = spec.get("_target_") or spec.get("name") or spec.get("profiler")
        return bool(getattr(_locate(str(target)), "heavy", False)) if target else False
    return bool(getattr(spec, "heavy", False))


def create_profiler(spec: Any) -> Profiler:
    """A profiler from a config spec.

    Args:
        spec: a :class:`Profiler` instance (returned as is); a name (``"heuristic"``, ``"oracle"``,
            ``"qwen"``) or dotted class path; or a dict ``{"name"|"_target_": ..., **kwargs}``.
    """
    if isinstance(spec, Profiler):
        return spec
    if isinstance(spec, (str, Path)):
        return _locate(str(spec))()
    if isinstance(spec, dict):
        kw = dict(spec)
        target = kw.pop("_target_", None) or kw.pop("name", None) or kw.pop("profiler", None)
        if not target:
            raise ValueError(f"profiler spec {spec!r} needs a 'name' or '_target_'")
        return _locate(str(target))(**kw)
    if hasattr(spec, "profile") and hasattr(spec, "fingerprint"):
        return spec  # duck-typed profiler
    raise TypeError(f"cannot build a profiler from {type(spec).__name__}: {spec!r}")
