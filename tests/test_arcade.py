"""Tests for the ARCADE COCO -> vessel mask converter (monai_vlmfilm.data.arcade) on a COCO file written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_vlmfilm.data.arcade import ArcadeError, convert_arcade, main, rasterise_frame

# ARCADE syntax categories: ids 1..25, the SYNTAX segment names in the published order
SYNTAX_NAMES = [
    "1", "2", "3", "4", "5", "6", "7", "8", "9", "9a", "10", "10a", "11", "12", "12a", "13", "14", "14a", "15",
    "16", "16a", "16b", "16c", "12b", "14b",
]  # fmt: skip


def _rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _write_arcade(root: Path, with_stenosis: bool = False) -> tuple[Path, Path]:
    """ARCADE layout: <split>/images/*.png and <split>/annotations/<split>.json."""
    images = root / "train" / "images"
    ann_dir = root / "train" / "annotations"
    images.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    frames = [(1, "1.png"), (2, "2.png"), (3, "3.png")]
    for _, name in frames:
        Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)).save(images / name)
    cats = [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(SYNTAX_NAMES)]
    anns = [
        # frame 1: two overlapping segments (merged) and a triangle
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [_rect(10, 10, 30, 20)], "bbox": [10, 10, 20, 10], "area": 200.0},
        {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [_rect(25, 15, 40, 25)], "bbox": [25, 15, 15, 10], "area": 150.0},
        {"id": 3, "image_id": 1, "category_id": 10, "segmentation": [[50, 30, 60, 30, 55, 40]], "bbox": [50, 30, 10, 10], "area": 50.0},
        # frame 2: one segment given as two polygons, plus a degenerate polygon
        {"id": 4, "image_id": 2, "category_id": 13, "segmentation": [_rect(0, 0, 8, 4), _rect(20, 20, 24, 44), [1, 2, 3, 4]],
         "bbox": [0, 0, 24, 44], "area": 128.0},
        # frame 3: no annotations
    ]  # fmt: skip
    if with_stenosis:
        cats.append({"id": 26, "name": "stenosis", "supercategory": ""})
        anns.append(
            {
                "id": 5,
                "image_id": 3,
                "category_id": 26,
                "segmentation": [_rect(5, 5, 15, 15)],
                "bbox": [5, 5, 10, 10],
                "area": 100.0,
            }
        )
    coco = {
        "info": {"description": "ARCADE-like test file"},
        "images": [{"id": i, "file_name": n, "width": 64, "height": 48} for i, n in frames],
        "categories": cats,
        "annotations": anns,
    }
    path = ann_dir / "train.json"
    path.write_text(json.dumps(coco))
    return path, images


def _expected_frame1() -> np.ndarray:
    m = np.zeros((48, 64), bool)
    m[10:20, 10:30] = True  # COCO rectangle [x0, x1) x [y0, y1) in pixel-corner coordinates
    m[15:25, 25:40] = True
    return m


def test_rectangle_area_matches_coco():
    m = rasterise_frame([_rect(10, 10, 30, 20)], 48, 64)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 255}
    assert (m > 0).sum() == 200
    np.testing.assert_array_equal(m[10:20, 10:30], 255)


def test_convert_merges_segments_and_writes_datalist(tmp_path, capsys):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImage

    coco, images = _write_arcade(tmp_path / "arcade", with_stenosis=True)
    out = tmp_path / "converted"
    rc = main(["--coco", str(coco), "--images", str(images), "--out", str(out), "--val-fraction", "0.34"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "1 of 3 frame(s) have no vessel annotation" in err  # frame 3 (its stenosis box is not a vessel)
    assert "degenerate polygon" in err
    m1 = np.asarray(Image.open(out / "masks" / "1.png"))
    tri = m1[28:42, 48:62] > 0
    assert 40 <= tri.sum() <= 60  # triangle area 50
    m1_rect = m1.copy()
    m1_rect[28:42, 48:62] = 0
    np.testing.assert_array_equal(m1_rect > 0, _expected_frame1())
    m2 = np.asarray(Image.open(out / "masks" / "2.png"))
    assert (m2 > 0).sum() == 8 * 4 + 4 * 24
    assert not np.asarray(Image.open(out / "masks" / "3.png")).any()
    dl = json.loads((out / "datalist.json").read_text())
    assert len(dl["training"]) == 2 and len(dl["validation"]) == 1
    assert "stenosis" not in dl["categories"] and len(dl["categories"]) == 25
    assert dl["empty_masks"] == 1
    items = load_decathlon_datalist(str(out / "datalist.json"), data_list_key="training")
    items += load_decathlon_datalist(str(out / "datalist.json"), data_list_key="validation")
    for e in items:
        img, lab = LoadImage(image_only=True)(e["image"]), LoadImage(image_only=True)(e["label"])
        assert img.shape == lab.shape  # masks align with their frames under MONAI's loader
        assert Path(e["image"]).parent == images.resolve()


def test_fixed_split_and_category_selection(tmp_path):
    coco, images = _write_arcade(tmp_path / "arcade")
    p = convert_arcade(coco, images, tmp_path / "out", split="validation", include_categories=["1"], log=lambda m: None)
    dl = json.loads(p.read_text())
    assert len(dl["validation"]) == 3 and dl["training"] == [] and dl["categories"] == ["1"]
    m1 = np.asarray(Image.open(tmp_path / "out" / "masks" / "1.png")) > 0
    assert m1.sum() == 200  # only segment "1"


def test_missing_images_reported_and_nothing_written(tmp_path, capsys):
    coco, images = _write_arcade(tmp_path / "arcade")
    (images / "2.png").unlink()
    (images / "3.png").unlink()
    out = tmp_path / "out"
    assert main(["--coco", str(coco), "--images", str(images), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "2.png" in err and "3.png" in err and "missing" in err
    assert not out.exists()


def test_malformed_json_names_file(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [ {"id": 1,, } ]')
    with pytest.raises(ArcadeError, match=r"broken\.json: malformed JSON \(.* line 1 column"):
        convert_arcade(bad, tmp_path, tmp_path / "o")
    assert main(["--coco", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "broken.json" in capsys.readouterr().err
    nokeys = tmp_path / "nokeys.json"
    nokeys.write_text(json.dumps({"images": []}))
    with pytest.raises(ArcadeError, match=r"nokeys\.json: missing .*annotations"):
        convert_arcade(nokeys, tmp_path, tmp_path / "o")


def test_bad_annotations_all_reported(tmp_path):
    coco, images = _write_arcade(tmp_path / "arcade")
    data = json.loads(coco.read_text())
    data["annotations"].append({"id": 9, "image_id": 77, "category_id": 1, "segmentation": [_rect(0, 0, 2, 2)]})
    data["annotations"].append(
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": {"counts": "abc", "size": [48, 64]}}
    )
    data["images"][0]["width"] = 100  # size differs from the PNG
    coco.write_text(json.dumps(data))
    with pytest.raises(ArcadeError) as ei:
        convert_arcade(coco, images, tmp_path / "o", log=lambda m: None)
    msg = "\n".join(ei.value.problems)
    assert "unknown image_id 77" in msg and "RLE" in msg and "differs" in msg and "1.png" in msg
    assert len(ei.value.problems) == 3
