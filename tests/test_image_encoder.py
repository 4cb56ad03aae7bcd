"""The flow UNet's optional image pathway (ImageSkipEncoder): layout, zero start, the switch, export, gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_FLOW_NET
from monai.networks.nets import DiffusionModelUNet

from monai_vlmfilm.inferers import FlowSegInferer
from monai_vlmfilm.networks import FiLMFlowUNet, FlowODESegmenter, ImageSkipEncoder, skip_layout

pytestmark = pytest.mark.usefixtures("one_thread")
ENC = (8, 8, 16)


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return FiLMFlowUNet(**{**TINY_FLOW_NET, **kw})


def randomise(net, prefix="", seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(prefix):
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)


@pytest.mark.parametrize("num_res_blocks", [1, 2])
def test_skip_layout_matches_what_the_unet_collects(num_res_blocks):
    kw = {**TINY_FLOW_NET, "num_res_blocks": num_res_blocks}
    net = DiffusionModelUNet(**kw).eval()
    consumed = []  # each up block takes its skips from the end of the list: record them as the decoder reads them

    def record(module, args, kwargs):
        consumed.append([tuple(t.shape) for t in kwargs["res_hidden_states_list"]])

    for block in net.up_blocks:
        block.register_forward_pre_hook(record, with_kwargs=True)
    net(torch.rand(1, 2, 32, 32), torch.tensor([10]))
    skips = [shape for group in reversed(consumed) for shape in group]  # back in the order they were collected
    layout = skip_layout(kw["channels"], (num_res_blocks,) * 3)
    assert [(s[1], s[-1]) for s in skips] == [(ch, 32 // 2**level) for level, ch in layout]


def test_fresh_encoder_leaves_the_unet_unchanged_and_then_acts():
    plain, enc = build(), build(image_encoder_channels=ENC)
    assert set(plain.state_dict()) < set(enc.state_dict())
    assert all(k.startswith("image_encoder.") for k in set(enc.state_dict()) - set(plain.state_dict()))
    enc.load_state_dict(plain.state_dict(), strict=False)  # the same UNet weights (the encoder draws its own)
    randomise(plain, "out.")
    randomise(enc, "out.")
    x, t = torch.rand(2, 2, 24, 40), torch.tensor([999.0, 400.0])
    with torch.no_grad():
        assert torch.equal(plain(x, t), enc(x, t))  # zero projections: exactly the plain network
        randomise(enc, "image_encoder.")
        out = enc(x, t)
    assert not torch.allclose(out, plain(x, t))
    # it reads the image channel only: changing the noisy-mask channel alone moves the output through the UNet path,
    # changing the image moves the encoder's residuals
    skips, mid = enc.image_encoder(x[:, 1:])
    skips2, mid2 = enc.image_encoder(torch.cat([x[:, :1] + 1, x[:, 1:]], 1)[:, 1:])
    assert all(torch.equal(a, b) for a, b in zip(skips, skips2)) and torch.equal(mid, mid2)


def test_encoder_gets_gradients_and_stacks_with_given_residuals():
    net = build(image_encoder_channels=ENC)
    randomise(net, "out.")
    x, t = torch.rand(1, 2, 16, 16), torch.tensor([999.0])
    net(x, t).sum().backward()
    # the zero projections get gradients first (their inputs are the encoder's features)
    assert net.image_encoder.mid_proj.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in net.image_encoder.skip_proj.parameters())
    layout = skip_layout(TINY_FLOW_NET["channels"], net.num_res_blocks)
    extra = tuple(torch.full((1, ch, 16 // 2**lv, 16 // 2**lv), 0.5) for lv, ch in layout)
    with torch.no_grad():
        base, given = net(x, t), net(x, t, down_block_additional_residuals=extra)
    assert not torch.allclose(base, given)  # residuals passed by a caller are added, not dropped


def test_switch_keeps_the_encoder_and_the_rng_stream():
    off = build(image_encoder_channels=ENC, use_vlm_film=False)
    on = build(image_encoder_channels=ENC, use_vlm_film=True, cond_dim=16, film_hidden_dim=16)
    sd_on = on.state_dict()
    for k, v in off.state_dict().items():  # every OFF weight, the encoder's included, equals the ON one
        assert torch.equal(v, sd_on[k]), k
    assert {k.split(".")[0] for k in set(sd_on) - set(off.state_dict())} == {"profile_encoder", "film_heads"}


def test_bad_encoder_arguments():
    with pytest.raises(ValueError, match="one width per UNet level"):
        build(image_encoder_channels=(8, 8))
    with pytest.raises(ValueError, match="needs image channels"):
        build(in_channels=1, image_encoder_channels=ENC)
    with pytest.raises(ValueError, match="one width per UNet level"):
        ImageSkipEncoder(2, 1, (8,), skip_layout((8, 16), (1, 1)), 16)


def test_export_with_the_encoder_equals_the_python_inferer(tmp_path):
    net = build(image_encoder_channels=ENC, use_vlm_film=True, cond_dim=16, film_hidden_dim=16)
    randomise(net)
    net.eval()
    module = FlowODESegmenter(net, seed=2, num_steps=1, num_samples=2)
    torch.jit.save(torch.jit.script(module), str(tmp_path / "m.ts"))
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    image, profile = torch.rand(1, 1, 30, 44), torch.rand(1, 7)
    with torch.no_grad():
        expected = FlowSegInferer(seed=2, num_steps=1, num_samples=2)(image, net, profile)
    torch.testing.assert_close(loaded(image, profile), expected, rtol=0, atol=1e-6)
