"""ProfileStore: one key per image whatever route it takes, crash-safe entries, concurrency, safety."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst, EnsureChannelFirstd, LoadImage, LoadImaged
from PIL import Image

from monai_vlmfilm.profiles import (
    HeuristicProfiler,
    Profiler,
    ProfileStore,
    ProfileStoreError,
    VLMProfile,
    canonical_image,
    pixel_digest,
)

FP = "test-fingerprint/v1"


class CountingProfiler(Profiler):
    """A real (cheap) profiler that records how many images it saw; value depends on the pixels."""

    name = "counting"

    def __init__(self, tag: str = "a") -> None:
        self.tag = tag
        self.seen = 0

    def fingerprint_fields(self):
        return {**super().fingerprint_fields(), "tag": self.tag}

    def profile(self, images):
        self.seen += len(images)
        return [VLMProfile(1 + 4 * float(x.mean()) / 255.0, 0.5, source=self.name) for x in images]


def _img(h=40, w=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w), dtype=np.uint8)


@pytest.fixture()
def png(tmp_path) -> Path:
    p = tmp_path / "img.png"
    Image.fromarray(_img()).save(p)
    return p


def test_every_route_gives_the_same_key(tmp_path, png):
    store = ProfileStore(tmp_path / "cache")
    pil = np.asarray(Image.open(png))  # (H, W) uint8, display orientation
    assert pil.shape == (40, 64)
    loaded = LoadImage(image_only=True)(str(png))  # MONAI PIL reader: (W, H) MetaTensor
    assert tuple(loaded.shape) == (64, 40)
    ecf = EnsureChannelFirst()(loaded)  # (1, W, H)
    d = EnsureChannelFirstd("image")(LoadImaged("image")({"image": str(png)}))
    bare = MetaTensor(loaded.as_tensor().clone())  # no filename_or_obj
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.stack([pil] * 3, -1)).save(rgb)
    nii = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(pil.T.astype(np.float32), np.eye(4)), nii)
    routes = {
        "path str": str(png),
        "path Path": png,
        "LoadImage MetaTensor (W,H)": loaded,
        "LoadImage numpy (W,H)": loaded.numpy(),
        "EnsureChannelFirst (1,W,H)": ecf,
        "LoadImaged+EnsureChannelFirstd": d["image"],
        "MetaTensor without meta": bare,
        "PIL uint8 (H,W)": pil,
        "PIL float32 (H,W)": pil.astype(np.float32),
        "float64 (H,W)": pil.astype(np.float64),
        "torch (H,W)": torch.from_numpy(pil.copy()),
        "(H,W,1)": pil[..., None],
        "(1,H,W)": pil[None],
        "RGB equal channels (H,W,3)": np.stack([pil] * 3, -1),
        "RGB png path": rgb,
        "RGB png via LoadImage": EnsureChannelFirst()(LoadImage(image_only=True)(str(rgb))),
        "NIfTI path": nii,
        "NIfTI via LoadImage": LoadImage(image_only=True)(str(nii)),
    }
    keys = {name: store.key(x, FP) for name, x in routes.items()}
    assert len(set(keys.values())) == 1, keys
    # ...and a real pixel change or another fingerprint changes it
    changed = pil.copy()
    changed[0, 0] ^= 1
    assert store.key(changed, FP) != keys["path str"]
    assert store.key(pil, FP + "x") != keys["path str"]
    assert store.key(pil[:, :-1], FP) != keys["path str"]


def test_canonical_image_is_display_orientation_and_rejects_bad_input(tmp_path, png):
    arr = canonical_image(png)
    assert arr.dtype == np.float32 and arr.shape == (40, 64)
    np.testing.assert_array_equal(arr, _img().astype(np.float32))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png.*empty"):
        canonical_image(empty)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(png.read_bytes()[:60])
    with pytest.raises(ValueError, match="trunc.png"):
        canonical_image(trunc)
    with pytest.raises(ValueError, match="NaN or Inf"):
        canonical_image(np.full((8, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="2D"):
        canonical_image(np.zeros((5, 8, 8), np.float32))
    with pytest.raises(ValueError, match="does not exist"):
        canonical_image(tmp_path / "missing.png")


def test_get_put_fingerprint_and_shared_pixels(tmp_path, png):
    store = ProfileStore(tmp_path / "cache")
    prof = CountingProfiler("a")
    copy = tmp_path / "sub" / "copy.png"
    copy.parent.mkdir()
    shutil.copy(png, copy)
    out = store.get_or_compute([png, copy, _img()], prof)
    assert prof.seen == 1 and len(store) == 1  # same pixels under two paths and as an array: one entry
    assert out[0] == out[1] == out[2] and out[0].source == "counting"
    # another fingerprint never reads the old entry
    other = CountingProfiler("b")
    store.get_or_compute([png], other)
    assert other.seen == 1 and len(store) == 2
    assert store.get(png, prof.fingerprint) == out[0]
    assert store.get(_img(seed=1), prof.fingerprint) is None
    assert sorted(store.fingerprints().values()) == [1, 1]
    entry = store.entry_path(store.key(png, prof.fingerprint))
    assert entry.parent.parent == store.root and entry.name.endswith(".json")
    doc = json.loads(entry.read_text())
    assert doc["fingerprint"] == prof.fingerprint and doc["profile"]["source"] == "counting"


def test_memo_avoids_rehashing(tmp_path, png):
    store = ProfileStore(tmp_path / "cache")
    k1 = store.key(png, FP)
    hashed = store.stats.hashed
    for _ in range(5):
        assert store.key(png, FP) == k1
    assert store.stats.hashed == hashed and store.stats.memo_hits == 5
    # a rewrite with other pixels (new mtime / size) is re-hashed, never served from the memo
    Image.fromarray(_img(seed=3)).save(png)
    os.utime(png, ns=(1, 1))
    assert store.key(png, FP) != k1 and store.stats.hashed == hashed + 1
    # persisted memo: a fresh store (another process) skips hashing too
    store.save_path_memo()
    fresh = ProfileStore(tmp_path / "cache")
    assert fresh.key(png, FP) == store.key(png, FP) and fresh.stats.hashed == 0


@pytest.mark.parametrize(
    "damage",
    ["truncate", "garbage", "wrong_key", "bad_checksum", "nan", "out_of_range", "not_object", "empty", "huge"],
)
def test_corrupt_entries_are_misses_and_get_recomputed(tmp_path, png, damage, caplog):
    store = ProfileStore(tmp_path / "cache")
    prof = CountingProfiler()
    good = store.get_or_compute([png], prof)[0]
    key = store.key(png, prof.fingerprint)
    path = store.entry_path(key)
    raw = path.read_text()
    doc = json.loads(raw)
    if damage == "truncate":
        path.write_text(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(200))
    elif damage == "wrong_key":
        other = store.put(_img(seed=5), good, prof.fingerprint)
        shutil.copy(store.entry_path(other), path)
    elif damage == "bad_checksum":
        doc["profile"]["difficulty"] = 1.0 if doc["profile"]["difficulty"] != 1.0 else 2.0
        path.write_text(json.dumps(doc))
    elif damage == "nan":
        path.write_text(raw.replace(json.dumps(doc["profile"]["confidence"]), "NaN", 1))
    elif damage == "out_of_range":
        doc["profile"]["confidence"] = 7.0
        doc["checksum"] = __import__("monai_vlmfilm.profiles.store", fromlist=["x"]).entry_checksum(
            key, doc["fingerprint"], doc["profile"]
        )
        path.write_text(json.dumps(doc))
    elif damage == "not_object":
        path.write_text("[1, 2, 3]")
    elif damage == "empty":
        path.write_text("")
    elif damage == "huge":
        path.write_text(" " * (2 << 20))
    fresh = ProfileStore(tmp_path / "cache")  # no in-memory hits
    with caplog.at_level("WARNING"):
        assert fresh.get(png, prof.fingerprint) is None
    assert fresh.stats.corrupt == 1 and fresh.stats.misses == 1
    assert "corrupt profile cache entry" in caplog.text and key in caplog.text
    again = fresh.get_or_compute([png], prof)[0]  # recomputed and overwritten
    assert again == good and prof.seen == 2
    assert ProfileStore(tmp_path / "cache").get(png, prof.fingerprint) == good
    assert fresh.verify()["corrupt"] == [] and fresh.verify()["tmp"] == []


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "ab/../../x", "A" * 64, "g" * 64, "", "0" * 63, 5])
def test_keys_cannot_escape_the_cache(tmp_path, bad):
    store = ProfileStore(tmp_path / "cache")
    with pytest.raises(ValueError, match="invalid profile cache key"):
        store.entry_path(bad)
    with pytest.raises(ValueError, match="invalid profile cache key"):
        store.get_by_key(bad)
    with pytest.raises(ValueError, match="invalid profile cache key"):
        store.put_by_key(bad, VLMProfile(), FP)
    assert not (tmp_path / "cache").exists()


def test_read_only_store_serves_hits_and_refuses_writes(tmp_path, png):
    store = ProfileStore(tmp_path / "cache")
    prof = CountingProfiler()
    good = store.get_or_compute([png], prof)[0]
    ro = ProfileStore(tmp_path / "cache", read_only=True)
    assert ro.get(png, prof.fingerprint) == good
    with pytest.raises(ProfileStoreError, match=str(tmp_path / "cache")):
        ro.get_or_compute([_img(seed=9)], prof)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path, png):
    store = ProfileStore(tmp_path / "cache")
    store.get_or_compute([png], CountingProfiler())
    os.chmod(store.root, 0o555)
    for shard in store.root.iterdir():
        os.chmod(shard, 0o555)
    try:
        with pytest.raises(ProfileStoreError, match="cache"):
            ProfileStore(tmp_path / "cache").put(_img(seed=2), VLMProfile(), FP)
    finally:
        for p in [store.root, *store.root.iterdir()]:
            os.chmod(p, 0o755)


def _write_with_fsize_limit(cache: str, q) -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG like a full disk, not a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
    try:
        ProfileStore(cache).put(_img(seed=7), VLMProfile(), FP)
        q.put("no error")
    except ProfileStoreError as e:
        q.put(str(e))


def test_disk_full_gives_clear_error_and_no_partial_file(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_write_with_fsize_limit, args=(str(tmp_path / "cache"), q))
    p.start()
    p.join(30)
    msg = q.get(timeout=5)
    assert "cannot write to profile cache directory" in msg and str(tmp_path / "cache") in msg
    assert list((tmp_path / "cache").rglob("*.json")) == []  # neither entry nor temp file
    assert list((tmp_path / "cache").rglob(".tmp-*")) == []


def test_blocked_directory_gives_clear_error(tmp_path):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with pytest.raises(ProfileStoreError, match="cannot write to profile cache directory"):
        ProfileStore(tmp_path / "cache").put(_img(), VLMProfile(), FP)


def _writer(cache: str, rank: int, n: int, q) -> None:
    try:
        store = ProfileStore(cache, fsync=False)
        prof = CountingProfiler()
        for i in range(n):
            # every process writes the shared images and its own ones, interleaved
            store.get_or_compute([_img(16, 24, seed=i), _img(16, 24, seed=1000 + rank * n + i)], prof)
            ProfileStore(cache).get(_img(16, 24, seed=i), prof.fingerprint)
        q.put(("ok", store.stats.corrupt))
    except Exception as e:  # report to the parent instead of dying silently
        q.put(("error", repr(e)))


def test_concurrent_writers_in_several_processes(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    n, procs = 25, 4
    ps = [ctx.Process(target=_writer, args=(str(tmp_path / "cache"), r, n, q)) for r in range(procs)]
    for p in ps:
        p.start()
    results = [q.get(timeout=60) for _ in ps]
    for p in ps:
        p.join(10)
    assert all(r == ("ok", 0) for r in results), results
    store = ProfileStore(tmp_path / "cache")
    v = store.verify()
    assert v["valid"] == n + procs * n and v["corrupt"] == [] and v["tmp"] == []
    prof = CountingProfiler()
    assert all(store.get(_img(16, 24, seed=i), prof.fingerprint) is not None for i in range(n))


def test_cleanup_of_temp_files_from_dead_writers(tmp_path):
    store = ProfileStore(tmp_path / "cache")
    key = store.put(_img(), VLMProfile(), FP)
    shard = store.entry_path(key).parent
    from monai_vlmfilm.profiles.store import _HOST

    ctx = mp.get_context("fork")
    p = ctx.Process(target=lambda: None)
    p.start()
    p.join()
    dead = shard / f".tmp-{_HOST}-{p.pid}-abc.json"
    alive = shard / f".tmp-{_HOST}-{os.getpid()}-def.json"
    dead.write_text("{")
    alive.write_text("{")
    assert store.cleanup_tmp() == 1
    assert not dead.exists() and alive.exists()
    assert len(store) == 1 and list(store) == [key]
    assert dict(store.items()) == {key: VLMProfile()}


def test_heuristic_profiler_through_store(tmp_path, png):
    store = ProfileStore(tmp_path / "cache")
    a = store.get_or_compute([png], HeuristicProfiler())[0]
    assert a.source == "heuristic"
    assert pixel_digest(png) == pixel_digest(np.asarray(Image.open(png)).T)
