"""Datalists: the one reader (``load_split``, ``image_list``) and writer, and the builder from image / mask folders.

Build a MONAI datalist from folders of angiograms and vessel masks, validating every pair first.

Images and masks are paired by name: the mask of ``<stem>.<ext>`` is ``<stem><mask_suffix>.<any ext>`` in the
masks folder (DCA1's original layout ``N.pgm`` + ``N_gt.pgm`` in one folder: ``--masks`` = ``--images`` and
``--mask-suffix _gt``; an XCAD-like ``images/N.png`` + ``masks/N.png``: empty suffix).  Supported: PNG, PGM/PPM,
JPEG, BMP, TIFF and NIfTI (``.nii``, ``.nii.gz``; MHA / NRRD through ITK when installed).  Files are read with MONAI's own readers (``PILReader``,
``NibabelReader``), so shapes are compared in the layout the training pipeline sees.

Every pair is checked (readable, non-empty, same spatial shape, mask binary or binarisable) and every problem
is collected before anything is reported; with any problem nothing is written and the CLI exits with 1.

Mask binarisation rule (stated in the output and in the datalist's ``mask_binarisation``): with ``threshold``
unset, a mask whose values are all in {0, 1} is read as is (foreground > 0.5); an 8-bit mask is foreground
where > 127; a float mask with values in [0, 1] where > 0.5; any other range where > half its maximum.
A mask is *not binarisable* (an error) when more than ``max_gray_fraction`` (default 5 %) of its pixels lie in
the middle half of its value range (a grayscale image or a heavily blurred mask, not a label); a few such
pixels (JPEG or resampling edges) only give a warning.

CLI::

    python -m monai_vlmfilm.data.datalist --images DIR --masks DIR [--mask-suffix _gt] \\
        [--val-fraction 0.2 --test-fraction 0.0 --seed 0] [--threshold T] --out datalist.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatalistError",
    "split_name",
    "read_array",
    "mask_threshold",
    "split_items",
    "read_datalist",
    "load_split",
    "image_list",
    "write_datalist",
    "build_datalist",
    "main",
]

#: the image file endings the package reads (datalist building, inference inputs, image folders); longest first,
#: so ".nii.gz" wins over ".gz"
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".nii.gz",
    ".nii",
    ".png",
    ".pgm",
    ".ppm",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".mha",
    ".nrrd",
)
_NEEDS_PIL_READER = (".pgm", ".ppm", ".tif", ".tiff")  # LoadImage's automatic reader choice skips these
BINARISATION_RULE = (
    "foreground = mask > T; T = 0.5 for masks with values in {0, 1}, 127 for other 8-bit masks, 0.5 for float "
    "masks in [0, 1], otherwise half the mask's maximum (unless a threshold is given)"
)


class DatalistError(ValueError):
    """Raised with every problem found (``problems``: list of "file: what is wrong" lines)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s):\n" + "\n".join(self.problems))


def split_name(path: str | Path) -> tuple[str, str]:
    """Split a file name into (stem, extension) with the supported (possibly double) extension; ext '' if unsupported."""
    name = Path(path).name
    low = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[len(name) - len(ext) :]
    return name, ""


def read_array(path: str | Path) -> np.ndarray:
    """Read an image with MONAI's reader for its format, native dtype, in LoadImage's layout (PNG: x, y).

    Raises:
        ValueError: naming the file, for an empty or unreadable file.
    """
    from monai.data import NibabelReader, PILReader
    from monai.transforms import LoadImage

    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    ext = split_name(path)[1].lower()
    # .mha / .nrrd: LoadImage's own choice (ITKReader, when itk is installed)
    reader = NibabelReader() if ext.startswith(".nii") else None if ext in (".mha", ".nrrd") else PILReader()
    try:
        arr = LoadImage(reader=reader, image_only=True, dtype=None)(str(path))
    except Exception as e:  # any reader failure is a broken file for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {msg})") from e
    return np.asarray(arr)


