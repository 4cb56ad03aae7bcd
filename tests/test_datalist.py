"""Tests for the datalist builder (monai_vlmfilm.data.datalist) on folders the tests write, and on DCA1."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from shared_data import DCA1

from monai_vlmfilm.data.datalist import (
    DatalistError,
    build_datalist,
    image_list,
    load_split,
    main,
    mask_threshold,
    split_items,
    split_name,
)


def _img(seed: int, shape=(24, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _mask(seed: int, shape=(24, 32), hi: int = 255) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    r = np.random.default_rng(seed)
    y, x = int(r.integers(2, shape[0] - 8)), int(r.integers(2, shape[1] - 8))
    m[y : y + 5, x : x + 6] = hi
    return m


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith((".nii", ".nii.gz")):
        nib.save(nib.Nifti1Image(arr.T.copy(), np.eye(4)), str(path))  # (x, y) like MONAI's PNG layout
    else:
        Image.fromarray(arr).save(path)
    return path


def test_split_name_and_threshold_rule():
    assert split_name("a/b/case.nii.gz") == ("case", ".nii.gz")
    assert split_name("12_gt.PGM") == ("12_gt", ".PGM")
    assert split_name("notes.txt")[1] == ""
    assert mask_threshold(np.array([0, 1], np.uint8)) == 0.5
    assert mask_threshold(np.array([0, 255], np.uint8)) == 127
    assert mask_threshold(np.array([0.0, 0.7, 1.0], np.float32)) == 0.5
    assert mask_threshold(np.array([0, 1000], np.uint16)) == 500


def test_split_is_deterministic_and_complete():
    items = [{"image": f"{i}.png", "label": f"m{i}.png"} for i in range(20)]
    a, b = split_items(items, 0.25, 0.1, seed=3), split_items(items, 0.25, 0.1, seed=3)
    assert a == b
    assert [len(a[k]) for k in ("training", "validation", "test")] == [13, 5, 2]
    got = sorted(it["image"] for k in a if isinstance(a[k], list) for it in a[k])
    assert got == sorted(it["image"] for it in items)
    assert split_items(items, 0.25, 0.1, seed=4) != a
    with pytest.raises(ValueError):
        split_items(items, 0.6, 0.5)


def test_builds_valid_datalist_from_mixed_formats(tmp_path):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImage

    images, masks = tmp_path / "data" / "images", tmp_path / "data" / "masks"
    _save(images / "1.png", _img(1))
    _save(images / "2.pgm", _img(2))
    _save(images / "10.jpg", _img(10))
    _save(images / "3.nii.gz", _img(3))
    _save(masks / "1_gt.png", _mask(1))
    _save(masks / "2_gt.pgm", _mask(2))
    _save(masks / "10_gt.png", _mask(10, hi=1))  # {0, 1} mask
    _save(masks / "3_gt.nii.gz", _mask(3))
    (images / "README.txt").write_text("not an image")
    out = tmp_path / "lists" / "dl.json"
    rc = main(
        [
            "--images",
            str(images),
            "--masks",
            str(masks),
            "--mask-suffix",
            "_gt",
            "--val-fraction",
            "0.25",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    dl = json.loads(out.read_text())
    assert len(dl["training"]) == 3 and len(dl["validation"]) == 1 and dl["test"] == []
    assert "127" in dl["mask_binarisation"] and "0.5" in dl["mask_binarisation"]
    entries = dl["training"] + dl["validation"]
    assert all(e["image"].startswith("../data/images/") and e["label"].startswith("../data/masks/") for e in entries)
    # natural order within a list: 1, 2, 3, 10 (not 1, 10, 2, 3)
    stems = [split_name(e["image"])[0] for e in entries]
    for lst in (dl["training"], dl["validation"]):
        s = [int(split_name(e["image"])[0]) for e in lst]
        assert s == sorted(s)
    assert sorted(stems, key=int) == ["1", "2", "3", "10"]
    for e in load_decathlon_datalist(str(out), data_list_key="training"):
        assert Path(e["image"]).is_file() and Path(e["label"]).is_file()
        if e["image"].endswith(".png"):  # the pipeline's default loader reads what the builder accepted
            assert LoadImage(image_only=True)(e["image"]).shape == LoadImage(image_only=True)(e["label"]).shape


def test_same_folder_with_suffix_dca1_original_layout(tmp_path):
    d = tmp_path / "DB"
    for i in (1, 2, 3):
        _save(d / f"{i}.pgm", _img(i))
        _save(d / f"{i}_gt.pgm", _mask(i))
    dl = build_datalist(d, d, tmp_path / "dl.json", mask_suffix="_gt", val_fraction=0.0, log=lambda m: None)
    assert [(e["image"], e["label"]) for e in dl["training"]] == [(f"DB/{i}.pgm", f"DB/{i}_gt.pgm") for i in (1, 2, 3)]
    with pytest.raises(DatalistError, match="need a mask suffix"):
        build_datalist(d, d, tmp_path / "x.json")


def test_all_problems_reported_nonzero_exit(tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    _save(images / "good.png", _img(0))
    _save(masks / "good.png", _mask(0))
    _save(images / "lonely.png", _img(1))  # no mask
    _save(masks / "orphan.png", _mask(2))  # no image
    (images / "zero.png").write_bytes(b"")  # zero-byte image
    _save(masks / "zero.png", _mask(3))
    _save(images / "corrupt.png", _img(4))
    (masks / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # unreadable mask
    _save(images / "shape.png", _img(5))
    _save(masks / "shape.png", _mask(5, shape=(20, 32)))  # shape mismatch
    _save(images / "gray.png", _img(6))
    _save(masks / "gray.png", _img(7))  # a grayscale image used as a mask
    _save(images / "dup.png", _img(8))
    _save(images / "dup.jpg", _img(8))  # two images with one stem
    _save(masks / "dup.png", _mask(8))
    out = tmp_path / "dl.json"
    rc = main(["--images", str(images), "--masks", str(masks), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert not out.exists()
    for name, what in [
        ("lonely.png", "no mask"),
        ("orphan.png", "without an image"),
        ("zero.png", "empty file"),
        ("corrupt.png", "unreadable"),
        ("shape.png", "differs"),
        ("gray.png", "not binary"),
        ("dup.png", "ambiguous"),
    ]:
        line = [ln for ln in err.splitlines() if name in ln and what in ln]
        assert line, f"{name}: {what!r} not reported in:\n{err}"
    assert "good.png" not in err
    assert "7 problem(s)" in err


def test_soft_mask_warns_and_threshold_option(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    _save(images / "a.png", _img(0, (40, 40)))
    m = np.zeros((40, 40), np.uint8)
    m[10:30, 10:30] = 250
    m[10:30, 9] = 120  # a soft edge: few gray pixels
    _save(masks / "a.png", m)
    msgs: list[str] = []
    dl = build_datalist(images, masks, tmp_path / "dl.json", val_fraction=0.0, log=msgs.append)
    assert len(dl["training"]) == 1
    assert any("distinct values" in s and "a.png" in s for s in msgs)
    dl = build_datalist(images, masks, tmp_path / "dl.json", val_fraction=0.0, threshold=100, log=msgs.append)
    assert "> 100" in dl["mask_binarisation"]
    # an all-zero mask is accepted with a warning
    _save(masks / "a.png", np.zeros((40, 40), np.uint8))
    msgs.clear()
    build_datalist(images, masks, tmp_path / "dl.json", val_fraction=0.0, log=msgs.append)
    assert any("empty" in s for s in msgs)


def test_missing_folder_clear_error(tmp_path, capsys):
    assert main(["--images", str(tmp_path / "nope"), "--masks", str(tmp_path), "--out", str(tmp_path / "d.json")]) == 1
    assert "nope" in capsys.readouterr().err


@pytest.mark.dca1
def test_dca1_folders_reproduce_datalist(tmp_path):
    if not (DCA1 / "images").is_dir():
        pytest.skip(f"DCA1 subset not found at {DCA1} (only present on the project's CI machine)")
    from monai.data import load_decathlon_datalist

    out = tmp_path / "dca1.json"
    dl = build_datalist(DCA1 / "images", DCA1 / "masks", out, val_fraction=0.25, seed=0, log=lambda m: None)
    assert len(dl["training"]) == 60 and len(dl["validation"]) == 20
    ref = json.loads((DCA1 / "datalist.json").read_text())
    ref_pairs = {(e["image"], e["label"]) for k in ("training", "validation") for e in ref[k]}
    got = load_decathlon_datalist(str(out), data_list_key="training") + load_decathlon_datalist(
        str(out), data_list_key="validation"
    )
    got_pairs = {
        (str(Path(e["image"]).relative_to(DCA1.resolve())), str(Path(e["label"]).relative_to(DCA1.resolve())))
        for e in got
    }
    assert len(got_pairs) == 80 and got_pairs == ref_pairs
    assert "127" in dl["mask_binarisation"]


def _write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def test_load_split_and_image_list(tmp_path):
    img = (np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8)
    _write_png(tmp_path / "d/images/a.png", img)
    _write_png(tmp_path / "d/images/b.png", img)
    _write_png(tmp_path / "d/masks/a.png", (img > 128).astype(np.uint8) * 255)
    datalist = tmp_path / "d/datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "images/a.png", "label": "masks/a.png", "factors": {}}],
                                    "test": [{"image": "images/b.png"}], "validation": []}))  # fmt: skip
    items = load_split(datalist, "training")
    assert items[0]["image"] == str(tmp_path / "d/images/a.png") and items[0]["factors"] == {}
    with pytest.raises(ValueError, match="has no list 'nope'"):
        load_split(datalist, "nope")
    with pytest.raises(ValueError, match="split 'validation' is empty"):
        load_split(datalist, "validation")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_split(tmp_path / "missing.json", "training")
    bad = tmp_path / "d/bad.json"
    bad.write_text(json.dumps({"training": [{"image": "images/zzz.png", "label": "masks/a.png"}]}))
    with pytest.raises(ValueError, match="zzz.png"):
        load_split(bad, "training")
    # inference inputs: datalist split (labels dropped), folder, glob, single file, list
    assert image_list(datalist, "test") == [{"image": str(tmp_path / "d/images/b.png")}]
    assert [d["image"] for d in image_list(tmp_path / "d/images")] == [
        str(tmp_path / "d/images/a.png"),
        str(tmp_path / "d/images/b.png"),
    ]
    assert len(image_list(str(tmp_path / "d/images/*.png"))) == 2
    assert image_list(str(tmp_path / "d/images/a.png")) == [{"image": str(tmp_path / "d/images/a.png")}]
    with pytest.raises(ValueError, match="nor a glob matching images"):
        image_list(tmp_path / "d/nothing_*.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        image_list(tmp_path / "empty")
