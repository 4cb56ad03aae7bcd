"""Fault campaign (issue 9): bad inputs through AttachVLMProfiled + LoadImaged and the bundle, and a cache
directory that cannot be written (read-only store, disk full).

Every bad input must end in a clear error naming the file and the problem, or in a flagged fallback profile
that the transform counts; never in a silent wrong profile, and never in a cache entry computed from bad pixels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from monai_vlmfilm.profiles import DEFAULT_PROFILE, PROFILE_DIM, HeuristicProfiler, ProfileStore, canonical_image
from monai_vlmfilm.profiles.base import ImageReadError
from monai_vlmfilm.profiles.cli import precompute
from monai_vlmfilm.profiles.schema import FALLBACK_INDEX
from monai_vlmfilm.transforms import AttachVLMProfiled

REPO = Path(__file__).resolve().parents[1]


def _vessels(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """A small angiogram-like uint8 image: dark lines on a bright, noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w), 190.0)
    for _ in range(3):
        a, b = rng.uniform(-1, 1), rng.uniform(0, h)
        img -= rng.uniform(40, 90) * np.exp(-((yy - a * xx - b) ** 2) / (1 + a * a) / rng.uniform(1, 6))
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _pipelines(cache: Path) -> dict[str, tuple[Compose, AttachVLMProfiled]]:
    """The transform before LoadImaged (a path) and after it (a MetaTensor naming its file)."""
    before = AttachVLMProfiled("image", ProfileStore(cache), HeuristicProfiler())
    after = AttachVLMProfiled("image", ProfileStore(cache), HeuristicProfiler())
    return {
        "before": (Compose([before, LoadImaged("image", image_only=True)]), before),
        "after": (Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), after]), after),
    }


def _root_cause(e: BaseException) -> BaseException:
    # MONAI's Compose wraps the failing transform's error in a RuntimeError
    while isinstance(e, RuntimeError) and "applying transform" in str(e) and e.__cause__ is not None:
        e = e.__cause__
    return e


@pytest.fixture()
def bad_files(tmp_path) -> dict[str, tuple[Path, str]]:
    """name -> (file, pattern the error must match); every pattern is checked together with the file name."""
    d = tmp_path / "bad"
    d.mkdir()
    good = d / "good.png"
    Image.fromarray(_vessels()).save(good)
    raw = good.read_bytes()
    files = {
        "zero_byte": ("zero.png", b"", "empty|cannot identify"),
        "garbage": ("garbage.png", bytes(range(256)) * 2, "cannot identify"),
        "truncated": ("trunc.png", raw[: len(raw) // 2], "truncated"),
    }
    out = {}
    for name, (fname, data, pat) in files.items():
        (d / fname).write_bytes(data)
        out[name] = (d / fname, pat)
    for name, bad in (("nan", np.nan), ("inf", np.inf), ("neg_inf", -np.inf)):
        x = _vessels().astype(np.float32)
        x[5, 7] = bad
        nib.save(nib.Nifti1Image(x.T, np.eye(4)), d / f"{name}.nii.gz")
        out[name] = (d / f"{name}.nii.gz", "NaN or Inf")
    nib.save(nib.Nifti1Image(np.zeros(64, np.float32), np.eye(4)), d / "oned.nii.gz")
    out["1d"] = (d / "oned.nii.gz", "2D")
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((16, 16, 3, 2)).astype(np.float32), np.eye(4)), d / "fourd.nii.gz")
    out["4d"] = (d / "fourd.nii.gz", "2D")
    nib.save(nib.Nifti1Image(rng.random((16, 16, 8)).astype(np.float32), np.eye(4)), d / "vol8.nii.gz")
    out["3d_volume"] = (d / "vol8.nii.gz", "2D")
    # regression (fault campaign): 3 slices used to be read as an RGB picture and profiled as its luma
    nib.save(nib.Nifti1Image(rng.random((16, 16, 3)).astype(np.float32), np.eye(4)), d / "vol3.nii.gz")
    out["3_slice_volume"] = (d / "vol3.nii.gz", "2D")
    return out


