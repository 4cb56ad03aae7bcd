"""Tests for the synthetic XCA generator (monai_vlmfilm.data.synthetic)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from monai_vlmfilm.data import synthetic as syn
from monai_vlmfilm.data.synthetic import (
    DIFFICULTY_WEIGHTS,
    FACTOR_NAMES,
    difficulty_from_factors,
    generate_dataset,
    generate_sample,
)


def _rng(i: int) -> np.random.Generator:
    return np.random.default_rng([1234, i])


def _ring_minus_vessel(img: np.ndarray, lbl: np.ndarray) -> float:
    """Local contrast: mean of a thin background ring around the vessels minus the mean inside them."""
    m = lbl > 0
    ring = ndi.binary_dilation(m, iterations=4) & ~ndi.binary_dilation(m, iterations=1)
    return float(img[ring].mean() - img[m].mean())


def test_sample_types_and_ranges():
    for i in range(6):
        img, lbl, f = generate_sample(_rng(i), 96)
        assert img.shape == lbl.shape == (96, 96)
        assert img.dtype == np.float32 and lbl.dtype == np.uint8
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert set(np.unique(lbl)) <= {0, 1}
        for name in FACTOR_NAMES:
            assert 0.0 <= f[name] <= 1.0, (name, f[name])
        assert f["catheter"] in (0.0, 1.0)
        assert 1.0 <= f["difficulty"] <= 5.0
        assert f["difficulty"] == pytest.approx(difficulty_from_factors(f))
        assert f["vessel_fraction"] == pytest.approx(lbl.mean(), abs=1e-5)
        assert 0.0 <= f["overlap_fraction"] <= 1.0 and 0.0 <= f["thin_length_fraction"] <= 1.0
        json.dumps(f)  # factors go into the datalist


def test_difficulty_formula_extremes_and_monotone():
    easy = {n: 0.0 for n in FACTOR_NAMES} | {"contrast": 1.0}
    hard = {n: 1.0 for n in FACTOR_NAMES} | {"contrast": 0.0}
    assert difficulty_from_factors(easy) == pytest.approx(1.0)
    assert difficulty_from_factors(hard) == pytest.approx(5.0)
    assert sum(DIFFICULTY_WEIGHTS.values()) == pytest.approx(1.0)
    mid = {n: 0.5 for n in FACTOR_NAMES}
    for name in FACTOR_NAMES:
        up = dict(mid, **{name: 0.9})
        # contrast makes images easier, everything else harder
        assert (difficulty_from_factors(up) < difficulty_from_factors(mid)) == (name == "contrast")


def test_sampled_difficulty_spreads():
    d = [generate_sample(_rng(100 + i), 32)[2]["difficulty"] for i in range(40)]
    assert max(d) - min(d) > 2.0, d


def test_determinism_and_seed_dependence():
    a = generate_sample(np.random.default_rng(7), 64)
    b = generate_sample(np.random.default_rng(7), 64)
    c = generate_sample(np.random.default_rng(8), 64)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert not np.array_equal(a[1], c[1])


def test_dataset_independent_of_counts(tmp_path):
    p1 = generate_dataset(tmp_path / "a", 2, 1, 1, size=48, seed=3)
    p2 = generate_dataset(tmp_path / "b", 4, 2, 0, size=48, seed=3)
    p3 = generate_dataset(tmp_path / "c", 2, 1, 1, size=48, seed=4)
    d1, d2, d3 = (json.loads(p.read_text()) for p in (p1, p2, p3))
    for split in ("training", "validation"):
        for it1, it2 in zip(d1[split], d2[split]):
            assert (p1.parent / it1["image"]).read_bytes() == (p2.parent / it2["image"]).read_bytes()
            assert (p1.parent / it1["label"]).read_bytes() == (p2.parent / it2["label"]).read_bytes()
            assert it1["factors"] == it2["factors"]
    # splits differ from each other, seeds differ from each other
    assert (p1.parent / d1["training"][0]["label"]).read_bytes() != (
        p1.parent / d1["validation"][0]["label"]
    ).read_bytes()
    assert (p1.parent / d1["training"][0]["label"]).read_bytes() != (
        p3.parent / d3["training"][0]["label"]
    ).read_bytes()
    assert len(d2["test"]) == 0


def test_overrides_validated():
    with pytest.raises(ValueError, match="unknown factor"):
        generate_sample(_rng(0), 64, sharpness=0.3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        generate_sample(_rng(0), 64, noise=1.5)
    _, _, f = generate_sample(_rng(0), 64, noise=0.25, catheter=1)
    assert f["noise"] == 0.25 and f["catheter"] == 1.0


def test_vessel_fraction_plausible():
    fr = np.array([generate_sample(_rng(200 + i), 256)[1].mean() for i in range(16)])
    assert fr.min() >= 0.02 and fr.max() <= 0.15, fr
    assert 0.03 <= fr.mean() <= 0.10, fr.mean()  # DCA1: 2.7-10.9 %, mean ~5.7 %


def test_vessels_darker_and_margin_grows_with_contrast():
    quiet = {"noise": 0.0, "blur": 0.0, "clutter": 0.2, "catheter": 0}
    for i in range(4):
        # same rng stream -> same geometry and background; only the contrast factor differs
        lo_img, lo_lbl, _ = generate_sample(_rng(300 + i), 128, contrast=0.05, **quiet)
        hi_img, hi_lbl, _ = generate_sample(_rng(300 + i), 128, contrast=0.95, **quiet)
        np.testing.assert_array_equal(lo_lbl, hi_lbl)
        m_lo, m_hi = _ring_minus_vessel(lo_img, lo_lbl), _ring_minus_vessel(hi_img, hi_lbl)
        assert m_lo > 0.02, m_lo  # vessels visibly darker than their surroundings even at low contrast
        assert m_hi > m_lo + 0.05, (m_lo, m_hi)


def test_label_edge_alignment():
    """Pixels just inside the label are darker than pixels just outside it (no offset between image and label)."""
    img, lbl, _ = generate_sample(_rng(5), 200, noise=0.0, blur=0.0, contrast=0.8, clutter=0.0, catheter=0)
    m = lbl > 0
    inner = m & ~ndi.binary_erosion(m)
    outer = ndi.binary_dilation(m) & ~m
    assert img[inner].mean() < img[outer].mean() - 0.03


def _noise_estimate(img: np.ndarray, lbl: np.ndarray) -> float:
    hp = img - ndi.gaussian_filter(img, 2.0)
    bg = ~ndi.binary_dilation(lbl > 0, iterations=3)
    return float(np.median(np.abs(hp[bg])))


def test_factors_change_image_statistics():
    base = {
        "contrast": 0.6,
        "noise": 0.3,
        "blur": 0.0,
        "clutter": 0.3,
        "catheter": 0,
        "overlaps": 0.3,
        "thin_fraction": 0.5,
    }
    noise_lo, noise_hi, edge_sharp, edge_blur, clut_lo, clut_hi = [], [], [], [], [], []
    for i in range(4):
        r = 400 + i
        a = generate_sample(_rng(r), 128, **(base | {"noise": 0.05}))
        b = generate_sample(_rng(r), 128, **(base | {"noise": 0.95}))
        noise_lo.append(_noise_estimate(a[0], a[1]))
        noise_hi.append(_noise_estimate(b[0], b[1]))
        s = generate_sample(_rng(r), 128, **(base | {"noise": 0.0}))
        bl = generate_sample(_rng(r), 128, **(base | {"noise": 0.0, "blur": 1.0}))
        for img, dst in ((s, edge_sharp), (bl, edge_blur)):
            m = img[1] > 0
            edge = ndi.binary_dilation(m) & ~ndi.binary_erosion(m)
            dst.append(float(np.hypot(*np.gradient(img[0]))[edge].mean()))
        c0 = generate_sample(_rng(r), 128, **(base | {"noise": 0.0, "clutter": 0.0}))
        c1 = generate_sample(_rng(r), 128, **(base | {"noise": 0.0, "clutter": 1.0}))
        for img, dst in ((c0, clut_lo), (c1, clut_hi)):
            bg = ~ndi.binary_dilation(img[1] > 0, iterations=3)
            dst.append(float(np.std(img[0][bg])))
    assert min(np.array(noise_hi) / np.array(noise_lo)) > 2.0, (noise_lo, noise_hi)
    assert all(b < s for s, b in zip(edge_sharp, edge_blur)), (edge_sharp, edge_blur)
    assert np.mean(clut_hi) > np.mean(clut_lo), (clut_lo, clut_hi)


def test_overlaps_thin_and_catheter_factors():
    ov0, ov1, th0, th1 = [], [], [], []
    for i in range(5):
        r = 500 + i
        ov0.append(generate_sample(_rng(r), 128, overlaps=0.0)[2]["overlap_fraction"])
        ov1.append(generate_sample(_rng(r), 128, overlaps=1.0)[2]["overlap_fraction"])
        th0.append(generate_sample(_rng(r), 128, thin_fraction=0.0)[2]["thin_length_fraction"])
        th1.append(generate_sample(_rng(r), 128, thin_fraction=1.0)[2]["thin_length_fraction"])
    assert np.mean(ov1) > np.mean(ov0) + 0.01, (ov0, ov1)
    assert np.mean(th1) > np.mean(th0) + 0.05, (th0, th1)
    # the catheter is dark but unlabelled; switching it on changes nothing else (own random stream)
    for i in range(3):
        kw = {"noise": 0.3, "clutter": 0.5, "contrast": 0.6}
        img0, lbl0, _ = generate_sample(_rng(700 + i), 160, catheter=0, **kw)
        img1, lbl1, _ = generate_sample(_rng(700 + i), 160, catheter=1, **kw)
        np.testing.assert_array_equal(lbl0, lbl1)
        darker = (img1 - img0) < -0.05
        assert darker.sum() > 30, darker.sum()
        assert (darker & (lbl1 > 0)).sum() <= 0.05 * darker.sum()
        far = ~ndi.binary_dilation(darker, iterations=8)  # beyond the PSF and motion-blur reach
        np.testing.assert_array_equal(img0[far], img1[far])


def test_thin_vessels_in_labels():
    """Skeleton-based width check: labels contain thin (<= 3 px) and thick (>= 6 px) vessels."""
    thin_frac, max_w = [], []
    for i in range(3):
        _, lbl, _ = generate_sample(_rng(600 + i), 300, thin_fraction=0.8)
        m = lbl > 0
        skel = skeletonize(m)
        width = 2.0 * ndi.distance_transform_edt(m)[skel] - 1.0
        thin_frac.append(float((width <= 3.0).mean()))
        max_w.append(float(width.max()))
    assert min(thin_frac) > 0.2, thin_frac
    assert min(max_w) >= 6.0, max_w


def test_files_load_with_monai_png_and_nifti(tmp_path):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImage

    p_png = generate_dataset(tmp_path / "png", 2, 1, 0, size=40, seed=1)
    p_nii = generate_dataset(tmp_path / "nii", 2, 1, 0, size=40, seed=1, nifti=True)
    load = LoadImage(image_only=True)
    items_png = load_decathlon_datalist(str(p_png), data_list_key="training")
    items_nii = load_decathlon_datalist(str(p_nii), data_list_key="training")
    for a, b in zip(items_png, items_nii):
        assert a["image"].endswith(".png") and b["image"].endswith(".nii.gz")
        img, lab = load(a["image"]), load(a["label"])
        assert tuple(img.shape) == (40, 40) and tuple(lab.shape) == (40, 40)
        assert set(np.unique(lab.numpy()).tolist()) <= {0.0, 255.0}
        assert float(lab.max()) == 255.0
        # NIfTI files hold the same arrays in the same orientation as the PNGs under LoadImage
        np.testing.assert_array_equal(img.numpy(), load(b["image"]).numpy())
        np.testing.assert_array_equal(lab.numpy(), load(b["label"]).numpy())
        assert set(a["factors"]) >= set(FACTOR_NAMES) | {"difficulty"}


def test_cli_writes_datalist_and_preview(tmp_path):
    out, prev = tmp_path / "data", tmp_path / "prev" / "grid.png"
    rc = syn.main(
        [
            "--out",
            str(out),
            "--n-train",
            "3",
            "--n-val",
            "2",
            "--n-test",
            "1",
            "--size",
            "48",
            "--seed",
            "2",
            "--preview",
            str(prev),
        ]
    )
    assert rc == 0
    dl = json.loads((out / "datalist.json").read_text())
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [3, 2, 1]
    assert "description" in dl and "difficulty_formula" in dl
    for s in ("training", "validation", "test"):
        for it in dl[s]:
            assert not it["image"].startswith("/")  # relative to the datalist
            assert (out / it["image"]).is_file() and (out / it["label"]).is_file()
            assert np.asarray(Image.open(out / it["image"])).dtype == np.uint8
    with Image.open(prev) as im:
        assert im.size[0] > 48 * 2 and im.size[1] >= 48
    assert syn.main(["--out", str(tmp_path / "bad"), "--n-train", "-1"]) == 2
