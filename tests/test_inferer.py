"""FlowSegInferer: ODE conventions, output range, uncertainty, seeding, sliding windows, profiles, engines."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_FLOW_NET
from ignite.engine import Events
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import RFlowScheduler

from monai_vlmfilm.engines import ProfilePrepareBatch
from monai_vlmfilm.inferers import FlowSegInferer, cpu_has_native_bf16, dihedral_transforms
from monai_vlmfilm.networks import FiLMFlowUNet
from monai_vlmfilm.profiles import PROFILE_DIM

NET = dict(**TINY_FLOW_NET, use_vlm_film=True, cond_dim=16, film_hidden_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net():
    """An ON network with non-zero output conv and FiLM heads, so outputs depend on noise, image and profile."""
    torch.manual_seed(0)
    n = FiLMFlowUNet(**NET).eval()
    g = torch.Generator().manual_seed(1)
    for name, p in n.named_parameters():
        if name.startswith(("out.2", "film_heads", "profile_encoder")):
            p.data.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("out") else 1.0))
    return n


def data(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, size, size, generator=g), torch.rand(b, PROFILE_DIM, generator=g)


def test_time_grid_and_solvers():
    inf = FlowSegInferer(num_steps=2)
    assert inf.timesteps() == [1000.0, 500.0, 0.0]
    seen = []

    def vel(x, timesteps):  # v(t) = t / T: exact flow from s = 1 to 0 adds the integral of s ds = 0.5
        seen.append(float(timesteps[0]))
        return torch.ones_like(x[:, :1]) * timesteps[:, None, None, None] / 1000

    noise, image = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    euler = inf.integrate(vel, image, noise, None)
    assert seen == [1000.0, 500.0] and torch.allclose(euler, torch.full_like(euler, 0.75))  # left Riemann sum
    seen.clear()
    heun = FlowSegInferer(num_steps=2, solver="heun").integrate(vel, image, noise, None)
    # trapezoid on [1000, 500] (0.5 * (1 + 0.5) / 2), then an Euler step into t = 0 (0.5 * 0.5): no call at t = 0
    assert seen == [1000.0, 500.0, 500.0] and torch.allclose(heun, torch.full_like(heun, 0.625))


@pytest.mark.parametrize("num_steps", [1, 2, 3, 5])
def test_heun_is_exact_on_a_known_field(num_steps):
    """The ideal field of one target mask, v(x, s) = (x0 - x) / s, carries any start to x0 exactly.

    It is singular at s = 0, where the old final Heun correction evaluated it: the result was inf / nan.
    """
    x0 = torch.tensor([[[[-1.0, 1.0], [1.0, -1.0]]]])
    calls = []

    def ideal(x, timesteps):
        s = timesteps[:, None, None, None] / 1000
        calls.append(float(timesteps[0]))
        return (x0 - x[:, :1]) / s

    noise = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for solver, n_calls in (("heun", 2 * num_steps - 1), ("euler", num_steps)):
        calls.clear()
        out = FlowSegInferer(num_steps=num_steps, solver=solver).integrate(ideal, torch.zeros(1, 1, 2, 2), noise, None)
        assert torch.allclose(out, x0, atol=1e-5), (solver, out)
        assert len(calls) == n_calls and min(calls) > 0


def test_euler_matches_rflow_scheduler_step(net):
    image, profile = data()
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    sched = RFlowScheduler(1000)
    sched.set_timesteps(4)
    x = noise.clone()
    nxt = torch.cat([sched.timesteps[1:], torch.tensor([0])])
    with torch.no_grad():
        for t, n in zip(sched.timesteps, nxt):
            v = net(torch.cat([x, image], 1), timesteps=t.expand(2), profile=profile)
            x, _ = sched.step(v, t, x, n)
        ours = FlowSegInferer(num_steps=4).integrate(net, image, noise, profile)
    assert torch.allclose(ours, x, atol=1e-5)


def test_output_range_uncertainty_and_seed(net):
    image, profile = data()
    rng_before = torch.get_rng_state()
    with torch.no_grad():
        out = FlowSegInferer(num_steps=2, seed=3)(image, net, profile=profile)
        again = FlowSegInferer(num_steps=2, seed=3)(image, net, profile=profile)
        other = FlowSegInferer(num_steps=2, seed=4)(image, net, profile=profile)
        unc = FlowSegInferer(num_steps=2, num_samples=3, seed=3, return_uncertainty=True)(image, net, profile=profile)
        one = FlowSegInferer(num_steps=2, seed=3, return_uncertainty=True)(image, net, profile=profile)
    assert torch.equal(torch.get_rng_state(), rng_before)  # a seeded inferer leaves the global RNG alone
    assert out.shape == (2, 1, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert 0 < out.mean() < 1 and out.std() > 0
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert unc.shape == (2, 2, 32, 32)
    assert (unc[:, 1] >= 0).all() and unc[:, 1].max() > 0 and unc[:, 1].max() <= 0.5
    assert torch.equal(one[:, :1], out) and torch.count_nonzero(one[:, 1:]) == 0  # one sample: zero spread
    # the first of three samples uses the same noise as the single-sample run, the mean differs
    assert not torch.equal(unc[:, :1], out)


def test_sliding_window_equals_full_image_and_routes_profiles(net):
    image, profile = data(b=2, size=64)
    with torch.no_grad():
        full = FlowSegInferer(num_steps=2, seed=0, num_samples=2)(image, net, profile=profile)
        sw = FlowSegInferer(num_steps=2, seed=0, num_samples=2, roi_size=(64, 64))(image, net, profile=profile)
        assert torch.equal(full, sw)
        tiles = FlowSegInferer(num_steps=2, seed=0, roi_size=32, overlap=0.0, sw_batch_size=3)
        both = tiles(image, net, profile=profile)  # windows of both images share sw batches
        solo = tiles(image[:1], net, profile=profile[:1])  # image 0 draws the same noise alone
        same = tiles(image, net, profile=profile[:1].expand(2, -1))
    assert both.shape == (2, 1, 64, 64) and both.min() >= 0 and both.max() <= 1
    # batch composition changes CPU kernels' summation order: compare to float tolerance
    assert torch.allclose(both[:1], solo, atol=1e-5) and torch.allclose(same[:1], both[:1], atol=1e-5)
    assert (same[1:] - both[1:]).abs().max() > 1e-2  # image 1's windows got image 1's profile


def test_profile_from_metatensor_meta(net):
    image, profile = data()
    mt = MetaTensor(image.clone())
    mt.meta["vlm_profile"] = profile
    inf = FlowSegInferer(num_steps=2, seed=0)
    with torch.no_grad():
        explicit = inf(image, net, profile=profile)
        from_meta = inf(mt, net)
        null = inf(image, net)
        mt_single = MetaTensor(image[:1].clone())
        mt_single.meta["vlm_profile"] = profile[0].numpy()  # unbatched meta, as in MONAI Label
        single = inf(mt_single, net)
    assert isinstance(from_meta, MetaTensor) and torch.equal(from_meta.as_tensor(), explicit)
    assert not torch.equal(null, explicit)
    assert torch.allclose(single, explicit[:1], atol=1e-5)  # batch of 1 vs 2: float tolerance


def test_plain_diffusion_unet_and_errors():
    torch.manual_seed(0)
    plain = DiffusionModelUNet(
        **{k: v for k, v in NET.items() if k not in ("use_vlm_film", "cond_dim", "film_hidden_dim")}
    )
    image, _ = data()
    with torch.no_grad():
        out = FlowSegInferer(num_steps=1, seed=0)(image, plain)
    assert out.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="input channels"):
        FlowSegInferer()(torch.rand(1, 3, 32, 32), plain)
    with pytest.raises(ValueError, match="solver"):
        FlowSegInferer(solver="rk4")


def test_3d():
    torch.manual_seed(0)
    net3 = FiLMFlowUNet(**dict(NET, spatial_dims=3)).eval()
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        out = FlowSegInferer(num_steps=1, seed=0, roi_size=(16, 16, 8))(image, net3, profile=torch.rand(PROFILE_DIM))
    assert out.shape == (1, 1, 16, 16, 16) and 0 <= out.min() and out.max() <= 1


def test_inside_supervised_evaluator(net):
    image, profile = data(b=4)
    items = [{"image": image[i], "label": (image[i] > 0.5).float(), "vlm_profile": profile[i]} for i in range(4)]
    inferer = FlowSegInferer(num_steps=2, seed=0)
    preds = []
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=DataLoader(Dataset(items), batch_size=4),
        network=net,
        prepare_batch=ProfilePrepareBatch(),
        inferer=inferer,
        decollate=False,
    )
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output["pred"]))
    received = []
    hook = net.profile_encoder.register_forward_hook(lambda m, args, out: received.append(args[0]))
    evaluator.run()
    hook.remove()
    assert received and all(torch.equal(r, profile) for r in received)  # the evaluator's profile reached the network
    with torch.no_grad():
        direct = inferer(image, net, profile=profile)
        null = inferer(image, net)
    assert torch.equal(preds[0], direct) and not torch.equal(preds[0], null)


@pytest.mark.parametrize(
    ("dims", "mode", "count"), [(2, "none", 1), (2, "flip", 4), (2, "dihedral", 8), (3, "flip", 8)]
)
def test_tta_transforms_are_invertible_and_distinct(dims, mode, count):
    shape = (2, 3, 5, 7) if dims == 2 else (1, 2, 3, 4, 5)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    pairs = dihedral_transforms(dims, mode)
    assert len(pairs) == count
    seen = []
    for fwd, inv in pairs:
        y = fwd(x)
        assert torch.equal(inv(y), x)
        assert not any(y.shape == z.shape and torch.equal(y, z) for z in seen)  # each copy is a different view
        seen.append(y)
    with pytest.raises(ValueError, match="tta"):
        dihedral_transforms(2, "rot45")


def _copy_image(x, timesteps):
    """One Euler step from t = T with v = (2 * image - 1) - x_t lands on 2 * image - 1: probability = image."""
    return (2 * x[:, 1:] - 1) - x[:, :1]


@pytest.mark.parametrize("tta", ["none", "flip", "dihedral"])
def test_tta_maps_every_copy_back(tta):
    """An equivariant 'network' must give the image itself under any TTA, also on a non-square image."""
    image = torch.rand(2, 1, 12, 20, generator=torch.Generator().manual_seed(3))
    inf = FlowSegInferer(num_steps=1, tta=tta, mask_channels=1, return_uncertainty=True, seed=0)
    out = inf(image, _copy_image)
    assert out.shape == (2, 2, 12, 20)
    assert torch.allclose(out[:, :1], image, atol=1e-6) and float(out[:, 1:].abs().max()) < 1e-6


def test_whole_image_padding_to_the_network_multiple():
    seen = []

    def needs_multiple_of_8(x, timesteps):
        assert x.shape[2] % 8 == 0 and x.shape[3] % 8 == 0, x.shape
        seen.append(tuple(x.shape[2:]))
        return _copy_image(x, timesteps)

    image = torch.rand(1, 1, 30, 17, generator=torch.Generator().manual_seed(4))
    out = FlowSegInferer(num_steps=1, mask_channels=1, divisible_by=8, tta="dihedral")(image, needs_multiple_of_8)
    assert out.shape == image.shape and torch.allclose(out, image, atol=1e-6)  # replicate-padding cropped off exactly
    assert set(seen) == {(32, 24), (24, 32)}
    with pytest.raises(AssertionError):
        FlowSegInferer(num_steps=1, mask_channels=1)(image, needs_multiple_of_8)


def test_channels_last_gives_the_same_probabilities(net):
    """The CPU default of inference.yaml: the same segmentation in another memory layout (weights converted once)."""
    import copy

    image, profile = data(b=2, size=40, seed=3)
    ref_net, cl_net = copy.deepcopy(net), copy.deepcopy(net)  # copies: the module-scoped fixture stays as it is
    kw = dict(num_steps=2, num_samples=2, seed=4, tta="flip", return_uncertainty=True)
    with torch.no_grad():
        ref = FlowSegInferer(**kw)(image, ref_net, profile)
        got = FlowSegInferer(channels_last=True, **kw)(image, cl_net, profile)
        again = FlowSegInferer(channels_last=True, **kw)(image, cl_net, profile)  # already converted: same again
    conv = cl_net.conv_in.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert ref_net.conv_in.conv.weight.is_contiguous()  # the default layout is left alone
    # float32 rounding differs between the layouts (measured up to 1.5e-5 here): the masks do not
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    mean, ref_mean = got[:, :1], ref[:, :1]
    decided = (ref_mean - 0.5).abs() > 1e-4
    assert torch.equal((mean > 0.5)[decided], (ref_mean > 0.5)[decided]) and decided.float().mean() > 0.9
    assert torch.equal(got, again)
    assert got.is_contiguous()
    # 3D inputs have no channels_last layout: the option leaves them as they are
    net3 = FiLMFlowUNet(**{**TINY_FLOW_NET, "spatial_dims": 3}).eval()
    with torch.no_grad():
        out3 = FlowSegInferer(channels_last=True, num_steps=1, seed=0)(torch.rand(1, 1, 16, 16, 16), net3)
    assert out3.shape == (1, 1, 16, 16, 16)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no hardware bfloat16 (AMX / AVX-512 BF16)")
def test_cpu_bf16_runs_the_network_in_bfloat16_with_the_same_masks(net):
    """The CPU default of inference.yaml on a CPU with hardware bf16: the network's convolutions run in bfloat16
    (checked on the output convolution), the ODE state and the probabilities stay float32, the masks agree."""
    image, profile = data(b=2, size=40, seed=3)
    dtypes: list[torch.dtype] = []
    hook = net.out[-1].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    try:
        with torch.no_grad():
            ref = FlowSegInferer(num_steps=2, seed=4)(image, net, profile)
            got = FlowSegInferer(num_steps=2, seed=4, cpu_bf16=True)(image, net, profile)
    finally:
        hook.remove()
    assert dtypes == [torch.float32] * 2 + [torch.bfloat16] * 2  # two steps each
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert float((got - ref).abs().max()) < 0.05  # bf16 has 8 mantissa bits
    decided = (ref - 0.5).abs() > 0.05
    assert torch.equal((got > 0.5)[decided], (ref > 0.5)[decided]) and decided.float().mean() > 0.8
    assert not torch.is_autocast_enabled("cpu")  # nothing leaks out of the inferer's autocast region
    # off (the default), the inferer leaves a caller's own CPU autocast alone
    dtypes.clear()
    hook = net.out[-1].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            FlowSegInferer(num_steps=1, seed=4)(image, net, profile)
    finally:
        hook.remove()
    assert dtypes == [torch.bfloat16]


def test_cpu_bf16_is_ignored_where_the_cpu_lacks_it(net, monkeypatch):
    """Without hardware bf16 (emulated bf16 is slower than float32) the option is off and the output bit-identical."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert not cpu_has_native_bf16()
    inferer = FlowSegInferer(num_steps=1, seed=4, cpu_bf16=True)
    assert inferer.cpu_bf16 is False
    image, profile = data(b=1, size=32, seed=5)
    with torch.no_grad():
        assert torch.equal(inferer(image, net, profile), FlowSegInferer(num_steps=1, seed=4)(image, net, profile))


