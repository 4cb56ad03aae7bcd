"""Checkpoint loading across the ``use_vlm_film`` switch (``monai_vlmfilm.networks.checkpoint``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from monai_vlmfilm.networks import FiLMFlowUNet, FixedTimeVelocity, load_network_weights


def _tiny(on: bool):
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


def test_shipped_checkpoint_loads_without_map_location():
    """MONAI Label's CheckpointLoader reads model.pt without map_location: CUDA tensors in it break CPU servers."""
    path = Path(__file__).resolve().parents[1] / "bundle" / "models" / "model.pt"
    state = torch.load(path, weights_only=True)  # no map_location, as MONAI Label does
    assert state and all(t.device.type == "cpu" for t in state.values())


def test_shipped_checkpoint_refuses_a_network_without_image_norm():
    """The shipped model.pt (0.6.0) was trained with ``image_norm``: the bundle's network built with
    ``--image_norm false`` stops with a message naming the option and the file, instead of segmenting badly; the
    default network loads it."""
    from monai.bundle import ConfigParser

    bundle = Path(__file__).resolve().parents[1] / "bundle"
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    assert parser["image_norm"] is True and parser.get_parsed_content("network_def").image_norm is True
    load_network_weights(parser.get_parsed_content("network_def", lazy=False), bundle / "models" / "model.pt")
    parser["image_norm"] = "false"  # as `--image_norm false` arrives from the command line
    net = parser.get_parsed_content("network_def", lazy=False)
    assert net.image_norm is False
    with pytest.raises(RuntimeError, match=r"model\.pt.*trained with image_norm"):
        load_network_weights(net, bundle / "models" / "model.pt")
