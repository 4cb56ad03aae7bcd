"""Bad inputs through AttachVLMProfiled + LoadImaged and the bundle, and a cache
directory that cannot be written (read-only store, disk full).

Every bad input must end in a clear error naming the file and the problem, or in a flagged fallback profile
that the transform counts; never in a silent wrong profile, and never in a cache entry computed from bad pixels.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from monai_vlmfilm.profiles import (
    DEFAULT_PROFILE,
    PROFILE_DIM,
    HeuristicProfiler,
    ProfileStore,
    ProfileStoreError,
    canonical_image,
)
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
    # regression: 3 slices used to be read as an RGB picture and profiled as its luma
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
    # regression: gray + alpha used to be refused although the bundle trains on it
    Image.fromarray(np.dstack([g, alpha]), mode="LA").save(d / "la.png")
    cases["gray_alpha"] = (d / "la.png", g.astype(np.float32))
    # regression: CMYK used to be read as RGBA (C, M, Y as colours, K dropped as alpha)
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
    """Regression: a constant image used to get an unflagged heuristic profile whose fields
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
    """Regression: a label of another size used to be cropped with the image's random window
    (silently misaligned training pairs); now the bundle's preprocessing refuses it, naming the label file."""
    img, lab, wide = tmp_path / "img.png", tmp_path / "lab.png", tmp_path / "lab_wide.png"
    Image.fromarray(_vessels(160, 144)).save(img)
    Image.fromarray(((_vessels(160, 144) < 150) * 255).astype(np.uint8)).save(lab)
    Image.fromarray(((_vessels(160, 200) < 150) * 255).astype(np.uint8)).save(wide)
    p = _bundle_parser(tmp_path, use_vlm_film=use_vlm_film)
    for section in ("train#preprocessing", "validate#preprocessing"):
        t = p.get_parsed_content(section)
        out = t({"image": str(img), "label": str(lab)})
        if section.startswith("train"):  # RandCropByPosNegLabeld gives a list of crops (num_samples of them)
            assert isinstance(out, list) and len(out) == 1
            out = out[0]
        assert out["image"].shape[1:] == out["label"].shape[1:]
        with pytest.raises(Exception) as info:
            t({"image": str(img), "label": str(wide)})
        err = _root_cause(info.value)
        assert "lab_wide.png" in str(err) and "shape" in str(err), str(err)


def test_bundle_datalist_with_a_missing_file_names_it(tmp_path):
    """One real `python -m monai.bundle run` (about 10 s): the error names the missing image."""
    img, lab = tmp_path / "a.png", tmp_path / "a_mask.png"
    Image.fromarray(_vessels()).save(img)
    Image.fromarray(((_vessels() < 150) * 255).astype(np.uint8)).save(lab)
    missing = tmp_path / "no_such_image.png"
    datalist = tmp_path / "datalist.json"
    datalist.write_text(
        json.dumps(
            {
                "training": [{"image": str(img), "label": str(lab)}, {"image": str(missing), "label": str(lab)}],
                "validation": [{"image": str(img), "label": str(lab)}],
            }
        )
    )
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(tmp_path / "bundle"),
           "--config_file", str(REPO / "bundle" / "configs" / "train.yaml"), "--datalist", str(datalist),
           "--epochs", "1", "--profile_cache_dir", str(tmp_path / "cache")]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert f"{missing}: image file does not exist" in r.stderr, r.stderr[-3000:]  # preflight names it before training
    assert not (tmp_path / "bundle" / "models").exists() or not any((tmp_path / "bundle" / "models").iterdir())


# ------------------------------------------------------------------------------------------------ cache faults
def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture()
def half_cached(tmp_path) -> tuple[Path, list[str]]:
    """Three images, the first two precomputed into ``cache``."""
    paths = []
    for i in range(3):
        p = tmp_path / "imgs" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(_vessels(seed=i)).save(p)
        paths.append(str(p))
    precompute(paths[:2], ProfileStore(tmp_path / "cache"), HeuristicProfiler(), progress=False)
    return tmp_path / "cache", paths