def test_compile_mode_gives_the_eager_probabilities_and_compiles_once(net):
    """``compile_mode`` runs a ``torch.compile``'d module of the same weights (inductor's C++ backend on this CPU):
    the probabilities match the eager network's, Heun's two passes per step stay distinct, the compiled module is
    built once per network, and the bundle's CLI strings for off leave the network as it is."""
    import copy

    image, profile = data(b=1, size=32, seed=6)
    cnet = copy.deepcopy(net)  # the compiled module keeps a reference: leave the shared fixture untouched
    kw = dict(num_steps=2, solver="heun", num_samples=2, seed=4, tta="flip", return_uncertainty=True)
    inferer = FlowSegInferer(compile_mode="default", **kw)
    with torch.no_grad():
        ref = FlowSegInferer(**kw)(image, cnet, profile)
        got = inferer(image, cnet, profile)
        again = inferer(image, cnet, profile)
    assert len(inferer._compiled) == 1 and inferer._network_for_call(cnet) is inferer._compiled[cnet]
    assert inferer._network_for_call(cnet) is not cnet
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)  # fused kernels round float32 differently
    torch.testing.assert_close(again, got, rtol=0, atol=1e-6)
    assert float(ref[:, 1:].max()) > 0  # two noise draws: the spread is there, so the copies did not alias
    import pickle

    clone = pickle.loads(pickle.dumps(inferer))  # picklable; the compiled modules are not carried along
    assert clone.compile_mode == "default" and len(clone._compiled) == 0
    for off in (None, "none", "False", ""):
        plain = FlowSegInferer(compile_mode=off, **kw)
        assert plain.compile_mode is None and plain._network_for_call(cnet) is cnet


