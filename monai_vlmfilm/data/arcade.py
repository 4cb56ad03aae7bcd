"""ARCADE (syntax task) COCO polygons -> one binary vessel mask per frame, plus a MONAI datalist.

ARCADE (Popov et al., 2024) ships each split as PNG frames plus a COCO JSON file: ``images`` (``id``,
``file_name``, ``width``, ``height``), ``categories`` (ids 1..25: the SYNTAX coronary segments "1", "2", ...,
"16c"; the stenosis task uses a "stenosis" category instead) and ``annotations`` (``image_id``, ``category_id``,
``segmentation`` as polygon lists ``[[x1, y1, x2, y2, ...], ...]``, ``bbox``, ``area``).

All vessel segments of a frame are merged into one mask (255 = vessel, 0 = background), written as
``OUT/masks/<frame stem>.png``; the datalist ``OUT/datalist.json`` points at the original frames (paths relative
to it).  Polygons are rasterised with ``skimage.draw.polygon`` at pixel centres, with vertices shifted by
-0.5 px because COCO puts pixel (0, 0)'s corner, not its centre, at (0, 0): a polygon's pixel count then
matches its COCO ``area``.  Categories named "stenosis" are not vessels and are skipped unless asked for.

Frames without annotations get an empty mask (counted and reported as a warning).  Malformed JSON, missing
keys, unsupported RLE segmentations, unknown image ids, missing frames or frames whose size differs from the
JSON are errors that name the file; all of them are collected before anything is written.

CLI::

    python -m monai_vlmfilm.data.arcade --coco arcade/syntax/train/annotations/train.json \\
        --images arcade/syntax/train/images --out data/arcade_train [--val-fraction 0.2 --test-fraction 0 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from monai_vlmfilm.data.datalist import DatalistError, split_items, write_datalist

__all__ = ["ArcadeError", "load_coco", "rasterise_frame", "convert_arcade", "main"]

NON_VESSEL_CATEGORIES = ("stenosis",)


class ArcadeError(DatalistError):
    """Raised with every problem found in an ARCADE COCO file or its frames."""


def load_coco(path: str | Path) -> dict:
    """Read and structurally check a COCO JSON file.

    Raises:
        ArcadeError: naming the file, for unreadable / malformed JSON or missing top-level keys.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ArcadeError([f"{path}: cannot read COCO file ({e.strerror or e})"]) from e
    try:
        coco = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArcadeError([f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})"]) from e
    if not isinstance(coco, dict):
        raise ArcadeError([f"{path}: expected a COCO object at the top level, got {type(coco).__name__}"])
    missing = [k for k in ("images", "annotations") if not isinstance(coco.get(k), list)]
    if missing:
        raise ArcadeError([f"{path}: missing or non-list COCO key(s) {missing}"])
    return coco