def _spatial(arr: np.ndarray) -> np.ndarray:
    """Drop trailing singleton dims (NIfTI 2D slices are often (x, y, 1))."""
    while arr.ndim > 2 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


def mask_threshold(mask: np.ndarray) -> float:
    """The automatic binarisation threshold for a mask (see the module docstring for the rule)."""
    m = np.asarray(mask)
    lo, hi = float(m.min()), float(m.max())
    if lo >= 0 and hi <= 1 and np.all((m == 0) | (m == 1)):
        return 0.5
    if m.dtype == np.uint8 or (np.issubdtype(m.dtype, np.integer) and lo >= 0 and hi <= 255):
        return 127.0
    if np.issubdtype(m.dtype, np.floating) and lo >= 0 and hi <= 1:
        return 0.5
    return hi / 2.0


def _full_range(m: np.ndarray) -> float:
    """Nominal top of a mask's value range: 1 (values in [0, 1]), 255 (8-bit) or its maximum."""
    hi = float(m.max())
    if hi <= 1.0:
        return 1.0
    if np.issubdtype(m.dtype, np.integer) and hi <= 255:
        return 255.0
    return hi


@dataclass
class _Check:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _check_mask(path: Path, mask: np.ndarray, threshold: float | None, max_gray_fraction: float, chk: _Check) -> float:
    m = _spatial(mask)
    if m.ndim == 3:  # RGB(A)-stored mask: fine when every colour channel is the same
        if not all(np.array_equal(m[..., 0], m[..., c]) for c in range(1, min(m.shape[-1], 3))):
            chk.problems.append(f"{path}: mask has {m.shape[-1]} different colour channels (expected one gray channel)")
            return float("nan")
        m = m[..., 0]
    if m.ndim != 2:
        chk.problems.append(f"{path}: mask is not 2D (shape {tuple(mask.shape)})")
        return float("nan")
    t = mask_threshold(m) if threshold is None else float(threshold)
    full = _full_range(m)
    vals = m.astype(np.float64)
    gray = float(((vals > 0.25 * full) & (vals < 0.75 * full)).mean())
    if gray > max_gray_fraction:
        chk.problems.append(
            f"{path}: mask is not binary ({100 * gray:.1f}% of pixels between 25% and 75% of its range "
            f"0..{full:g}; at most {100 * max_gray_fraction:.0f}% allowed): a grayscale image, not a label?"
        )
        return t
    n_vals = len(np.unique(m))
    if (vals > t).sum() == 0:
        chk.warnings.append(f"{path}: mask is empty (no pixel > {t:g})")
    elif n_vals > 2:
        chk.warnings.append(f"{path}: mask has {n_vals} distinct values (soft edges); binarised at > {t:g}")
    return t


def check_pair(
    image: str | Path,
    mask: str | Path | None,
    chk: _Check,
    threshold: float | None = None,
    max_gray_fraction: float = 0.05,
    require_finite: bool = False,
) -> tuple[np.ndarray | None, float | None]:
    """Read and check one image and its mask (if any), adding "file: what is wrong" lines to ``chk``.

    Checks: both files exist and decode; the image is 2D gray or colour; the mask has the image's size and is binary
    (:func:`mask_threshold` rules); with ``require_finite``, a floating-point image has no NaN / infinite pixel.
    The datalist builder and the preflight share this one check.

    Returns:
        ``(image array, mask threshold)``; the array is None when the image is unusable, the threshold None when
        there is no usable mask.
    """
    arrs: dict[str, np.ndarray] = {}
    for kind, p in (("image", image), ("mask", mask)):
        if p is None:
            continue
        if not os.path.isfile(p):
            chk.problems.append(f"{p}: {kind} file does not exist")
            continue
        try:
            arrs[kind] = _spatial(read_array(p))
        except ValueError as e:  # read_array names the file and the reader's complaint
            chk.problems.append(str(e))
    img = arrs.get("image")
    if img is not None and (img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (3, 4))):
        chk.problems.append(f"{image}: not a 2D gray or colour image (shape {img.shape})")
        return None, None
    if require_finite and img is not None and np.issubdtype(img.dtype, np.floating) and not np.isfinite(img).all():
        chk.problems.append(f"{image}: image has {int((~np.isfinite(img)).sum())} NaN / infinite pixels")
        return None, None
    if img is None or "mask" not in arrs:
        return img, None
    msk = arrs["mask"]
    if img.shape[:2] != msk.shape[:2]:
        chk.problems.append(
            f"{mask}: mask shape {msk.shape[:2]} differs from image {Path(image).name} shape {img.shape[:2]}"
        )
        return img, None
    return img, _check_mask(Path(mask), msk, threshold, max_gray_fraction, chk)