def test_profiles_beyond_the_training_range_are_named_in_a_warning(net, caplog):
    """A FiLM network with training statistics: a profile beyond the encoder's clip gets a warning naming the image
    and the feature; profiles in range, the fallback flag, OFF networks and the switch turned off stay silent."""
    import copy
    import logging

    from monai_vlmfilm.profiles.schema import FALLBACK_INDEX, VECTOR_FIELDS

    film = copy.deepcopy(net)
    film.profile_encoder.set_normalization(torch.full((PROFILE_DIM,), 0.5), torch.full((PROFILE_DIM,), 0.05))
    image, _ = data(b=3, size=32, seed=6)
    profile = torch.full((3, PROFILE_DIM), 0.5)
    profile[1, 2] = 0.9  # 8 standard deviations on feature 2
    profile[2, FALLBACK_INDEX] = 1.0  # a fallback profile: reported elsewhere, not here
    meta_image = MetaTensor(image, meta={"filename_or_obj": ["a.png", "b.png", "c.png"]})
    with caplog.at_level(logging.WARNING, logger="monai_vlmfilm.inferers"), torch.no_grad():
        FlowSegInferer(num_steps=1, seed=0)(meta_image, film, profile)
    warned = [r.getMessage() for r in caplog.records if r.name == "monai_vlmfilm.inferers"]
    assert len(warned) == 1 and warned[0].startswith("b.png:") and VECTOR_FIELDS[2] in warned[0] and "+8.0" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="monai_vlmfilm.inferers"), torch.no_grad():
        FlowSegInferer(num_steps=1, seed=0, check_profile_range=False)(meta_image, film, profile)
        FlowSegInferer(num_steps=1, seed=0, check_profile_range="false")(meta_image, film, profile)  # a CLI value
        FlowSegInferer(num_steps=1, seed=0)(image, film, torch.full((3, PROFILE_DIM), 0.6))  # 2 sd: in range
        off = FiLMFlowUNet(**{**NET, "use_vlm_film": False}).eval()
        FlowSegInferer(num_steps=1, seed=0)(image, off, profile)
    assert not [r for r in caplog.records if r.name == "monai_vlmfilm.inferers"]
    # without file names the batch position names the image
    with caplog.at_level(logging.WARNING, logger="monai_vlmfilm.inferers"), torch.no_grad():
        FlowSegInferer(num_steps=1, seed=0)(image, film, profile)
    assert [r.getMessage()[:12] for r in caplog.records if r.name == "monai_vlmfilm.inferers"] == ["batch item 1"]