def rasterise_frame(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Merge polygons (each a flat ``[x1, y1, x2, y2, ...]`` list in COCO pixel coordinates) into a uint8 0/255 mask."""
    from skimage.draw import polygon

    mask = np.zeros((height, width), np.uint8)
    for poly in polygons:
        xy = np.asarray(poly, np.float64).reshape(-1, 2) - 0.5  # COCO corner -> pixel-centre coordinates
        rr, cc = polygon(xy[:, 1], xy[:, 0], shape=(height, width))
        mask[rr, cc] = 255
    return mask


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:  # header only, no decode
        return im.size  # (width, height)


def convert_arcade(
    coco: str | Path,
    images: str | Path,
    out: str | Path,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    split: str | None = None,
    include_categories: Sequence[str] | None = None,
    log: Any = None,
) -> Path:
    """Convert one ARCADE syntax split (COCO JSON + frames) into vessel masks and a MONAI datalist.

    Args:
        coco: COCO annotation JSON.
        images: folder with the frames named by the JSON's ``file_name``.
        out: output folder (``masks/`` and ``datalist.json``).
        val_fraction: fraction of frames for ``validation`` (with ``split=None``).
        test_fraction: fraction of frames for ``test`` (with ``split=None``).
        seed: split seed.
        split: put every frame into this list (``training``, ``validation`` or ``test``), e.g. to keep
            ARCADE's own train/val/test division; None: random split by the fractions.
        include_categories: category names to merge (default: every category except "stenosis").
        log: callable for warnings (default: print to stderr).

    Returns:
        path of the datalist JSON.

    Raises:
        ArcadeError: listing every problem, after checking the whole file and all frames.
    """
    say = log or (lambda m: print(m, file=sys.stderr))
    if split is not None and split not in ("training", "validation", "test"):
        raise ValueError(f"split must be training, validation or test, got {split!r}")
    coco_path, images_dir, out = Path(coco), Path(images), Path(out)
    data = load_coco(coco_path)
    problems: list[str] = []
    if not images_dir.is_dir():
        raise ArcadeError([f"{images_dir}: images folder does not exist"])

    cats = {}
    for c in data.get("categories", []) or []:
        if isinstance(c, dict) and "id" in c:
            cats[c["id"]] = str(c.get("name", c["id"]))
    if include_categories is None:
        keep = {cid for cid, name in cats.items() if name.lower() not in NON_VESSEL_CATEGORIES}
    else:
        wanted = {str(n) for n in include_categories}
        keep = {cid for cid, name in cats.items() if name in wanted}
        if not keep:
            problems.append(f"{coco_path}: none of the categories {sorted(wanted)} is in the file")

    frames: dict[Any, dict] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or any(k not in im for k in ("id", "file_name", "width", "height")):
            problems.append(f"{coco_path}: images[{i}] lacks one of id, file_name, width, height")
            continue
        if im["id"] in frames:
            problems.append(f"{coco_path}: images[{i}] repeats image id {im['id']}")
            continue
        frames[im["id"]] = im

    polys: dict[Any, list[list[float]]] = defaultdict(list)
    skipped_polys = 0
    for i, ann in enumerate(data["annotations"]):
        where = f"{coco_path}: annotations[{i}] (id {ann.get('id', '?') if isinstance(ann, dict) else '?'})"
        if not isinstance(ann, dict) or "image_id" not in ann or "segmentation" not in ann:
            problems.append(f"{where} lacks image_id or segmentation")
            continue
        if ann["image_id"] not in frames:
            problems.append(f"{where} refers to unknown image_id {ann['image_id']}")
            continue
        if cats and ann.get("category_id") not in cats:
            problems.append(f"{where} has unknown category_id {ann.get('category_id')}")
            continue
        if cats and ann.get("category_id") not in keep:
            continue
        seg = ann["segmentation"]
        if isinstance(seg, dict):
            problems.append(f"{where}: RLE segmentation is not supported (ARCADE uses polygons)")
            continue
        if not isinstance(seg, list):
            problems.append(f"{where}: segmentation must be a list of polygons")
            continue
        for poly in seg:
            try:
                arr = [float(v) for v in poly]
            except (TypeError, ValueError):
                problems.append(f"{where}: polygon with non-numeric coordinates")
                continue
            if len(arr) < 6 or len(arr) % 2:
                skipped_polys += 1  # fewer than 3 points or an odd count: not a polygon
                continue
            polys[ann["image_id"]].append(arr)

    # frames: existence and size, all checked before anything is written
    paths: dict[Any, Path] = {}
    for fid, im in frames.items():
        p = images_dir / im["file_name"]
        if not p.is_file():
            alt = images_dir / Path(im["file_name"]).name
            p = alt if alt.is_file() else p
        if not p.is_file():
            problems.append(f"{p}: image file listed in {coco_path.name} (id {fid}) is missing")
            continue
        try:
            w, h = _image_size(p)
        except Exception as e:  # unreadable frame
            problems.append(f"{p}: unreadable image ({type(e).__name__}: {e})")
            continue
        if (w, h) != (int(im["width"]), int(im["height"])):
            problems.append(f"{p}: size {w}x{h} differs from {coco_path.name}'s {im['width']}x{im['height']}")
            continue
        paths[fid] = p
    if problems:
        raise ArcadeError(problems)
    if not frames:
        raise ArcadeError([f"{coco_path}: no images listed"])

    (out / "masks").mkdir(parents=True, exist_ok=True)
    base = out.resolve()
    entries, empty = [], 0
    stems: set[str] = set()
    for fid in sorted(frames, key=lambda f: str(frames[f]["file_name"])):
        im, p = frames[fid], paths[fid]
        stem = Path(im["file_name"]).name.rsplit(".", 1)[0]
        if stem in stems:  # same base name in two sub-folders: keep masks apart
            stem = f"{stem}_id{fid}"
        stems.add(stem)
        mask = rasterise_frame(polys.get(fid, []), int(im["height"]), int(im["width"]))
        if not mask.any():
            empty += 1
        mpath = out / "masks" / f"{stem}.png"
        Image.fromarray(mask).save(mpath)
        entries.append(
            {
                "image": Path(os.path.relpath(p.resolve(), base)).as_posix(),
                "label": f"masks/{stem}.png",
            }
        )
    if empty:
        say(f"warning: {empty} of {len(entries)} frame(s) have no vessel annotation: empty masks written")
    if skipped_polys:
        say(f"warning: skipped {skipped_polys} degenerate polygon(s) (fewer than 3 points or odd coordinate count)")
    datalist: dict[str, Any] = {
        "description": f"ARCADE syntax vessel masks from {coco_path.name} ({len(entries)} frames; 255 = vessel, "
        "all segments merged; monai_vlmfilm.data.arcade)",
        "mask_binarisation": "foreground = mask > 127 (masks are 0/255)",
        "categories": sorted(cats[c] for c in keep) if cats else "all",
        "empty_masks": empty,
    }
    if split is None:
        datalist.update(split_items(entries, val_fraction, test_fraction, seed))
    else:
        datalist.update({"training": [], "validation": [], "test": []})
        datalist[split] = entries
    return write_datalist(datalist, out / "datalist.json")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m monai_vlmfilm.data.arcade``)."""
    ap = argparse.ArgumentParser(
        prog="python -m monai_vlmfilm.data.arcade",
        description="ARCADE syntax COCO polygons -> binary vessel masks (all segments merged) + MONAI datalist.",
    )
    ap.add_argument("--coco", required=True, help="COCO annotation JSON of one ARCADE split")
    ap.add_argument("--images", required=True, help="folder with that split's frames")
    ap.add_argument("--out", required=True, help="output folder (masks/ and datalist.json)")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--test-fraction", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--split", choices=("training", "validation", "test"), default=None,
        help="put every frame into this list instead of splitting randomly (keeps ARCADE's own split)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    try:
        path = convert_arcade(
            args.coco, args.images, args.out, args.val_fraction, args.test_fraction, args.seed, args.split
        )
    except DatalistError as e:
        print(f"error: {len(e.problems)} problem(s), nothing written:", file=sys.stderr)
        for line in e.problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dl = json.loads(path.read_text())
    n = {k: len(dl[k]) for k in ("training", "validation", "test")}
    print(f"{sum(n.values())} frames: {n['training']} training / {n['validation']} validation / {n['test']} test")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