def test_read_only_store_trains_from_the_entries_present(half_cached, caplog):
    from monai.data import DataLoader, Dataset

    cache, paths = half_cached
    before = _files(cache)
    ro = ProfileStore(cache, read_only=True)
    t = AttachVLMProfiled("image", ro, HeuristicProfiler(), on_missing="default")
    ds = Dataset([{"image": p} for p in paths], Compose([LoadImaged("image"), EnsureChannelFirstd("image"), t]))
    vecs = torch.cat([b["vlm_profile"] for b in DataLoader(ds, batch_size=3, num_workers=2)])
    assert vecs[:2, FALLBACK_INDEX].eq(0).all() and vecs[2, FALLBACK_INDEX] == 1  # hits, then a flagged default
    ref = HeuristicProfiler().profile([canonical_image(p) for p in paths[:2]])
    np.testing.assert_allclose(vecs[:2].numpy(), np.stack([r.to_vector() for r in ref]), atol=1e-6)
    # "compute" computes the miss, cannot store it: the profile is used, the failed write counted and reported
    c = AttachVLMProfiled("image", ro, HeuristicProfiler(), on_missing="compute")
    assert c({"image": paths[0]})["vlm_profile"][FALLBACK_INDEX] == 0
    with caplog.at_level(logging.WARNING):
        vec = c({"image": paths[2]})["vlm_profile"].numpy()
    np.testing.assert_allclose(vec, HeuristicProfiler().profile([canonical_image(paths[2])])[0].to_vector(), atol=1e-6)
    assert c.stats()["write_errors"] == 1 and c.stats()["computed"] == 1
    assert "2.png" in caplog.text and str(cache) in caplog.text and "read-only" in caplog.text
    with pytest.raises(ProfileStoreError, match=rf"{cache}.*read-only"):  # the store API itself refuses
        ro.get_or_compute([paths[2]], HeuristicProfiler())
    assert _files(cache) == before  # nothing written, no temporary file left
    assert ro.cleanup_tmp() == 0 and ro.save_path_memo() is None


def _unwritable_dir_child(cache: str, paths: list[str], q) -> None:
    try:
        if os.geteuid() == 0:  # root ignores permissions: drop to nobody so the kernel really says EACCES
            os.setgid(65534)
            os.setuid(65534)
        t = AttachVLMProfiled("image", cache, HeuristicProfiler(), on_missing="compute")  # a plain read-write store
        flags = [float(t({"image": p})["vlm_profile"][FALLBACK_INDEX]) for p in paths]
        try:
            ProfileStore(cache).get_or_compute([paths[2]], HeuristicProfiler())
            q.put(("no error", flags, t.stats(), ""))
        except ProfileStoreError as e:
            q.put(("ProfileStoreError", flags, t.stats(), f"{e} | errno={e.errno}"))
    except Exception as e:  # report to the parent instead of dying silently
        q.put(("unexpected", [], {}, repr(e)))


def test_unwritable_cache_directory_real_permissions():
    """A cache directory the process may read but not write (real EACCES, not a simulation): hits are served,
    a miss is computed and used but not stored; the store API fails with a clear error naming the directory;
    nothing is left behind."""
    import multiprocessing as mp
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="vlmfilm-ro-"))  # under /tmp, reachable by the unprivileged child
    try:
        os.chmod(top, 0o755)
        paths = []
        for i in range(3):
            p = top / f"{i}.png"
            Image.fromarray(_vessels(seed=i)).save(p)
            os.chmod(p, 0o644)
            paths.append(str(p))
        cache = top / "cache"
        precompute(paths[:2], ProfileStore(cache), HeuristicProfiler(), progress=False)
        before = _files(cache)
        for d in [cache, *cache.rglob("*")]:
            os.chmod(d, 0o555 if d.is_dir() else 0o444)
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        proc = ctx.Process(target=_unwritable_dir_child, args=(str(cache), paths, q))
        proc.start()
        status, flags, stats, msg = q.get(timeout=60)
        proc.join(10)
        assert status == "ProfileStoreError", (status, msg)
        assert flags == [0.0, 0.0, 0.0]  # two hits and one computed profile, none a fallback
        assert stats["hits"] == 2 and stats["computed"] == 1 and stats["write_errors"] == 1
        assert f"cannot write to profile cache directory {cache}" in msg and f"errno={errno.EACCES}" in msg
        assert _files(cache) == before
    finally:
        for d in [top, *top.rglob("*")]:
            os.chmod(d, 0o755)
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize(
    "call, err", [("replace", errno.ENOSPC), ("fsync", errno.EIO), ("replace", errno.EROFS)], ids=str
)
def test_disk_full_or_io_error_on_commit_leaves_no_partial_file(half_cached, monkeypatch, call, err):
    """rename() failing with ENOSPC / EROFS and fsync() with EIO cannot be produced on this machine's disk
    (a real EFBIG on write() is in test_profile_store), so those two calls are made to fail here."""
    cache, paths = half_cached
    # a corrupt entry for image 2: the failed recompute must neither remove it nor leave half a file
    store = ProfileStore(cache)
    key = store.key(paths[2], HeuristicProfiler().fingerprint)
    entry = store.entry_path(key)
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text('{"format": "monai_vlmfilm.profile", "trunc')
    before = {f: (cache / f).read_bytes() for f in _files(cache) if (cache / f).is_file()}

    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, call, fail)
    t = AttachVLMProfiled("image", ProfileStore(cache), HeuristicProfiler())
    assert t({"image": paths[0]})["vlm_profile"][FALLBACK_INDEX] == 0  # hits still work
    assert t({"image": paths[2]})["vlm_profile"][FALLBACK_INDEX] == 0  # computed and used, not stored
    assert t.stats()["write_errors"] == 1
    with pytest.raises(ProfileStoreError, match=rf"cannot write to profile cache directory {cache}") as info:
        precompute(paths, ProfileStore(cache), HeuristicProfiler(), progress=False)
    assert info.value.errno == err and os.strerror(err) in str(info.value)
    monkeypatch.undo()
    after = {f: (cache / f).read_bytes() for f in _files(cache) if (cache / f).is_file()}
    assert after == before  # no temp file, the old entry untouched
    # the disk recovers: a fresh transform computes and stores a valid entry
    t = AttachVLMProfiled("image", ProfileStore(cache), HeuristicProfiler())
    assert t({"image": paths[2]})["vlm_profile"][FALLBACK_INDEX] == 0 and t.stats()["write_errors"] == 0
    v = ProfileStore(cache).verify()
    assert v["valid"] == 3 and v["corrupt"] == [] and v["tmp"] == []


