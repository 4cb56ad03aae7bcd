"""The segmentation objective of the flow network: flow targets, endpoint times, FlowSegLoss, and its benefit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_FLOW_NET
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss
from monai.utils import set_determinism

from monai_vlmfilm.data.synthetic import generate_sample
from monai_vlmfilm.engines import FlowMatchingPrepareBatch
from monai_vlmfilm.inferers import FlowSegInferer
from monai_vlmfilm.losses import FlowSegLoss, x0_estimate
from monai_vlmfilm.networks import FiLMFlowUNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(b=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(b, 1, size, size, generator=g),
        "label": (torch.rand(b, 1, size, size, generator=g) > 0.8).float(),
    }


@pytest.mark.parametrize(("fraction", "n_end"), [(0.0, 0), (0.5, 4), (0.01, 1), (1.0, 8)])
def test_endpoint_fraction_trains_at_t_equal_T(fraction, n_end):
    torch.manual_seed(0)
    _, target, _, kw = FlowMatchingPrepareBatch(endpoint_fraction=fraction, target="flow")(_batch())
    t = kw["timesteps"]
    assert int((t == 1000).sum()) == n_end
    # at t = T the network input is pure noise: x_t = noise, so x0_hat with the true velocity is the mask
    assert torch.allclose(target["sigma"], t.float() / 1000)
    x0 = target["mask"] * 2 - 1
    assert torch.allclose(x0_estimate(target["velocity"], target["x_t"], target["sigma"]), x0, atol=1e-5)
    with pytest.raises(ValueError, match="endpoint_fraction"):
        FlowMatchingPrepareBatch(endpoint_fraction=1.5)
    with pytest.raises(ValueError, match="target"):
        FlowMatchingPrepareBatch(target="x0")


def test_flow_seg_loss_is_its_definition():
    torch.manual_seed(0)
    inputs, target, _, _ = FlowMatchingPrepareBatch(target="flow", endpoint_fraction=0.5)(_batch())
    v_hat = torch.randn_like(target["velocity"], requires_grad=True)
    loss = FlowSegLoss(velocity_weight=0.7, seg_weight=1.3, logit_scale=3.0)(v_hat, target)
    s = target["sigma"][:, None, None, None]
    logits = 3.0 * (target["x_t"] + s * v_hat)
    expected = 0.7 * torch.mean((v_hat - target["velocity"]) ** 2) + 1.3 * DiceCELoss(sigmoid=True)(
        logits, target["mask"]
    )
    assert torch.allclose(loss, expected)
    loss.backward()
    assert v_hat.grad is not None and float(v_hat.grad.abs().sum()) > 0
    # the true velocity has zero MSE and a near-perfect segmentation
    perfect = FlowSegLoss(seg_weight=0.0)(target["velocity"], target)
    assert float(perfect) == 0.0
    with_cldice = FlowSegLoss(cldice_weight=0.5)(v_hat.detach(), target)
    assert float(with_cldice) > float(FlowSegLoss()(v_hat.detach(), target))


def test_flow_seg_loss_velocity_target_and_errors():
    v, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert torch.allclose(FlowSegLoss()(v, t), torch.nn.functional.mse_loss(v, t))  # old configs keep their meaning
    with pytest.raises(KeyError, match="target='flow'"):
        FlowSegLoss()(v, {"velocity": t})
    with pytest.raises(ValueError, match="weights"):
        FlowSegLoss(velocity_weight=0, seg_weight=0)
    with pytest.raises(ValueError, match="logit_scale"):
        FlowSegLoss(logit_scale=0)


def _data(n: int, size: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image, label, _ = generate_sample(rng, size)
        out.append({"image": torch.from_numpy(image)[None], "label": torch.from_numpy(label.astype(np.float32))[None]})
    return out


def _one_step_dice(net, val) -> float:
    net.eval()
    img = torch.stack([d["image"] for d in val])
    lab = torch.stack([d["label"] for d in val]) > 0.5
    with torch.no_grad():
        pred = FlowSegInferer(num_steps=1, num_samples=1, seed=0)(img, net) >= 0.5
    inter = (pred & lab).sum((1, 2, 3)).float()
    return float((2 * inter / (pred.sum((1, 2, 3)) + lab.sum((1, 2, 3))).clamp_min(1)).mean())


def _train(objective: str, seed: int, iterations: int = 120) -> float:
    set_determinism(seed)
    train, val = _data(24, 48, seed), _data(8, 48, seed + 100)
    net = FiLMFlowUNet(**TINY_FLOW_NET)
    flow = objective == "flowseg"
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=iterations // 3,
        train_data_loader=DataLoader(Dataset(train), batch_size=8, shuffle=True),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 3e-3),
        loss_function=FlowSegLoss(seg_weight=1.0 if flow else 0.0),
        prepare_batch=FlowMatchingPrepareBatch(
            timestep_sampling="logit-normal",
            endpoint_fraction=0.5 if flow else 0.0,
            target="flow" if flow else "velocity",
        ),
    )
    trainer.run()
    dice = _one_step_dice(net, val)
    set_determinism(None)
    return dice


def test_segmentation_objective_beats_velocity_only_at_one_step():
    """Same network, data and 120 iterations through SupervisedTrainer; one Euler step, one sample, as shipped.

    Measured (seeds 0-2): velocity-only 0.23 / 0.28 / 0.25, FlowSegLoss + endpoint 0.52 / 0.55 / 0.68 (gap >= 0.27).
    The bars sit inside the worst seed's figures; seed 0 is the one run here (about 30 s of CPU).
    """
    vel, seg = _train("velocity", 0), _train("flowseg", 0)
    print(f"one-step Dice: velocity-only {vel:.3f}, flow + segmentation loss {seg:.3f}")
    assert seg > 0.4
    assert seg > vel + 0.15