def _natural_key(s: str) -> list[Any]:
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", s)]


def _list_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name)


def split_items(
    items: Sequence[dict], val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0
) -> dict[str, list[dict]]:
    """Deterministic random split into ``training`` / ``validation`` / ``test`` (each kept in input order).

    Args:
        items: datalist entries.
        val_fraction: fraction for validation (rounded to the nearest count).
        test_fraction: fraction for test.
        seed: shuffle seed.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val, test fractions and val + test < 1, got {val_fraction}, {test_fraction}")
    n = len(items)
    n_val, n_test = int(round(val_fraction * n)), int(round(test_fraction * n))
    if n and n_val + n_test >= n:
        raise ValueError(f"{n} pairs leave no training images with val {val_fraction} / test {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    test_idx, val_idx = set(order[:n_test].tolist()), set(order[n_test : n_test + n_val].tolist())
    out: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for i, it in enumerate(items):
        out["test" if i in test_idx else "validation" if i in val_idx else "training"].append(it)
    return out


def write_datalist(datalist: dict, out: str | Path) -> Path:
    """Write a datalist JSON atomically (temp file + rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(datalist, indent=1))
    tmp.replace(out)
    return out


def build_datalist(
    images_dir: str | Path,
    masks_dir: str | Path,
    out: str | Path | None = None,
    mask_suffix: str = "",
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    threshold: float | None = None,
    max_gray_fraction: float = 0.05,
    description: str | None = None,
    log: Any = None,
) -> dict:
    """Pair, validate and split images and masks into a MONAI datalist (written to ``out`` when given).

    Args:
        images_dir: folder with the angiograms.
        masks_dir: folder with the masks (may be the same folder when ``mask_suffix`` is set).
        out: datalist JSON to write; paths in it are relative to its folder. None: return only (absolute paths).
        mask_suffix: mask name = image stem + suffix (any supported extension).
        val_fraction: fraction of pairs for ``validation``.
        test_fraction: fraction of pairs for ``test``.
        seed: split seed.
        threshold: mask binarisation threshold (foreground = value > threshold); None: the automatic rule.
        max_gray_fraction: a mask with more pixels in the middle half of its range is not binarisable.
        description: datalist ``description``.
        log: callable for warnings / notes (default: print to stderr).

    Returns:
        the datalist dict (``training``, ``validation``, ``test`` lists of ``{"image", "label"}``).

    Raises:
        DatalistError: listing every problem found (unpaired, ambiguous, unreadable, empty, shape mismatch,
            non-binary mask), after checking all files.
    """
    say = log or (lambda m: print(m, file=sys.stderr))
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    chk = _Check()
    for d, what in ((images_dir, "images"), (masks_dir, "masks")):
        if not d.is_dir():
            chk.problems.append(f"{d}: {what} folder does not exist")
    if chk.problems:
        raise DatalistError(chk.problems)
    same = images_dir.resolve() == masks_dir.resolve()
    if same and not mask_suffix:
        raise DatalistError([f"{images_dir}: images and masks in the same folder need a mask suffix (e.g. _gt)"])

    ignored: list[str] = []
    images: dict[str, list[Path]] = defaultdict(list)
    masks: dict[str, list[Path]] = defaultdict(list)
    for p in _list_files(images_dir):
        stem, ext = split_name(p)
        if not ext:
            ignored.append(p.name)
        elif same and stem.endswith(mask_suffix):
            masks[stem[: -len(mask_suffix)]].append(p)
        else:
            images[stem].append(p)
    if not same:
        for p in _list_files(masks_dir):
            stem, ext = split_name(p)
            if not ext:
                ignored.append(p.name)
            elif mask_suffix and not stem.endswith(mask_suffix):
                chk.problems.append(
                    f"{p}: mask name does not end with the suffix {mask_suffix!r}; no image pairs with it"
                )
            else:
                masks[stem[: len(stem) - len(mask_suffix)]].append(p)
    if ignored:
        say(f"note: ignored {len(ignored)} file(s) with unsupported extensions, e.g. {ignored[:3]}")

    for kind, group in (("image", images), ("mask", masks)):
        for paths in group.values():
            if len(paths) > 1:
                chk.problems.append(f"{paths[0]}: ambiguous {kind} name, also {[p.name for p in paths[1:]]}")
    for stem in sorted(set(images) - set(masks), key=_natural_key):
        chk.problems.append(f"{images[stem][0]}: no mask named {stem}{mask_suffix}.<ext> in {masks_dir}")
    for stem in sorted(set(masks) - set(images), key=_natural_key):
        chk.problems.append(f"{masks[stem][0]}: mask without an image named {stem}.<ext> in {images_dir}")

    items: list[dict] = []
    thresholds: set[float] = set()
    for stem in sorted(set(images) & set(masks), key=_natural_key):
        ip, mp = images[stem][0], masks[stem][0]
        n_before = len(chk.problems)
        _, t = check_pair(ip, mp, chk, threshold, max_gray_fraction)
        if len(chk.problems) == n_before:
            thresholds.add(t)
            items.append({"image": ip, "label": mp})

    if chk.problems:
        raise DatalistError(chk.problems)
    if not items:
        raise DatalistError([f"{images_dir}: no image/mask pairs found"])
    for w in chk.warnings:
        say(f"warning: {w}")
    if any(split_name(it[k])[1].lower() in _NEEDS_PIL_READER for it in items for k in ("image", "label")):
        say("note: LoadImage(d) picks no reader for PGM/PPM/TIFF by itself: use LoadImaged(keys, reader='PILReader')")

    base = Path(out).resolve().parent if out is not None else None

    def rel(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), base)).as_posix() if base is not None else str(p.resolve())

    entries = [{"image": rel(it["image"]), "label": rel(it["label"])} for it in items]
    datalist: dict[str, Any] = {
        "description": description
        or f"{len(entries)} image/mask pairs from {images_dir} and {masks_dir} (monai_vlmfilm.data.datalist)",
        "mask_binarisation": (
            f"foreground = mask > {threshold:g} (given)"
            if threshold is not None
            else BINARISATION_RULE + f"; thresholds used here: {sorted(thresholds)}"
        ),
        "split": {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed},
    }
    datalist.update(split_items(entries, val_fraction, test_fraction, seed))
    if out is not None:
        write_datalist(datalist, out)
    return datalist


