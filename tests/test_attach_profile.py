"""AttachVLMProfiled: before/after LoadImaged, collation, meta, policies, and no heavy profiler in workers."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd
from PIL import Image

from monai_vlmfilm.profiles import PROFILE_DIM, HeuristicProfiler, Profiler, ProfileStore, VLMProfile
from monai_vlmfilm.transforms import AttachVLMProfiled


class HeavyPidProfiler(Profiler):
    """A real profiler flagged heavy; every call leaves a file named after the calling process."""

    name = "heavy_pid"
    heavy = True

    def __init__(self, record_dir: str) -> None:
        self.record_dir = record_dir

    def fingerprint_fields(self):
        return {**super().fingerprint_fields(), "v": 1}

    def profile(self, images):
        Path(self.record_dir, f"called-{os.getpid()}-{len(os.listdir(self.record_dir))}").touch()
        return [VLMProfile(1.0 + float(x.mean()) / 64.0, 0.9, source=self.name) for x in images]


@pytest.fixture()
def pngs(tmp_path) -> list[str]:
    out = []
    yy, xx = np.mgrid[:32, :48]
    for i in range(6):  # dark lines on a bright background, contrast and noise vary per image
        rng = np.random.default_rng(i)
        img = np.full((32, 48), 200.0)
        for _ in range(3):
            a, b = rng.uniform(-1, 1), rng.uniform(0, 32)
            img -= (20 + 20 * i) * np.exp(-((yy - a * xx - b) ** 2) / (1 + a * a) / 2.0)
        img += rng.normal(0, 2 + 3 * (5 - i), img.shape)
        p = tmp_path / "imgs" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
        out.append(str(p))
    return out


def test_before_and_after_loadimaged_agree_and_meta_is_set(tmp_path, pngs):
    cache = str(tmp_path / "cache")
    before = Compose([AttachVLMProfiled("image", cache), LoadImaged("image"), EnsureChannelFirstd("image")])
    after_t = AttachVLMProfiled("image", ProfileStore(cache), profiler="heuristic")
    after = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), ScaleIntensityd("image"), after_t])
    a = before({"image": pngs[0]})
    b = after({"image": pngs[0]})
    assert a["vlm_profile"].dtype == torch.float32 and a["vlm_profile"].shape == (PROFILE_DIM,)
    torch.testing.assert_close(a["vlm_profile"], b["vlm_profile"])
    torch.testing.assert_close(b["image"].meta["vlm_profile"], b["vlm_profile"])
    assert after_t.stats()["hits"] == 1 and after_t.stats()["misses"] == 0  # the first one wrote the entry
    # a MetaTensor without a file is hashed from its pixels (PIL reader orientation, channel first)
    bare = MetaTensor(LoadImaged("image")({"image": pngs[0]})["image"].as_tensor()[None].clone())
    c = AttachVLMProfiled("image", cache)({"image": bare})
    torch.testing.assert_close(c["vlm_profile"], a["vlm_profile"])
    # equal to what the profiler itself says about the image
    ref = HeuristicProfiler().profile([np.asarray(Image.open(pngs[0]), np.float32)])[0]
    np.testing.assert_allclose(a["vlm_profile"].numpy(), ref.to_vector(), rtol=1e-6)


def test_collates_to_batch_and_meta(tmp_path, pngs):
    t = AttachVLMProfiled("image", str(tmp_path / "cache"), profiler={"name": "heuristic"})
    ds = Dataset([{"image": p} for p in pngs], Compose([LoadImaged("image"), EnsureChannelFirstd("image"), t]))
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=0)))
    assert batch["vlm_profile"].shape == (4, PROFILE_DIM) and batch["vlm_profile"].dtype == torch.float32
    assert batch["image"].meta["vlm_profile"].shape == (4, PROFILE_DIM)
    assert len(torch.unique(batch["vlm_profile"], dim=0)) == 4  # different images, different profiles


def test_policies(tmp_path, pngs, caplog):
    cache = str(tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        d = AttachVLMProfiled("image", cache, on_missing="default")({"image": pngs[1]})
    assert d["vlm_profile"][-1] == 1.0 and "cache miss" in caplog.text
    with pytest.raises(KeyError, match=r"1\.png.*precompute"):
        AttachVLMProfiled("image", cache, on_missing="error")({"image": pngs[1]})
    t = AttachVLMProfiled("image", cache, on_missing="compute")
    assert t({"image": pngs[1]})["vlm_profile"][-1] == 0.0
    assert t.stats() == {
        "hits": 0,
        "misses": 1,
        "computed": 1,
        "fallbacks": 0,
        "write_errors": 0,
        "total": 1,
        "hit_rate": 0.0,
    }
    e = AttachVLMProfiled("image", cache, on_missing="error")
    assert e({"image": pngs[1]})["vlm_profile"][-1] == 0.0 and e.stats()["hits"] == 1
    with pytest.raises(ValueError, match="on_missing"):
        AttachVLMProfiled("image", cache, on_missing="ignore")
    assert "vlm_profile" not in AttachVLMProfiled("x", cache, allow_missing_keys=True)({"image": pngs[1]})
    with pytest.raises(ValueError, match="bad.png"):
        bad = Path(pngs[0]).with_name("bad.png")
        bad.write_bytes(b"not a png")
        t({"image": str(bad)})


def test_heavy_profiler_never_runs_in_dataloader_workers(tmp_path, pngs, caplog):
    rec = tmp_path / "calls"
    rec.mkdir()
    cache = str(tmp_path / "cache")
    t = AttachVLMProfiled("image", cache, profiler=HeavyPidProfiler(str(rec)), on_missing="compute")
    ds = Dataset([{"image": p} for p in pngs], Compose([LoadImaged("image"), t]))
    with caplog.at_level(logging.WARNING):
        vecs = torch.cat([b["vlm_profile"] for b in DataLoader(ds, batch_size=2, num_workers=2)])
    assert vecs.shape == (len(pngs), PROFILE_DIM)
    assert list(rec.iterdir()) == []  # never called, in any process
    assert (vecs[:, -1] == 1.0).all()  # misses in workers fell back...
    assert len(ProfileStore(cache)) == 0  # ...and fallbacks are not cached
    # the main process computes (once per image) with the real profiler
    for p in pngs[:3]:
        t({"image": p})
    calls = sorted(rec.iterdir())
    assert len(calls) == 3 and all(c.name.startswith(f"called-{os.getpid()}-") for c in calls)
    # precomputed entries are hits in workers; the others still fall back without a call
    vecs = torch.cat([b["vlm_profile"] for b in DataLoader(ds, batch_size=2, num_workers=2)])
    assert vecs[:3, -1].eq(0).all() and vecs[3:, -1].eq(1).all()
    assert len(list(rec.iterdir())) == 3
    # pickled copies (spawned workers) carry a stub, never the model, and keep the same key
    clone = pickle.loads(pickle.dumps(t))
    assert clone.fingerprint == t.fingerprint and type(clone.profiler).__name__ == "_ProfilerStub"
    assert clone({"image": pngs[0]})["vlm_profile"][-1] == 0.0


def test_cheap_profiler_computes_in_workers(tmp_path, pngs):
    cache = str(tmp_path / "cache")
    ds = Dataset([{"image": p} for p in pngs], AttachVLMProfiled("image", cache, profiler="heuristic"))
    vecs = torch.cat([b["vlm_profile"] for b in DataLoader(ds, batch_size=3, num_workers=2)])
    assert (vecs[:, -1] == 0).all() and len(ProfileStore(cache)) == len(pngs)


def test_read_only_store_still_serves_and_computes(tmp_path, pngs, caplog):
    cache = tmp_path / "cache"
    AttachVLMProfiled("image", str(cache))({"image": pngs[0]})
    ro = AttachVLMProfiled("image", ProfileStore(cache, read_only=True))
    assert ro({"image": pngs[0]})["vlm_profile"][-1] == 0.0 and ro.stats()["hits"] == 1
    with caplog.at_level(logging.WARNING):
        v = ro({"image": pngs[1]})["vlm_profile"]
    assert v[-1] == 0.0 and ro.stats()["write_errors"] == 1 and "read-only" in caplog.text
    assert len(ProfileStore(cache)) == 1
