"""Preflight: check every datalist entry before a run starts, so a broken file stops it at once, not at epoch 30.

Each entry's image (and label, where there is one) is read in full with the reader training uses
(:func:`~monai_vlmfilm.data.datalist.read_array`), then checked: the file exists, is not empty and decodes; the image
is 2D (grey, or RGB / RGBA of one size) with finite values; image and label have the same spatial size; the label is
a binary mask (:func:`~monai_vlmfilm.data.datalist` rules). Every problem names its file, and all of them are reported
together. Used by the bundle configs (``preflight: error | skip | off``) and on its own::

    python -m monai_vlmfilm.data.preflight --datalist D --split training validation [--on-bad skip --report R.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .datalist import DatalistError, _Check, check_pair, load_split

__all__ = ["PREFLIGHT_MODES", "check_entry", "preflight", "checked_split"]

#: ``error``: stop with every problem listed; ``skip``: drop the bad entries and log them; ``off``: no check.
PREFLIGHT_MODES = ("error", "skip", "off")
logger = logging.getLogger(__name__)


def check_entry(entry: dict[str, Any], image_key: str = "image", label_key: str = "label") -> list[str]:
    """Problems of one datalist entry (``[]`` when it is fine), each starting with the file it concerns.

    The datalist builder's own pair check (:func:`~monai_vlmfilm.data.datalist.check_pair`), plus finite pixels.
    """
    img_path = entry.get(image_key)
    if not isinstance(img_path, (str, os.PathLike)):
        return [f"entry {entry!r}: no {image_key!r} path"]
    chk = _Check()
    check_pair(img_path, entry.get(label_key), chk, require_finite=True)
    return chk.problems


def preflight(
    items: Sequence[dict[str, Any]],
    on_bad: str = "error",
    name: str = "datalist",
    report: str | os.PathLike | None = None,
    num_threads: int = 4,
) -> list[dict[str, Any]]:
    """Check ``items`` and return the usable ones.

    Args:
        items: datalist entries with absolute paths (``load_split`` gives them).
        on_bad: ``"error"`` raises :class:`~monai_vlmfilm.data.datalist.DatalistError` listing every problem;
            ``"skip"`` drops the bad entries and logs a warning that names them; ``"off"`` returns ``items`` unchecked.
        name: what the items are, for messages (e.g. ``"datalist.json [training]"``).
        report: optional JSON file receiving ``{"checked", "bad": [{"entry", "problems"}], "seconds"}``.
        num_threads: parallel readers (image decoding releases the GIL).
    """
    if on_bad not in PREFLIGHT_MODES:
        raise ValueError(f"preflight must be one of {PREFLIGHT_MODES}, got {on_bad!r}.")
    if on_bad == "off":
        return list(items)
    t0 = time.perf_counter()
    # import the readers once here: several threads importing MONAI at the same time serialise on the import lock
    from monai.data import NibabelReader, PILReader  # noqa: F401
    from monai.transforms import LoadImage  # noqa: F401

    with ThreadPoolExecutor(max(1, num_threads)) as ex:
        found = list(ex.map(check_entry, items))
    bad = [(it, p) for it, p in zip(items, found) if p]
    seconds = time.perf_counter() - t0
    if report is not None:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(
            json.dumps(
                {"name": name, "checked": len(items), "bad": [{"entry": it, "problems": p} for it, p in bad],
                 "seconds": round(seconds, 3)},
                indent=1,
                default=str,
            )
        )  # fmt: skip
    if not bad:
        logger.info(f"preflight {name}: {len(items)} entries fine ({seconds:.1f} s)")
        return list(items)
    lines = [line for _, p in bad for line in p]
    if on_bad == "error":
        raise DatalistError(
            [f"preflight of {name}: {len(bad)} of {len(items)} entries are unusable (set preflight: skip to leave "
             "them out):"] + lines
        )  # fmt: skip
    logger.warning(f"preflight {name}: skipping {len(bad)} of {len(items)} entries:\n" + "\n".join(lines))
    good = [it for it, p in zip(items, found) if not p]
    if not good:
        raise DatalistError([f"preflight of {name}: no usable entry left"] + lines)
    return good


def checked_split(datalist: str | os.PathLike, split: str, on_bad: str = "error", report: Any = None) -> list[dict]:
    """One split of a datalist (paths made absolute, as ``load_split``) after :func:`preflight` (the bundle configs' call).

    A missing file is one of the problems preflight reports (and ``skip`` leaves out), not an error of its own.
    """
    items = load_split(datalist, split, check_files=on_bad == "off")  # without preflight, load_split's check guards
    return preflight(items, on_bad=on_bad, name=f"{datalist} [{split}]", report=report)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check every entry of datalist splits before a run.")
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--split", nargs="+", default=["training", "validation"])
    ap.add_argument("--on-bad", choices=["error", "skip"], default="error")
    ap.add_argument("--report", default=None, help="JSON report of the bad entries (one file per split: _<split>)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rc = 0
    for split in a.split:
        rep = None if a.report is None else Path(a.report).with_name(f"{Path(a.report).stem}_{split}.json")
        t0 = time.perf_counter()
        try:
            good = checked_split(a.datalist, split, on_bad=a.on_bad, report=rep)
            print(f"{split}: {len(good)} usable entries ({time.perf_counter() - t0:.2f} s)")
        except (DatalistError, ValueError, FileNotFoundError) as e:
            print(str(e), file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