def _old_pixel_digest(arr: np.ndarray) -> str:
    """The digest as first written (whole-array copies), to prove the block-wise version hashes the same bytes."""
    import hashlib

    arr = arr + np.float32(0.0)
    out = []
    for a in (arr, arr.T):
        h = hashlib.sha256(b"vlmfilm-pixels/v1")
        h.update(f"|{a.shape[0]}x{a.shape[1]}|float32-le|".encode())
        h.update(np.ascontiguousarray(a, dtype="<f4").tobytes())
        out.append(h.hexdigest())
    return min(out)


def test_pixel_digest_of_a_large_image_needs_no_full_size_copies():
    """Regression: hashing an 8000 x 8000 image took ~1.1 GB on top of the image (four
    full-size float32 copies); now the digest is computed in row blocks with the same result."""
    import tracemalloc

    from monai_vlmfilm.profiles import pixel_digest

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 7), (7, 1), (5, 3), (300, 200), (3000, 1100)]:
        a = rng.normal(size=shape).astype(np.float32)
        a.flat[:: max(1, a.size // 5)] = -0.0  # negative zeros hash like zeros
        assert pixel_digest(a) == _old_pixel_digest(a) == pixel_digest(a.T), shape
    big = rng.integers(0, 256, (4096, 2048)).astype(np.float32)  # 32 MiB
    tracemalloc.start()
    try:
        pixel_digest(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.6 * big.nbytes, f"peak {peak / 2**20:.1f} MiB for a {big.nbytes / 2**20:.0f} MiB image"


@pytest.mark.parametrize("shape", [(60464, 40), (20000, 3), (2, 9000), (1, 4000)])
def test_extreme_aspect_ratio_images_are_profiled(tmp_path, shape):
    """Regression (a damaged TIFF header decoded as 60464 x 40): downsampling the long side to
    512 px used to shrink the short side to 0 px and crash the heuristic with a bare IndexError."""
    x = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    p = tmp_path / "strip.png"
    Image.fromarray(x).save(p)
    vec = AttachVLMProfiled("image", ProfileStore(tmp_path / "cache"), HeuristicProfiler())({"image": str(p)})
    v = vec["vlm_profile"].numpy()
    assert np.isfinite(v).all() and (v >= 0).all() and (v <= 1).all()
    assert ProfileStore(tmp_path / "cache").verify()["valid"] == 1


def test_values_beyond_float32_are_named_as_such(tmp_path):
    """Regression: finite float64 pixels of 1e39 overflow the canonical float32 and were
    reported as 'NaN or Inf pixels' (with a numpy overflow warning); the message now says what is wrong."""
    import warnings

    x = np.full((16, 16), 3.0)
    x[2, 2] = -1e39
    p = tmp_path / "wide.nii.gz"
    nib.save(nib.Nifti1Image(x, np.eye(4)), p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from the cast
        for img in (x, str(p)):
            with pytest.raises(ImageReadError, match=r"beyond the float32 range \(\|x\| up to 1e\+39\)"):
                canonical_image(img)
    with pytest.raises(ImageReadError, match="wide.nii.gz.*float32 range"):
        AttachVLMProfiled("image", ProfileStore(tmp_path / "cache"), HeuristicProfiler())({"image": str(p)})
    with pytest.raises(ImageReadError, match="NaN or Inf"):  # real non-finite pixels keep their message
        canonical_image(np.where(x < 0, np.inf, x))