def read_datalist(
    datalist: str | os.PathLike,
    sections: Sequence[str] | None = None,
    path_keys: Sequence[str] = ("image", "label"),
    check_files: bool = False,
) -> dict[str, Any]:
    """A MONAI datalist JSON with the file paths of its items made absolute: the package's one datalist reader.

    Paths are relative to the datalist's folder unless absolute (the rule of ``monai.data.load_decathlon_datalist``).
    Every list-valued section is read, or only ``sections``; other top-level entries (``description``, ...) pass
    through, and items keep their extra keys (e.g. the synthetic generator's ``factors``).

    Args:
        datalist: the JSON file.
        sections: the list sections to read (each must be present); None reads every list section.
        path_keys: item keys holding a path or a list of paths.
        check_files: raise when a path under ``path_keys`` names no file.

    Raises:
        FileNotFoundError: the datalist does not exist.
        ValueError: not a JSON object, a requested section is not a list, an item is neither a dict nor a path, or
            (``check_files``) a file is missing; the message names the datalist and the item.
    """
    path = Path(datalist).expanduser()
    name = repr(str(path))
    if not path.is_file():
        raise FileNotFoundError(
            f"datalist {name} does not exist: generate one with `python -m monai_vlmfilm.data.synthetic --out DIR` "
            "or `python -m monai_vlmfilm.data.datalist`, then pass --datalist DIR/datalist.json"
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"datalist {name} is not readable JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"datalist {name} is not a JSON object with sections (it is a {type(doc).__name__})")
    absent = [sec for sec in sections or () if not isinstance(doc.get(sec), list)]
    if absent:
        raise ValueError(f"datalist {name} has no list {absent[0]!r} (it has: {sorted(doc)})")
    base = path.parent.absolute()

    def absolute(value: Any, where: str) -> Any:
        if isinstance(value, list):
            return [absolute(v, where) for v in value]
        if not isinstance(value, (str, os.PathLike)):
            return value
        f = os.path.normpath(base / value)
        if check_files and not os.path.isfile(f):
            raise ValueError(f"datalist {name}, {where} file {f!r} does not exist")
        return f

    out: dict[str, Any] = {}
    for sec, items in doc.items():
        if not isinstance(items, list):
            out[sec] = items
            continue
        if sections is not None and sec not in sections:
            continue
        fixed = []
        for i, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)):  # the Decathlon format lists test images as bare paths
                fixed.append(absolute(item, f"{sec}[{i}]"))
                continue
            if not isinstance(item, dict):
                raise ValueError(f"datalist {name}: item {i} of {sec!r} is neither an object nor a path ({item!r})")
            fixed.append({k: absolute(v, f"{sec}[{i}].{k}") if k in path_keys else v for k, v in item.items()})
        out[sec] = fixed
    return out


