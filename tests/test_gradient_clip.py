"""GradientClipHandler inside MONAI's SupervisedTrainer: clips between backward and step, with and without AMP."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from monai_vlmfilm.handlers import GradientClipHandler


@pytest.mark.parametrize("max_norm", [0.5, 0.0])
def test_clips_the_step_the_optimizer_takes(max_norm):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    data = [{"image": torch.randn(8, 4) * 100, "label": torch.randn(8, 1) * 100} for _ in range(3)]
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
        loss_function=torch.nn.MSELoss(),
    )
    GradientClipHandler(max_norm=max_norm).attach(trainer)
    norms, steps = [], []

    @trainer.on(IterationEvents.BACKWARD_COMPLETED)
    def _after_clip(engine):  # registered after the clip handler: sees the gradients the optimizer will use
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in net.parameters()])))

    before = {}

    @trainer.on(Events.ITERATION_STARTED)
    def _snapshot(engine):
        before["w"] = [p.detach().clone() for p in net.parameters()]

    @trainer.on(Events.ITERATION_COMPLETED)
    def _step(engine):
        steps.append(float(torch.cat([(p - q).flatten() for p, q in zip(net.parameters(), before["w"])]).norm()))

    trainer.run()
    assert len(norms) == 3
    if max_norm > 0:
        assert all(n <= max_norm + 1e-4 for n in norms) and all(s <= max_norm + 1e-4 for s in steps)  # SGD lr 1
        assert trainer.state.grad_norm > max_norm  # the unclipped norm is reported
    else:
        assert max(norms) > 10  # off: nothing clipped