def test_start_from_a_prior_at_an_intermediate_time():
    """``start_time`` < 1 starts the ODE from ``(1 - s) * (2 * init - 1) + s * noise`` at ``t = s * T``."""
    g = torch.Generator().manual_seed(7)
    image, init = torch.rand(2, 1, 8, 12, generator=g), torch.rand(2, 1, 8, 12, generator=g)
    seen = []

    def still(x, timesteps):  # v = 0: the output is the start state itself
        seen.append(float(timesteps[0]))
        return torch.zeros_like(x[:, :1])

    inf = FlowSegInferer(num_steps=2, start_time=0.4, mask_channels=1, divisible_by=1, seed=3, num_samples=2)
    assert inf.timesteps() == [400.0, 200.0, 0.0]
    out = inf(image, still, init=init)
    assert seen == [400.0, 200.0]
    noise = torch.randn(2, 2, 8, 12, generator=torch.Generator().manual_seed(3)).reshape(2, 2, 1, 8, 12)
    expected = ((0.6 * (2 * init[:, None] - 1) + 0.4 * noise + 1) / 2).clamp(0, 1).mean(1)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("tta", ["none", "dihedral"])
def test_prior_start_moves_with_the_image_under_tta_and_padding(tta):
    """The prior is flipped / rotated and padded with its image: an almost-clean start returns the prior itself."""
    g = torch.Generator().manual_seed(8)
    image, init = torch.rand(1, 1, 10, 14, generator=g), torch.rand(1, 1, 10, 14, generator=g)
    inf = FlowSegInferer(num_steps=1, start_time=1e-6, mask_channels=1, divisible_by=8, tta=tta, seed=0)
    out = inf(image, lambda x, timesteps: torch.zeros_like(x[:, :1]), init=init)
    assert out.shape == init.shape and torch.allclose(out, init, atol=1e-5)
    # MONAI inputs: a MetaTensor image keeps its meta data, a MetaTensor prior is read as plain data
    out_m = inf(
        MetaTensor(image, meta={"note": "x"}), lambda x, timesteps: torch.zeros_like(x[:, :1]), init=MetaTensor(init)
    )
    assert isinstance(out_m, MetaTensor) and out_m.meta["note"] == "x" and torch.allclose(out_m.as_tensor(), out)


def test_prior_start_checks_its_arguments():
    image = torch.rand(1, 1, 8, 8)
    still = lambda x, timesteps: torch.zeros_like(x[:, :1])  # noqa: E731
    with pytest.raises(ValueError, match="start_time"):
        FlowSegInferer(start_time=0.0)
    with pytest.raises(ValueError, match="needs init"):
        FlowSegInferer(start_time=0.5, mask_channels=1)(image, still)
    with pytest.raises(ValueError, match="needs init"):
        FlowSegInferer(mask_channels=1)(image, still, init=torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="init must have shape"):
        FlowSegInferer(start_time=0.5, mask_channels=1)(image, still, init=torch.rand(1, 1, 4, 8))
