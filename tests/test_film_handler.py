"""FiLMStatsHandler on real MONAI engines: values, where they land, console / TensorBoard pick-up, cache rate."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from conftest import TINY_FLOW_NET
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.handlers import StatsHandler, TensorBoardStatsHandler
from monai.transforms import Compose, EnsureTyped

from monai_vlmfilm.engines import FlowMatchingPrepareBatch
from monai_vlmfilm.handlers import FiLMStatsHandler
from monai_vlmfilm.networks import FiLMFlowUNet
from monai_vlmfilm.profiles import FALLBACK_INDEX, PROFILE_DIM, VECTOR_FIELDS
from monai_vlmfilm.profiles.store import ProfileStore
from monai_vlmfilm.transforms import AttachVLMProfiled

NET = dict(**TINY_FLOW_NET, cond_dim=16, film_hidden_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(on=True):
    torch.manual_seed(0)
    net = FiLMFlowUNet(use_vlm_film=on, **NET)
    g = torch.Generator().manual_seed(1)
    for name, p in net.named_parameters():
        if name.startswith(("film_heads", "profile_encoder")):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net


def items(n=4, fallback=(1, 0, 0, 0)):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p = torch.rand(PROFILE_DIM, generator=g)
        p[FALLBACK_INDEX] = float(fallback[i % len(fallback)])
        out.append({"image": torch.rand(1, 16, 16, generator=g), "label": torch.zeros(1, 16, 16), "vlm_profile": p})
    return out


def trainer(net, data, handlers, batch_size=4, epochs=1):
    return SupervisedTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=DataLoader(Dataset(data), batch_size=batch_size),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0),  # lr 0: the recorded stats stay comparable
        loss_function=torch.nn.MSELoss(),
        prepare_batch=FlowMatchingPrepareBatch(),
        train_handlers=handlers,
    )


def test_values_match_network_and_batch(tmp_path, caplog):
    net, data = make_net(), items()
    writer_dir = tmp_path / "tb"
    # StatsHandler / TensorBoardStatsHandler attached BEFORE the FiLM handler: values are already in metrics
    console = io.StringIO()
    handlers = [
        StatsHandler(name="film_test_stats", iteration_log=False, output_transform=lambda x: None),
        TensorBoardStatsHandler(log_dir=str(writer_dir), iteration_log=False, output_transform=lambda x: None),
        FiLMStatsHandler(),
    ]
    logging.getLogger("film_test_stats").addHandler(logging.StreamHandler(console))
    t = trainer(net, data, handlers)
    with caplog.at_level(logging.INFO):
        t.run()
    m = t.state.metrics
    profiles = torch.stack([d["vlm_profile"] for d in data])
    with torch.no_grad():  # lr 0: the network's FiLM parameters for the batch, computed independently
        film = net.film_parameters(profiles)
    assert sorted(film) == [0, 1, 2]
    for i, (gamma, beta, _) in film.items():
        assert m[f"film/stage{i}/gamma_mean"] == pytest.approx(gamma.mean().item(), rel=1e-5, abs=1e-7)
        assert m[f"film/stage{i}/beta_absmax"] == pytest.approx(beta.abs().max().item(), rel=1e-5)
        assert m[f"film/stage{i}/gamma_std"] > 0
        expected = torch.sigmoid(
            net.film_heads[str(i)].gate_scale * torch.stack([d["vlm_profile"][0] for d in data])
            + net.film_heads[str(i)].gate_bias
        )
        assert m[f"film/stage{i}/gate_mean"] == pytest.approx(expected.mean().item(), rel=1e-5)
        assert m[f"film/stage{i}/gate_min"] == pytest.approx(expected.min().item(), rel=1e-5)
    assert m["film/fallback_rate"] == pytest.approx(0.25)
    assert m["film/profile/difficulty_mean"] == pytest.approx(profiles[:, 0].mean().item(), rel=1e-5)
    assert m["film/profile/confidence_spread"] == pytest.approx(profiles[:, 1].std(unbiased=False).item(), rel=1e-5)
    assert {f"film/profile/{f}_mean" for f in VECTOR_FIELDS if f != "is_fallback"} <= set(m)
    assert t.state.film_stats["film/fallback_rate"] == pytest.approx(0.25)
    logged = caplog.text
    assert "FiLM: stage0/gamma_mean=" in logged  # console line of the handler
    assert "film/stage2/gate_mean" in console.getvalue()  # MONAI's StatsHandler printed it with the epoch metrics
    assert list(writer_dir.glob("events.out.tfevents.*"))  # TensorBoardStatsHandler wrote the epoch scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(writer_dir))
    acc.Reload()
    assert "film/stage0/beta_std" in acc.Tags()["scalars"]


def test_epoch_running_mean_and_log_every():
    net, data = make_net(), items(n=8, fallback=(1, 1, 1, 1, 0, 0, 0, 0))
    t = trainer(net, data, [FiLMStatsHandler(log_every=1)], batch_size=4)
    t.run()
    assert t.state.metrics["film/fallback_rate"] == pytest.approx(0.5)  # mean of batch rates 1.0 and 0.0
    assert t.state.film_stats["film/fallback_rate"] == pytest.approx(0.0)  # the latest iteration
    t2 = trainer(make_net(), data, [FiLMStatsHandler(log_every=2)], batch_size=4)
    t2.run()
    assert t2.state.metrics["film/fallback_rate"] == pytest.approx(0.0)  # only iteration 2 was computed


def test_off_network_and_no_profile():
    data = items()
    t = trainer(make_net(on=False), data, [FiLMStatsHandler()])
    t.run()
    assert not any(k.startswith("film/stage") for k in t.state.metrics)
    assert "film/fallback_rate" in t.state.metrics  # profile stats still come from the batch
    bare = [{k: v for k, v in d.items() if k != "vlm_profile"} for d in data]
    t = trainer(make_net(on=False), bare, [FiLMStatsHandler()])
    t.run()
    assert t.state.film_stats == {} and not any(k.startswith("film/") for k in t.state.metrics)


def test_cache_hit_rate_from_transform(tmp_path):
    rng = np.random.default_rng(0)
    raw = [{"image": rng.random((1, 16, 16)).astype(np.float32), "label": np.zeros((1, 16, 16), np.float32)}]
    raw = raw * 2 + [{"image": rng.random((1, 16, 16)).astype(np.float32), "label": raw[0]["label"]}]
    attach = AttachVLMProfiled(keys="image", store=ProfileStore(tmp_path / "cache"), profiler="heuristic")
    transform = Compose([attach, EnsureTyped(keys=["image", "label"])])
    data = [transform(dict(d)) for d in raw]  # 2 misses (distinct images), 1 hit
    handler = FiLMStatsHandler(profile_stats=attach)
    t = trainer(make_net(), data, [handler], batch_size=3)
    t.run()
    expected = attach.stats()["hits"] / (attach.stats()["hits"] + attach.stats()["misses"])
    assert t.state.metrics["film/cache_hit_rate"] == pytest.approx(expected)
    assert 0 < expected < 1
    assert FiLMStatsHandler(profile_stats={"hits": 3, "misses": 1}).compute(t)["film/cache_hit_rate"] == 0.75


def test_hooks_live_only_for_the_computed_iterations():
    """The handler observes the network through forward hooks it registers and removes: none stay behind."""
    net, data = make_net(), items(n=8)
    handler = FiLMStatsHandler(log_every=2)
    heads = [net.profile_encoder, *net.film_heads.values()]
    during = []
    t = trainer(net, data, [handler], batch_size=2)
    from ignite.engine import Events

    t.add_event_handler(Events.ITERATION_STARTED, lambda e: during.append(sum(len(m._forward_hooks) for m in heads)))
    t.run()
    assert during == [0, len(heads), 0, len(heads)]  # hooks only for iterations 2 and 4 (log_every=2)
    assert all(not m._forward_hooks for m in heads) and t.state.film_stats