@pytest.mark.parametrize(
    "name",
    ["zero_byte", "garbage", "truncated", "nan", "inf", "neg_inf", "1d", "4d", "3d_volume", "3_slice_volume"],
)
def test_bad_files_give_a_clear_error_and_no_cache_entry(tmp_path, bad_files, name):
    path, pattern = bad_files[name]
    cache = tmp_path / "cache"
    for where, (pipe, _) in _pipelines(cache).items():
        with pytest.raises(Exception) as info:
            pipe({"image": str(path)})
        err = _root_cause(info.value)
        if where == "before" or name in ("nan", "inf", "neg_inf", "1d", "4d", "3d_volume", "3_slice_volume"):
            # our transform read the file (before LoadImaged, or LoadImaged accepted it): our message
            assert isinstance(err, ImageReadError), (where, repr(err))
            assert str(path) in str(err) and __import__("re").search(pattern, str(err)), (where, str(err))
        # else MONAI's LoadImaged refused the file first (its own message; see RELIABILITY.md)
    assert len(ProfileStore(cache)) == 0  # nothing was cached for a bad image
    # the precompute CLI's skip policy: listed with the reason, the others still profiled
    good = path.parent / "good.png"
    res = precompute([str(path), str(good)], ProfileStore(cache), HeuristicProfiler(), progress=False)
    assert res["new"] == 1 and [p for p, _ in res["unreadable"]] == [str(path)]
    assert len(ProfileStore(cache)) == 1


def test_non_finite_arrays_without_a_file_are_refused(tmp_path):
    cache = tmp_path / "cache"
    t = AttachVLMProfiled("image", ProfileStore(cache), HeuristicProfiler())
    for bad in (np.nan, np.inf):
        x = torch.from_numpy(_vessels().astype(np.float32))[None]
        x[0, 3, 3] = bad
        with pytest.raises(ImageReadError, match="NaN or Inf"):
            t({"image": MetaTensor(x)})
    assert len(ProfileStore(cache)) == 0 and t.stats()["computed"] == 0