def load_split(datalist: str | os.PathLike, split: str, check_files: bool = True) -> list[dict]:
    """One split (``"training"``, ``"validation"``, ``"test"``) of a MONAI datalist JSON, paths made absolute.

    Paths in the file are relative to the datalist's folder. Entries may carry extra keys (e.g. ``factors``); they
    pass through. A bare path entry (the Decathlon format's test list) becomes ``{"image": path}``.

    Args:
        datalist: the datalist JSON.
        split: the section to read.
        check_files: raise when an image file is missing (off where a later check reports every problem at once).

    Raises:
        FileNotFoundError: the datalist does not exist.
        ValueError: the file is not a JSON datalist, the split is missing or empty, or an image file is missing.
    """
    items = [
        it if isinstance(it, dict) else {"image": it}
        for it in read_datalist(datalist, sections=[split], check_files=check_files)[split]
    ]
    if not items:
        raise ValueError(f"datalist {str(datalist)!r}: split {split!r} is empty")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m monai_vlmfilm.data.datalist``)."""
    p = argparse.ArgumentParser(
        prog="python -m monai_vlmfilm.data.datalist",
        description="Pair angiograms with vessel masks by name, validate every pair, write a MONAI datalist.",
    )
    p.add_argument("--images", required=True, help="folder with the images")
    p.add_argument("--masks", required=True, help="folder with the masks (may equal --images with a suffix)")
    p.add_argument("--mask-suffix", default="", help="mask name = image stem + suffix, e.g. _gt (default: none)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=None, help="foreground = mask > T (default: automatic rule)")
    p.add_argument("--out", required=True, help="datalist JSON to write (paths inside are relative to it)")
    args = p.parse_args(argv)
    try:
        dl = build_datalist(
            args.images, args.masks, args.out, args.mask_suffix, args.val_fraction, args.test_fraction, args.seed,
            args.threshold,
        )  # fmt: skip
    except DatalistError as e:
        print(f"error: {len(e.problems)} problem(s), no datalist written:", file=sys.stderr)
        for line in e.problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = {k: len(dl[k]) for k in ("training", "validation", "test")}
    print(
        f"{sum(n.values())} pairs: {n['training']} training / {n['validation']} validation / {n['test']} test; "
        f"{dl['mask_binarisation']}\nwrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
