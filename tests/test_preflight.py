"""Preflight of datalist entries: every broken file is named before a run starts; skip mode leaves them out."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from monai_vlmfilm.data.datalist import DatalistError
from monai_vlmfilm.data.preflight import check_entry, checked_split, preflight


def _png(path, arr):
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture
def entries(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 48))
    mask = (rng.random((40, 48)) > 0.9) * 255
    good = {"image": _png(tmp_path / "good.png", img), "label": _png(tmp_path / "good_mask.png", mask)}
    trunc = tmp_path / "truncated.png"
    trunc.write_bytes((tmp_path / "good.png").read_bytes()[:200])
    nan_img = np.full((40, 48), np.nan, np.float32)
    nib.save(nib.Nifti1Image(nan_img, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    bad = {
        "truncated": {"image": str(trunc), "label": good["label"]},
        "missing label": {"image": good["image"], "label": str(tmp_path / "no_mask.png")},
        "size": {"image": good["image"], "label": _png(tmp_path / "small_mask.png", mask[:30])},
        "nan": {"image": str(tmp_path / "nan.nii.gz"), "label": good["label"]},
        "gray label": {"image": good["image"], "label": _png(tmp_path / "gray_mask.png", img)},
        "empty file": {"image": str(tmp_path / "zero.png"), "label": good["label"]},
    }
    (tmp_path / "zero.png").write_bytes(b"")
    return good, bad


def test_each_problem_names_its_file(entries):
    good, bad = entries
    assert check_entry(good) == []
    expected = {
        "truncated": ("truncated.png", "unreadable"),
        "missing label": ("no_mask.png", "does not exist"),
        "size": ("small_mask.png", "differs"),
        "nan": ("nan.nii.gz", "NaN"),
        "gray label": ("gray_mask.png", "not binary"),
        "empty file": ("zero.png", "empty file"),
    }
    for what, entry in bad.items():
        problems = check_entry(entry)
        name, words = expected[what]
        assert len(problems) == 1 and name in problems[0] and words in problems[0], (what, problems)


def test_modes(entries, tmp_path):
    good, bad = entries
    items = [good, *bad.values(), good]
    with pytest.raises(DatalistError) as err:
        preflight(items, on_bad="error", name="dl [training]")
    assert len(err.value.problems) == 1 + len(bad)  # the header, then one line per bad file
    assert "6 of 8 entries" in err.value.problems[0]
    report = tmp_path / "report.json"
    kept = preflight(items, on_bad="skip", report=report)
    assert kept == [good, good]
    doc = json.loads(report.read_text())
    assert doc["checked"] == 8 and len(doc["bad"]) == 6
    assert preflight(items, on_bad="off") == items
    with pytest.raises(DatalistError, match="no usable entry"):
        preflight(list(bad.values()), on_bad="skip")
    with pytest.raises(ValueError, match="preflight must be"):
        preflight(items, on_bad="warn")


def test_checked_split_skips_missing_files(entries, tmp_path):
    good, bad = entries
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": [good, bad["missing label"]], "validation": [good]}))
    assert checked_split(dl, "training", on_bad="skip") == [good]
    with pytest.raises(DatalistError, match="no_mask.png"):
        checked_split(dl, "training")
    with pytest.raises(ValueError, match="does not exist"):  # off: load_split's own existence check still applies
        checked_split(dl, "training", on_bad="off")
