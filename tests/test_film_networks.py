"""FiLMFlowUNet / FiLM heads: OFF bit identity, zero-init ON, checkpoints, gate, gradients, precision, layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_FLOW_NET
from monai.networks.nets import DiffusionModelUNet

from monai_vlmfilm.networks import (
    AdaptiveFiLMHead,
    FiLMFlowUNet,
    ProfileEncoder,
    describe_missing_keys,
    load_off_checkpoint,
)
from monai_vlmfilm.profiles import DEFAULT_PROFILE, FALLBACK_INDEX, PROFILE_DIM, VLMProfile

KW2 = dict(TINY_FLOW_NET, attention_levels=(False, False, True), num_head_channels=8)  # attention on the last level
KW3 = dict(KW2, spatial_dims=3, attention_levels=(False, False, False))
FILM = dict(cond_dim=16, film_hidden_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def build(cls, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**kw)


def randomise_output_conv(*nets):
    """MONAI zero-initialises the output conv; give it weights so outputs carry information (same in all nets)."""
    g = torch.Generator().manual_seed(123)
    for name, p in nets[0].named_parameters():
        if name.startswith("out.2"):
            value = torch.randn(p.shape, generator=g) * 0.1
            for n in nets:
                dict(n.named_parameters())[name].data.copy_(value)


def randomise_film(net, seed=7):
    g = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        if name.startswith(("film_heads", "profile_encoder")):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)


def profiles(b):
    vecs = [VLMProfile(difficulty=1 + 4 * i / max(b - 1, 1), confidence=0.3).to_vector() for i in range(b)]
    return torch.as_tensor(np.stack(vecs))


@pytest.mark.parametrize("kw,shape", [(KW2, (2, 2, 32, 32)), (KW3, (2, 2, 16, 16, 16))], ids=["2d", "3d"])
def test_off_is_bit_identical_to_diffusion_unet(kw, shape):
    ref = build(DiffusionModelUNet, **kw)
    off = build(FiLMFlowUNet, **kw)
    sd_ref, sd_off = ref.state_dict(), off.state_dict()
    assert list(sd_ref) == list(sd_off)
    assert all(torch.equal(sd_ref[k], sd_off[k]) for k in sd_ref)
    randomise_output_conv(ref, off)
    x, t = torch.randn(shape), torch.tensor([3, 700])
    with torch.no_grad():
        a, b = ref(x, t), off(x, t)
        c = off(x, t, profile=profiles(2))  # an OFF network ignores a profile
    assert a.abs().max() > 0
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("kw,shape", [(KW2, (3, 2, 32, 32)), (KW3, (2, 2, 16, 16, 16))], ids=["2d", "3d"])
def test_fresh_on_equals_off_and_null_profile(kw, shape):
    off = build(FiLMFlowUNet, **kw)
    on = build(FiLMFlowUNet, use_vlm_film=True, **FILM, **kw)
    # the UNet part of ON is the same as OFF under the same seed: FiLM modules are built after it
    sd_on = on.state_dict()
    assert all(torch.equal(v, sd_on[k]) for k, v in off.state_dict().items())
    randomise_output_conv(off, on)
    x, t = torch.randn(shape), torch.randint(0, 1000, (shape[0],))
    p = profiles(shape[0])
    with torch.no_grad():
        ref = off(x, t)
        assert torch.equal(on(x, t, profile=p), ref)  # zero-init last layer -> identity FiLM
        randomise_film(on)
        assert not torch.equal(on(x, t, profile=p), ref)  # FiLM active once trained ...
        calls = []
        on.film_heads["0"].register_forward_hook(lambda *a: calls.append(1))
        assert torch.equal(on(x, t), ref)  # ... and the null profile is still exactly OFF
        assert not calls  # the null profile runs no FiLM head at all


def test_film_stages_and_shapes():
    on = build(FiLMFlowUNet, use_vlm_film=True, film_stages=[0, 2], **FILM, **KW2)
    assert sorted(on.film_heads.keys()) == ["0", "2"]
    off_keys = set(build(FiLMFlowUNet, **KW2).state_dict())
    extra = set(on.state_dict()) - off_keys
    assert extra and all(k.startswith(("film_heads.", "profile_encoder.")) for k in extra)
    randomise_film(on)
    seen = {}
    for i, head in on.film_heads.items():
        head.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(int(i), out))
    with torch.no_grad():
        on(torch.randn(2, 2, 32, 32), torch.tensor([1, 2]), profile=profiles(2))
    assert sorted(seen) == [0, 2]
    # stage 0 is the deepest up block: channels reversed -> 16; stage 2 -> 8
    assert seen[0][0].shape == (2, 16, 1, 1) and seen[2][1].shape == (2, 8, 1, 1)
    assert seen[0][2].shape == (2,)
    with pytest.raises(ValueError, match="film_stages"):
        FiLMFlowUNet(use_vlm_film=True, film_stages=[5], **KW2)
    with pytest.raises(ValueError, match="profile"):
        on(torch.randn(2, 2, 32, 32), torch.tensor([1, 2]), profile=torch.rand(2, PROFILE_DIM + 1))
    with pytest.raises(ValueError, match="batch size"):
        on(torch.randn(2, 2, 32, 32), torch.tensor([1, 2]), profile=torch.rand(3, PROFILE_DIM))


def test_encoder_film_stages():
    """Issue 16 "where FiLM acts": FiLM on encoder blocks too. Fresh heads are the identity, the decoder heads keep
    the weights they have without encoder stages, trained heads change the output through the path down and the
    skips, an OFF checkpoint still warm-starts it, and an OFF network builds nothing for them."""
    dec = build(FiLMFlowUNet, use_vlm_film=True, **FILM, **KW2)
    enc = build(FiLMFlowUNet, use_vlm_film=True, film_encoder_stages=[0, 2], **FILM, **KW2)
    off = build(FiLMFlowUNet, film_encoder_stages=[0, 2], **KW2)
    assert set(off.state_dict()) == set(build(FiLMFlowUNet, **KW2).state_dict())  # OFF: exactly the plain network
    sd_enc = enc.state_dict()
    assert all(torch.equal(v, sd_enc[k]) for k, v in dec.state_dict().items())  # decoder heads and UNet unchanged
    extra = set(sd_enc) - set(dec.state_dict())
    assert extra and all(k.startswith("film_encoder_heads.") for k in extra)
    assert sorted(enc.film_encoder_heads.keys()) == ["0", "2"]
    randomise_output_conv(dec, enc, off)
    x, t, p = torch.randn(2, 2, 32, 32), torch.tensor([10, 900]), profiles(2)
    with torch.no_grad():
        ref = off(x, t)
        assert torch.equal(enc(x, t, profile=p), ref)  # zero-initialised: identity
        g = torch.Generator().manual_seed(3)
        for name, q in enc.named_parameters():
            if name.startswith("film_encoder_heads"):
                q.data.copy_(torch.randn(q.shape, generator=g) * 0.3)
        seen = {}
        for i in (0, 2):
            enc.film_encoder_heads[str(i)].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
        calls = []
        hook = enc.profile_encoder.register_forward_hook(lambda *a: calls.append(1))
        out = enc(x, t, profile=p)
        hook.remove()
        assert calls == [1]  # one pass of the profile encoder serves the encoder and decoder heads
        assert not torch.equal(out, ref) and torch.equal(enc(x, t), ref)  # the null profile is still OFF
        assert seen[0][0].shape == (2, 8, 1, 1) and seen[2][0].shape == (2, 16, 1, 1)  # the blocks' own widths
        assert not torch.equal(enc(x, t, profile=profiles(2).flip(0)), out)  # it reads the profile
        # the skips block 0 hands to the decoder are modulated, not only its path down (a later hook sees the result)
        skips = []
        enc.down_blocks[0].register_forward_hook(lambda m, a, o: skips.append(o[1]))
        enc(x, t, profile=p), enc(x, t)
        assert len(skips[0]) == len(skips[1]) > 0
        assert all(not torch.equal(a, b) for a, b in zip(skips[0], skips[1]))
    assert set(load_off_checkpoint(enc, off.state_dict())) == set(sd_enc) - set(off.state_dict())
    with pytest.raises(ValueError, match="film_encoder_stages"):
        FiLMFlowUNet(use_vlm_film=True, film_encoder_stages=[3], **KW2)


def test_single_profile_broadcasts():
    on = build(FiLMFlowUNet, use_vlm_film=True, **FILM, **KW2)
    randomise_output_conv(on)
    randomise_film(on)
    x, t = torch.randn(2, 2, 32, 32), torch.tensor([5, 500])
    p = torch.as_tensor(DEFAULT_PROFILE.to_vector())
    with torch.no_grad():
        assert torch.equal(on(x, t, profile=p), on(x, t, profile=p[None].expand(2, -1).clone()))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_head_shapes_zero_init_and_gate_formula(spatial_dims):
    torch.manual_seed(0)
    head = AdaptiveFiLMHead(cond_dim=12, channels=5, hidden_dim=10, spatial_dims=spatial_dims)
    cond = torch.randn(4, 12)
    d = torch.tensor([0.0, 0.25, 0.5, 1.0])
    gamma, beta, gate = head(cond, d)
    assert gamma.shape == beta.shape == (4, 5) + (1,) * spatial_dims
    assert torch.count_nonzero(gamma) == 0 and torch.count_nonzero(beta) == 0
    # documented gate: sigmoid(a * d + b), a = 4, b = -2 at init; easy images get the smallest gate
    assert torch.allclose(gate, torch.sigmoid(4 * d - 2))
    assert gate[0] < gate[1] < gate[2] < gate[3] and abs(gate[2].item() - 0.5) < 1e-6
    # gamma/beta are the raw MLP output scaled by the gate
    torch.nn.init.normal_(head.mlp[-1].weight)
    torch.nn.init.normal_(head.mlp[-1].bias)
    gamma, beta, gate = head(cond, d)
    raw = head.mlp(cond)
    assert torch.allclose(gamma.flatten(1), raw[:, :5] * gate[:, None], atol=1e-6)
    assert torch.allclose(beta.flatten(1), raw[:, 5:] * gate[:, None], atol=1e-6)
    # gate parameters are learnable
    (gamma.sum() + beta.sum()).backward()
    assert head.gate_scale.grad is not None and head.gate_scale.grad != 0
    # without the gate: gate = 1
    free = AdaptiveFiLMHead(cond_dim=12, channels=5, hidden_dim=10, use_difficulty_gate=False)
    assert torch.equal(free(cond)[2], torch.ones(4))
    with pytest.raises(ValueError, match="difficulty"):
        head(cond)


def test_profile_encoder_shapes():
    enc = ProfileEncoder(PROFILE_DIM, cond_dim=24, hidden_dim=8)
    assert enc(torch.rand(3, PROFILE_DIM)).shape == (3, 24)
    with pytest.raises(ValueError):
        enc(torch.rand(3, PROFILE_DIM + 2))


def test_off_checkpoint_loads_into_on():
    off = build(FiLMFlowUNet, seed=1, **KW2)
    randomise_output_conv(off)
    on = build(FiLMFlowUNet, seed=2, use_vlm_film=True, **FILM, **KW2)  # different seed: weights must come from sd
    missing = load_off_checkpoint(on, off.state_dict())
    assert missing and all(k.startswith(("film_heads.", "profile_encoder.")) for k in missing)
    assert set(missing) == set(on.state_dict()) - set(off.state_dict())
    x, t, p = torch.randn(2, 2, 32, 32), torch.tensor([10, 900]), profiles(2)
    with torch.no_grad():
        assert torch.equal(on(x, t, profile=p), off(x, t))
    # plain load_state_dict(strict=False) reports only FiLM keys; the helper says so plainly
    result = on.load_state_dict(off.state_dict(), strict=False)
    text = describe_missing_keys(result.missing_keys, result.unexpected_keys)
    assert "FiLM parameters are not in the checkpoint" in text and "non-FiLM" not in text
    # DDP-style "module." prefixes are accepted
    load_off_checkpoint(on, {f"module.{k}": v for k, v in off.state_dict().items()})


def test_off_checkpoint_rejects_other_mismatches():
    off = build(FiLMFlowUNet, **KW2)
    on = build(FiLMFlowUNet, use_vlm_film=True, **FILM, **KW2)
    sd = off.state_dict()
    broken = {k: v for k, v in sd.items() if k != "conv_in.conv.weight"}
    with pytest.raises(RuntimeError, match="non-FiLM parameters are missing"):
        load_off_checkpoint(on, broken)
    with pytest.raises(RuntimeError, match="do not belong"):
        load_off_checkpoint(on, {**sd, "bogus.weight": torch.zeros(1)})
    other = build(FiLMFlowUNet, **dict(KW2, channels=(8, 16, 24)))
    with pytest.raises(RuntimeError, match="Shape mismatches"):
        load_off_checkpoint(on, other.state_dict())


def test_checkpoints_across_the_encoder_film_option(tmp_path, caplog):
    """A decoder-only FiLM checkpoint (the shipped model.pt) loads into an encoder-FiLM network at identity, with a
    warning that names the switch; an encoder-FiLM checkpoint refuses a network built without those stages and says
    which value of film_encoder_stages it needs."""
    import logging

    from monai_vlmfilm.networks.checkpoint import load_network_weights

    dec = build(FiLMFlowUNet, seed=1, use_vlm_film=True, **FILM, **KW2)
    randomise_output_conv(dec)
    enc = build(FiLMFlowUNet, seed=2, use_vlm_film=True, film_encoder_stages=[0, 2], **FILM, **KW2)
    torch.save(dec.state_dict(), tmp_path / "dec.pt")
    with caplog.at_level(logging.WARNING):
        result = load_network_weights(enc, tmp_path / "dec.pt")
    assert result["missing"] and all(k.startswith("film_encoder_heads.") for k in result["missing"])
    assert "no encoder FiLM heads" in caplog.text and "encoder stages [0, 2]" in caplog.text
    assert "FiLM-off checkpoint" not in caplog.text  # the decoder heads did load
    text = describe_missing_keys(result["missing"], [])
    assert "encoder FiLM parameters" in text and "decoder-only FiLM network" in text and "FiLM-off" not in text
    x, t, p = torch.randn(2, 2, 32, 32), torch.tensor([10, 900]), profiles(2)
    with torch.no_grad():
        dec.film_heads["0"].mlp[-1].weight.data.normal_(0, 0.3)  # a trained decoder head: visible in the output
        torch.save(dec.state_dict(), tmp_path / "dec.pt")
        load_network_weights(enc, tmp_path / "dec.pt")
        assert torch.equal(enc(x, t, profile=p), dec(x, t, profile=p))
    torch.save(enc.state_dict(), tmp_path / "enc.pt")
    with pytest.raises(RuntimeError, match=r"set film_encoder_stages \[0, 2\]") as err:
        load_network_weights(build(FiLMFlowUNet, use_vlm_film=True, **FILM, **KW2), tmp_path / "enc.pt")
    assert "enc.pt" in str(err.value)
    off = build(FiLMFlowUNet, **KW2)  # FiLM off ignores every FiLM parameter, the encoder heads included
    assert any(k.startswith("film_encoder_heads.") for k in load_network_weights(off, tmp_path / "enc.pt")["ignored"])


def test_no_gradient_reaches_profile_source():
    on = build(FiLMFlowUNet, use_vlm_film=True, **FILM, **KW2)
    randomise_output_conv(on)
    randomise_film(on)
    frozen = torch.nn.Linear(4, PROFILE_DIM)  # stands in for the frozen VLM's last layer
    profile = torch.sigmoid(frozen(torch.randn(2, 4)))
    assert profile.requires_grad
    out = on(torch.randn(2, 2, 32, 32), torch.tensor([1, 500]), profile=profile)
    out.square().mean().backward()
    assert frozen.weight.grad is None and frozen.bias.grad is None
    assert on.film_heads["0"].mlp[-1].weight.grad is not None  # while the FiLM heads do learn
    assert on.profile_encoder.net[0].weight.grad.abs().sum() > 0


def test_autocast_bf16_cpu():
    off = build(FiLMFlowUNet, **KW2)
    on = build(FiLMFlowUNet, use_vlm_film=True, **FILM, **KW2)
    randomise_output_conv(off, on)
    x, t, p = torch.randn(2, 2, 32, 32), torch.tensor([1, 500]), profiles(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = off(x, t), on(x, t, profile=p)
    randomise_film(on)  # outside the autocast block: autocast caches its bf16 weight copies
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        c = on(x, t, profile=p)
    assert torch.equal(a, b)  # zero FiLM is exact in bf16 too
    assert torch.isfinite(c).all() and not torch.equal(a, c)
    with torch.no_grad():
        full = on(x, t, profile=p)
    assert (c.float() - full).abs().max() < 0.1 * full.abs().max() + 0.05


def test_channels_last():
    on = build(FiLMFlowUNet, use_vlm_film=True, **FILM, **KW2)
    randomise_output_conv(on)
    randomise_film(on)
    x, t, p = torch.randn(2, 2, 32, 32), torch.tensor([1, 500]), profiles(2)
    with torch.no_grad():
        ref = on(x, t, profile=p)
        on_cl = on.to(memory_format=torch.channels_last)
        out = on_cl(x.contiguous(memory_format=torch.channels_last), t, profile=p)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)


def test_profile_normalisation_is_applied_saved_and_optional(tmp_path):
    """profile_norm z-scores the encoder input (clipped), travels in the state_dict, leaves the gate on the raw
    difficulty and keeps a fresh ON network equal to OFF; checkpoints from before the buffers still load strictly."""
    import json

    from monai_vlmfilm.profiles.normalization import compute_profile_norm, load_profile_norm, norm_vectors

    p = profiles(4)
    norm = compute_profile_norm(p.numpy())
    path = tmp_path / "norm.json"
    path.write_text(json.dumps(norm))
    off = build(FiLMFlowUNet, seed=3, **KW2)
    on = build(FiLMFlowUNet, seed=3, use_vlm_film=True, profile_norm=load_profile_norm(path), **FILM, **KW2)
    randomise_output_conv(off, on)
    x, t = torch.randn(4, 2, 32, 32), torch.tensor([10, 300, 600, 900])
    with torch.no_grad():
        assert torch.equal(on(x, t, profile=p), off(x, t))  # zero-initialised heads: still exactly OFF
    enc = on.profile_encoder
    z = enc.normalize(p)
    np.testing.assert_allclose(z.numpy(), np.clip(norm_vectors(p.numpy(), norm), -5, 5), rtol=1e-5, atol=1e-5)
    assert abs(float(z[:, 0].mean())) < 1e-5  # difficulty centred
    assert torch.equal(z[:, 6], p[:, 6])  # fallback flag untouched
    far = p.clone()
    far[:, 2] = 1e3
    assert float(enc.normalize(far).abs().max()) == 5.0  # out-of-distribution input is clipped
    # the gate reads the raw difficulty, not the z-score
    randomise_film(on)
    gates = on.film_parameters(p)[0][2]
    head = on.film_heads["0"]
    torch.testing.assert_close(gates, torch.sigmoid(head.gate_scale * p[:, 0] + head.gate_bias))
    # the statistics are in the state_dict: an ON network built without profile_norm takes them from the checkpoint
    sd = on.state_dict()
    assert torch.equal(sd["profile_encoder.feature_mean"], torch.tensor(norm["mean"], dtype=torch.float32))
    plain = build(FiLMFlowUNet, use_vlm_film=True, **FILM, **KW2)
    plain.load_state_dict(sd)
    torch.testing.assert_close(plain.profile_encoder.feature_std, on.profile_encoder.feature_std)
    with torch.no_grad():
        assert torch.equal(plain(x, t, profile=p), on(x, t, profile=p))
    # a checkpoint saved before the buffers existed loads strictly and keeps the identity
    old = {k: v for k, v in sd.items() if not k.startswith("profile_encoder.feature_")}
    fresh = build(FiLMFlowUNet, use_vlm_film=True, **FILM, **KW2)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.profile_encoder.normalize(p), p)
    # bad statistics are refused with the file named
    path.write_text(json.dumps({**norm, "std": [0.0] * PROFILE_DIM}))
    with pytest.raises(ValueError, match="norm.json"):
        load_profile_norm(path)
    path.write_text(json.dumps({**norm, "fields": ["a"] * PROFILE_DIM}))
    with pytest.raises(ValueError, match="vector layout"):
        load_profile_norm(path)
    # the network reads no file: a path is refused with the loader to call named
    with pytest.raises(TypeError, match="load_profile_norm"):
        FiLMFlowUNet(use_vlm_film=True, profile_norm=str(path), **FILM, **KW2)
    with pytest.raises(ValueError, match="shape"):
        compute_profile_norm(np.zeros((3, PROFILE_DIM + 1)))


def test_gate_index_and_the_command_line_switch():
    """The gate's profile element is a constructor argument; the switch accepts the command line's strings."""
    on = build(FiLMFlowUNet, use_vlm_film="true", gate_index=1, **FILM, **KW2)
    p = profiles(3)
    head = on.film_heads["0"]
    torch.testing.assert_close(on.film_parameters(p)[0][2], torch.sigmoid(head.gate_scale * p[:, 1] + head.gate_bias))
    with pytest.raises(ValueError, match="gate_index"):
        FiLMFlowUNet(use_vlm_film=True, gate_index=PROFILE_DIM, **KW2)
    assert build(FiLMFlowUNet, use_vlm_film="false", **KW2).use_vlm_film is False


@pytest.mark.parametrize("film", [False, True], ids=["off", "on"])
def test_image_norm_makes_the_output_independent_of_brightness_and_contrast(film):
    """``image_norm``: the image channel is z-scored inside the network, so ``a * image + b`` (a > 0) segments the
    same; the mask channel (x_t) is left alone; without the option nothing changes (no buffer, the image matters)."""
    kw = dict(TINY_FLOW_NET, use_vlm_film=film, **(FILM if film else {}))
    net = build(FiLMFlowUNet, image_norm=True, **kw).eval()
    plain = build(FiLMFlowUNet, **kw).eval()
    randomise_output_conv(net, plain)
    if film:
        randomise_film(net)
    g = torch.Generator().manual_seed(2)
    x_t, image = torch.randn(2, 1, 32, 32, generator=g), torch.rand(2, 1, 32, 32, generator=g)
    t, p = torch.tensor([1000.0, 300.0]), profiles(2)
    with torch.no_grad():
        out = net(torch.cat([x_t, image], 1), t, p)
        brighter = net(torch.cat([x_t, 0.4 * image + 0.5], 1), t, p)
        other_noise = net(torch.cat([2 * x_t, image], 1), t, p)
        plain_out = plain(torch.cat([x_t, image], 1), t, p)
        plain_brighter = plain(torch.cat([x_t, 0.4 * image + 0.5], 1), t, p)
    assert out.abs().max() > 0
    torch.testing.assert_close(brighter, out, atol=1e-4, rtol=0)
    assert not torch.allclose(other_noise, out, atol=1e-3)  # only the image channel is normalised
    assert not torch.allclose(plain_brighter, plain_out, atol=1e-3)  # without it the intensities matter
    assert "image_norm_flag" in net.state_dict() and "image_norm_flag" not in plain.state_dict()
    assert build(FiLMFlowUNet, image_norm="false", **kw).image_norm is False  # the command line's string form
    with pytest.raises(ValueError, match="image_norm"):
        FiLMFlowUNet(**dict(kw, in_channels=1), image_norm=True)


def test_image_norm_checkpoints_do_not_load_across_the_option():
    """A checkpoint records whether it was trained with ``image_norm``; loading it into a network built the other
    way stops with a message that names the option (either direction), the same way loads."""
    from monai_vlmfilm.networks import load_network_state

    kw = dict(TINY_FLOW_NET, use_vlm_film=True, **FILM)
    normed, plain = build(FiLMFlowUNet, image_norm=True, **kw), build(FiLMFlowUNet, **kw)
    with pytest.raises(RuntimeError, match="trained without image_norm.*set image_norm false"):
        load_network_state(build(FiLMFlowUNet, image_norm=True, **kw), plain.state_dict())
    with pytest.raises(RuntimeError, match="trained with image_norm.*set image_norm true"):
        load_network_state(build(FiLMFlowUNet, **kw), normed.state_dict())
    twin = build(FiLMFlowUNet, seed=3, image_norm=True, **kw)
    load_network_state(twin, normed.state_dict())
    assert all(torch.equal(v, normed.state_dict()[k]) for k, v in twin.state_dict().items())


def test_profile_dropout_replaces_profiles_by_the_training_mean_in_training_only():
    """``profile_dropout``: in training mode each sample's profile is, with that probability, the encoder's
    ``feature_mean`` (normalised to 0); p = 1 makes every output equal to the mean profile's, p = 0 and eval mode
    leave the profile alone; the state dict is the same as without the option."""
    kw = dict(TINY_FLOW_NET, use_vlm_film=True, **FILM)
    drop_all = build(FiLMFlowUNet, profile_dropout=1.0, **kw)
    plain = build(FiLMFlowUNet, **kw)
    randomise_output_conv(drop_all, plain)
    randomise_film(drop_all)
    randomise_film(plain)
    p = profiles(3)
    mean = p.mean(0)
    for net in (drop_all, plain):
        net.profile_encoder.set_normalization(mean, p.std(0).clamp_min(1e-3))
    assert list(drop_all.state_dict()) == list(plain.state_dict())
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(3, 2, 32, 32, generator=g), torch.tensor([1000.0, 500.0, 100.0])
    with torch.no_grad():
        drop_all.train(), plain.train()
        dropped = drop_all(x, t, p)
        as_mean = plain(x, t, mean.expand(3, -1))
        kept = plain(x, t, p)
        drop_all.eval(), plain.eval()
        eval_out, plain_eval = drop_all(x, t, p), plain(x, t, p)
    torch.testing.assert_close(dropped, as_mean)
    assert not torch.allclose(kept, as_mean, atol=1e-4)  # the profiles differ, so dropping them is visible
    torch.testing.assert_close(eval_out, plain_eval)  # eval mode: no dropout
    # a fraction in between drops about that share of the samples
    half = build(FiLMFlowUNet, profile_dropout=0.5, **kw)
    half.profile_encoder.set_normalization(mean, p.std(0).clamp_min(1e-3))
    torch.manual_seed(0)
    seen = []
    hook = half.profile_encoder.register_forward_pre_hook(lambda m, a: seen.append(m.normalize(a[0]).abs().sum(1)))
    with torch.no_grad():
        half.train()
        for _ in range(40):
            half(x, t, p)
    hook.remove()
    # samples 0 and 2 (the middle profile is the mean itself, dropped or not)
    share = float((torch.stack(seen)[:, [0, 2]] == 0).float().mean())
    assert 0.35 < share < 0.65, share
    with pytest.raises(ValueError, match="profile_dropout"):
        FiLMFlowUNet(profile_dropout=1.5, **kw)


def test_profile_noise_jitters_training_profiles_by_their_spread_and_leaves_eval_alone():
    """``profile_noise``: in training mode each profile is moved by Gaussian noise of ``profile_noise`` times the
    encoder's ``feature_std`` per feature (the fallback flag never), so the profile the encoder normalises moves by
    about ``profile_noise`` standard deviations; eval mode and ``profile_noise=0`` leave it alone; the state dict is
    the same as without the option; a negative value is refused."""
    kw = dict(TINY_FLOW_NET, use_vlm_film=True, **FILM)
    noisy = build(FiLMFlowUNet, profile_noise=0.5, **kw)
    plain = build(FiLMFlowUNet, **kw)
    assert list(noisy.state_dict()) == list(plain.state_dict())
    p = profiles(4).float()
    std = torch.linspace(0.5, 2.0, p.shape[1])
    for net in (noisy, plain):
        net.profile_encoder.set_normalization(p.mean(0), std)
    seen: dict[str, list[torch.Tensor]] = {"noisy": [], "plain": []}
    hooks = [
        net.profile_encoder.register_forward_pre_hook(lambda m, a, k=k: seen[k].append(a[0].detach().clone()))
        for k, net in (("noisy", noisy), ("plain", plain))
    ]
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(4, 2, 32, 32, generator=g), torch.full((4,), 1000.0)
    torch.manual_seed(0)
    with torch.no_grad():
        noisy.train(), plain.train()
        for _ in range(200):
            noisy(x, t, p)
        plain(x, t, p)
        noisy.eval()
        noisy(x, t, p)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(seen["plain"][0], p)  # no option: the profile as given
    torch.testing.assert_close(seen["noisy"][-1], p)  # eval mode: no noise
    moved = torch.stack(seen["noisy"][:-1]) - p  # [200, B, P]
    z = moved / std  # in units of the training profiles' spread
    assert torch.all(moved[..., FALLBACK_INDEX] == 0)  # the fallback flag is a flag
    spread = z[..., :FALLBACK_INDEX].std(dim=(0, 1))
    assert torch.all((spread > 0.4) & (spread < 0.6)), spread
    assert abs(float(z[..., :FALLBACK_INDEX].mean())) < 0.05
    with pytest.raises(ValueError, match="profile_noise"):
        FiLMFlowUNet(profile_noise=-0.1, **kw)


def test_training_profile_norm_follows_the_transforms_to_the_profile():
    """train.yaml's default profile_norm: each item through the transforms until one attaches the profile; None
    when none does (FiLM off), an error for an empty training split."""
    import numpy as np
    import pytest

    from monai_vlmfilm.profiles.normalization import compute_profile_norm, training_profile_norm

    seen = []

    def load(d):
        return {**d, "pixels": np.full((4, 4), d["v"], np.float32)}

    def attach(d):
        return {**d, "vlm_profile": np.array([d["v"], 2 * d["v"], 0.5, 0.1, 0.2, 0.3, 0.0], np.float32)}

    def after(d):  # never reached: the profile is what training attaches before its crops and augmentation
        seen.append(d)
        return d

    items = [{"v": v} for v in (0.1, 0.4, 0.7)]
    got = training_profile_norm(items, [load, None, attach, after])
    want = compute_profile_norm([attach(load(d))["vlm_profile"] for d in items])
    assert got["mean"] == want["mean"] and got["std"] == want["std"] and not seen
    assert got["source"] == "profiles of 3 training images"
    assert training_profile_norm(items, [load, None]) is None
    with pytest.raises(ValueError, match="at least one training item"):
        training_profile_norm([], [load, attach])