def _channel_variants(d: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """name -> (file, the gray image its profile must be computed from)."""
    g = _vessels()
    rng = np.random.default_rng(1)
    alpha = rng.integers(0, 256, g.shape, dtype=np.uint8)
    rgb = np.stack([g, np.roll(g, 3, 0), np.roll(g, 5, 1)], -1)
    luma = rgb.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
    cases = {}
    Image.fromarray(np.dstack([g, g, g, alpha])).save(d / "rgba_gray.png")
    cases["rgba_equal_channels"] = (d / "rgba_gray.png", g.astype(np.float32))
    Image.fromarray(rgb).save(d / "rgb.png")
    cases["rgb_different_channels"] = (d / "rgb.png", luma)
    Image.fromarray(np.dstack([rgb, alpha])).save(d / "rgba.png")
    cases["rgba_different_channels"] = (d / "rgba.png", luma)
    # regression (fault campaign): gray + alpha used to be refused although the bundle trains on it
    Image.fromarray(np.dstack([g, alpha]), mode="LA").save(d / "la.png")
    cases["gray_alpha"] = (d / "la.png", g.astype(np.float32))
    # regression (fault campaign): CMYK used to be read as RGBA (C, M, Y as colours, K dropped as alpha)
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    cmyk_rgb = np.asarray(Image.open(d / "cmyk.jpg").convert("RGB"), np.float32)
    cases["cmyk"] = (d / "cmyk.jpg", cmyk_rgb @ np.asarray([0.299, 0.587, 0.114], np.float32))
    Image.fromarray(g.astype(np.uint16) * 257).save(d / "gray16.png")
    cases["gray_16bit"] = (d / "gray16.png", g.astype(np.float32) * 257)
    return cases


@pytest.mark.parametrize(
    "name",
    ["rgba_equal_channels", "rgb_different_channels", "rgba_different_channels", "gray_alpha", "cmyk", "gray_16bit"],
)
def test_channels_are_profiled_from_the_right_intensities(tmp_path, name):
    d = tmp_path / "ch"
    d.mkdir()
    path, gray = _channel_variants(d)[name]
    np.testing.assert_allclose(canonical_image(path), gray, rtol=1e-6, atol=1e-3)
    expected = HeuristicProfiler().profile([gray])[0].to_vector()
    for where, (pipe, _t) in _pipelines(tmp_path / f"cache_{name}").items():
        vec = pipe({"image": str(path)})["vlm_profile"]
        assert vec.shape == (PROFILE_DIM,), where
        np.testing.assert_allclose(vec.numpy(), expected, atol=1e-5, err_msg=where)
    # one entry, whichever side of LoadImaged the transform sat on
    assert len(ProfileStore(tmp_path / f"cache_{name}")) == 1


def test_too_large_image_names_the_file(tmp_path, monkeypatch):
    """PIL's decompression-bomb limit (179 Mpx by default) used to escape as a bare error without the file name."""
    p = tmp_path / "huge.png"
    Image.fromarray(_vessels(96, 96)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 96 x 96 > 2 x limit: the error PIL gives a bomb
    t = AttachVLMProfiled("image", ProfileStore(tmp_path / "cache"), HeuristicProfiler())
    with pytest.raises(ImageReadError, match=r"huge\.png.*too large.*MAX_IMAGE_PIXELS"):
        t({"image": str(p)})
    res = precompute([str(p)], ProfileStore(tmp_path / "cache"), HeuristicProfiler(), progress=False)
    assert [q for q, _ in res["unreadable"]] == [str(p)]  # listed by precompute, not a crash


@pytest.mark.parametrize("value", [0, 77, 255])
def test_constant_image_gives_a_flagged_profile_never_a_made_up_one(tmp_path, value, caplog):
    """Regression (fault campaign): a constant image used to get an unflagged heuristic profile whose fields
    were z-scores of all-zero features (difficulty 1.2, 'easy'); now a neutral fallback, flagged and counted."""
    p = tmp_path / f"const{value}.png"
    Image.fromarray(np.full((48, 64), value, np.uint8)).save(p)
    cache = tmp_path / "cache"
    for where, (pipe, t) in _pipelines(cache).items():
        with caplog.at_level(logging.WARNING):
            vec = pipe({"image": str(p)})["vlm_profile"].numpy()
        assert np.isfinite(vec).all() and vec[FALLBACK_INDEX] == 1.0, where
        np.testing.assert_allclose(
            vec[:FALLBACK_INDEX], DEFAULT_PROFILE.to_vector()[:FALLBACK_INDEX] * [1, 0, 1, 1, 1, 1]
        )
        if where == "before":  # computed here: counted and reported with the file name
            assert t.stats()["fallbacks"] == 1 and "constant image" in caplog.text and p.name in caplog.text
    (key, prof), *rest = ProfileStore(cache).items()
    assert not rest and prof.is_fallback and "constant image" in prof.reason and prof.confidence == 0.0
    # the precompute CLI counts it as a fallback
    res = precompute([str(p)], ProfileStore(tmp_path / "cache2"), HeuristicProfiler(), progress=False)
    assert res["fallback"] == 1 and res["unreadable"] == []


def _bundle_parser(tmp_path: Path, **overrides):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(str(REPO / "bundle" / "configs" / "train.yaml"))
    p["profile_cache_dir"] = str(tmp_path / "cache")
    for k, v in overrides.items():
        p[k] = v
    return p


@pytest.mark.parametrize("use_vlm_film", [True, False])
def test_bundle_label_shape_mismatch_names_the_file(tmp_path, use_vlm_film):
    """Regression (fault campaign): a label of another size used to be cropped with the image's random window
    (silently misaligned training pairs); now the bundle's preprocessing refuses it, naming the label file."""
    img, lab, wide = tmp_path / "img.png", tmp_path / "lab.png", tmp_path / "lab_wide.png"
    Image.fromarray(_vessels(160, 144)).save(img)
    Image.fromarray(((_vessels(160, 144) < 150) * 255).astype(np.uint8)).save(lab)
    Image.fromarray(((_vessels(160, 200) < 150) * 255).astype(np.uint8)).save(wide)
    p = _bundle_parser(tmp_path, use_vlm_film=use_vlm_film)
    for section in ("train#preprocessing", "validate#preprocessing"):
        t = p.get_parsed_content(section)
        out = t({"image": str(img), "label": str(lab)})
        assert out["image"].shape[1:] == out["label"].shape[1:]
        with pytest.raises(Exception) as info:
            t({"image": str(img), "label": str(wide)})
        err = _root_cause(info.value)
        assert "lab_wide.png" in str(err) and "shape" in str(err), str(err)
