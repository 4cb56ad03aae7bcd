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
from monai_vlmfilm.inferers import FlowSegInferer
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
    assert seen == [1000.0, 500.0, 500.0, 0.0] and torch.allclose(heun, torch.full_like(heun, 0.5))  # trapezoid


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
