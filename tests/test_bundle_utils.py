"""Unit tests of the bundle glue (monai_vlmfilm.bundle_utils): in-process, no bundle CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from monai_vlmfilm.bundle_utils import (
    EnsureGrayscale2Dd,
    FixedTimeVelocity,
    MetricsSummaryJSON,
    VesselOverlayd,
    as_bool,
    image_list,
    load_network_weights,
    load_split,
)


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), ("false", False), ("False", False), ("true", True), (" ON ", True), (0, False),
     (1, True), ("no", False), (np.bool_(True), True)],
)  # fmt: skip
def test_as_bool(value, expected):
    assert as_bool(value) is expected


@pytest.mark.parametrize("value", ["maybe", 2, None, [True]])
def test_as_bool_rejects(value):
    with pytest.raises(ValueError, match="use_vlm_film must be true or false"):
        as_bool(value, "use_vlm_film")


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def test_load_split_and_image_list(tmp_path):
    img = (np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8)
    _png(tmp_path / "d/images/a.png", img)
    _png(tmp_path / "d/images/b.png", img)
    _png(tmp_path / "d/masks/a.png", (img > 128).astype(np.uint8) * 255)
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


def test_grayscale_and_overlay():
    rgb = MetaTensor(torch.rand(3, 8, 6), meta={"filename_or_obj": "x.png"})
    d = EnsureGrayscale2Dd(keys="image")({"image": rgb})
    expected = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    assert d["image"].shape == (1, 8, 6) and torch.allclose(d["image"][0], expected)
    assert EnsureGrayscale2Dd(keys="image")({"image": torch.rand(1, 8, 6, 1)})["image"].shape == (1, 8, 6)
    with pytest.raises(ValueError, match="vol.nii: expected a 2D image"):
        EnsureGrayscale2Dd(keys="image")(
            {"image": MetaTensor(torch.rand(1, 8, 6, 5), meta={"filename_or_obj": "vol.nii"})}
        )

    image = MetaTensor(torch.linspace(0, 1, 48).reshape(1, 8, 6), meta={"filename_or_obj": "x.png"})
    mask = torch.zeros(1, 8, 6)
    mask[0, 2:4, 1:3] = 1
    out = VesselOverlayd(keys="pred")({"image": image, "pred": mask})["overlay"]
    assert out.shape == (3, 8, 6) and out.meta["filename_or_obj"] == "x.png"
    bg = mask[0] == 0
    assert torch.allclose(out[0][bg], image[0][bg]) and torch.allclose(out[1][bg], image[0][bg])
    assert (out[0][~bg] > out[1][~bg]).all()  # red tint on the mask


def _tiny(on: bool):
    from monai_vlmfilm.networks import FiLMFlowUNet

    torch.manual_seed(0)
    return FiLMFlowUNet(spatial_dims=2, in_channels=2, out_channels=1, channels=(8, 8, 8),
                        attention_levels=(False,) * 3, num_res_blocks=1, norm_num_groups=8, use_vlm_film=on,
                        cond_dim=8, film_hidden_dim=8)  # fmt: skip


def test_load_network_weights_across_the_switch(tmp_path):
    on, off = _tiny(True), _tiny(False)
    with torch.no_grad():  # trained-like weights (a fresh DiffusionModelUNet outputs zeros: its last conv is zeroed)
        for net in (on, off):
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    torch.save(on.state_dict(), tmp_path / "on.pt")
    torch.save({"model": off.state_dict()}, tmp_path / "off.pt")
    x, t, p = torch.randn(2, 2, 16, 16), torch.tensor([10.0, 500.0]), torch.rand(2, 7)
    off_out = off(x, t)
    # ON checkpoint -> OFF network: FiLM parameters ignored, the rest loaded
    off2 = _tiny(False)
    res = load_network_weights(off2, tmp_path / "on.pt")
    assert res["ignored"] and all(k.startswith(("film_heads.", "profile_encoder.")) for k in res["ignored"])
    assert all(torch.equal(v, on.state_dict()[k]) for k, v in off2.state_dict().items())
    # OFF checkpoint ({"model": ...}) -> fresh ON network: FiLM at identity, exactly the OFF outputs
    fresh_on = _tiny(True)
    res = load_network_weights(fresh_on, tmp_path / "off.pt")
    assert res["missing"] and not res["ignored"]
    assert off_out.abs().max() > 0 and torch.equal(fresh_on(x, t, p), off_out)
    # a checkpoint of another architecture is refused with the file named
    other = _tiny(False)
    sd = {k: v for k, v in other.state_dict().items() if not k.startswith("out.")}
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="partial.pt"):
        load_network_weights(_tiny(False), tmp_path / "partial.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_network_weights(off, tmp_path / "nowhere.pt")
    # the one-argument view used by verify_net_in_out
    assert FixedTimeVelocity(off, 500)(x).shape == (2, 1, 16, 16)


def test_metrics_summary_json(tmp_path):
    class State:
        metrics = {"dice": 0.5, "hd95": float("inf")}
        metric_details = {"dice": torch.tensor([[0.4], [0.6]]), "hd95": torch.tensor([[3.0], [float("inf")]])}

    class Engine:
        state = State()

    h = MetricsSummaryJSON(str(tmp_path / "s.json"), extra={"split": "test"})
    h(Engine())
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["num_images"] == 2 and s["metrics"] == {"dice": 0.5, "hd95": None} and s["extra"] == {"split": "test"}
    assert s["per_metric"]["dice"]["mean"] == pytest.approx(0.5) and s["per_metric"]["dice"]["std"] == pytest.approx(
        0.1
    )
    assert s["per_metric"]["hd95"]["notnans"] == 1 and s["per_metric"]["hd95"]["nonfinite"] == 1


def test_shipped_checkpoint_loads_without_map_location():
    """MONAI Label's CheckpointLoader reads model.pt without map_location: CUDA tensors in it break CPU servers."""
    from pathlib import Path

    import torch

    path = Path(__file__).resolve().parents[1] / "bundle" / "models" / "model.pt"
    state = torch.load(path, weights_only=True)  # no map_location, as MONAI Label does
    assert state and all(t.device.type == "cpu" for t in state.values())
