"""Manual optimisation with two optimizers (a GAN).

Each optimizer step has its own loss, norms and trend rules.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import trainer
from pytorch_lightning.plugins.precision import MixedPrecision
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from healthmon import HealthMonitor
from healthmon.monitors import GradientNormMonitor
from healthmon.numerics.trends import rule_state


class GAN(pl.LightningModule):
    """A tiny GAN on a 2-D mixture of four Gaussians.

    Records each optimizer step's loss and the brute-force norm of that optimizer's gradients
    (Lightning counts each step as a global step).
    """

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
        self.disc = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
        self.losses: dict[int, float] = {}
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [
            p.grad.reshape(-1) for g in optimizer.param_groups for p in g["params"] if p.grad is not None
        ]
        self.norms[self.trainer.global_step] = float(torch.linalg.vector_norm(torch.cat(grads)))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_d, opt_g = self.optimizers()
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        fake = self.gen(torch.randn(real.shape[0], 4))
        d_loss = F.binary_cross_entropy_with_logits(
            self.disc(real), ones
        ) + F.binary_cross_entropy_with_logits(self.disc(fake.detach()), zeros)
        self.losses[self.trainer.global_step] = float(d_loss)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(self.disc(fake), ones)
        self.losses[self.trainer.global_step] = float(g_loss)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.Adam(self.disc.parameters(), lr=2e-3, betas=(0.5, 0.999)),
            torch.optim.Adam(self.gen.parameters(), lr=2e-3, betas=(0.5, 0.999)),
        ]


def mixture_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    data = centers[torch.randint(0, 4, (4096,), generator=g)] + 0.2 * torch.randn(4096, 2, generator=g)
    return DataLoader(TensorDataset(data), batch_size=64, shuffle=True, generator=g)


def fit(
    tmp_path: Any, mon: Any, *, max_steps: int, model: GAN | None = None, **kwargs: Any
) -> tuple[GAN, dict[str, dict[int, float]]]:
    torch.manual_seed(0)
    model = model or GAN()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path, [mon], max_steps=max_steps, **kwargs)
        t.fit(model, mixture_loader())
    acc = ea.EventAccumulator(t.logger.log_dir, size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return model, {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_each_optimizer_step_logs_its_own_loss_and_norm(tmp_path: Any, precision: str) -> None:
    mon = HealthMonitor(summary=False)
    plugins = (
        [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
        if precision == "16-mixed"
        else []
    )
    model, tags = fit(tmp_path, mon, max_steps=300, plugins=plugins)
    assert [a.line() for a in mon.alerts if a.severity != "info"] == []
    # optimizer 0 (the discriminator) steps first in each batch, optimizer 1 (the generator) second
    series = {
        0: ("healthmon/loss", "healthmon/grad/norm"),
        1: ("healthmon/optimizer_1/loss", "healthmon/optimizer_1/grad/norm"),
    }
    for index, (loss_tag, norm_tag) in series.items():
        steps = list(range(index, 300, 2))
        assert sorted(tags[loss_tag]) == steps and sorted(tags[norm_tag]) == steps
        for step in steps:
            assert tags[loss_tag][step] == model.losses[step]  # not d_loss + g_loss, not scaled
            assert tags[norm_tag][step] == pytest.approx(model.norms[step], rel=1e-5)
    gn = mon.monitor(GradientNormMonitor)
    assert gn is not None and set(gn._rules) == {0, 1}


def test_every_optimizer_logs_on_the_logging_cadence(tmp_path: Any) -> None:
    # each optimizer step is a global step: the generator only steps on odd ones
    _, tags = fit(tmp_path, HealthMonitor(summary=False), max_steps=200, log_every_n_steps=50)
    assert sorted(tags["healthmon/loss"]) == [0, 50, 100, 150]
    assert sorted(tags["healthmon/optimizer_1/loss"]) == [1, 51, 101, 151]
    assert sorted(tags["healthmon/optimizer_1/grad/norm"]) == [1, 51, 101, 151]


def test_trend_rules_are_kept_and_checkpointed_per_optimizer(tmp_path: Any) -> None:
    gn = GradientNormMonitor()
    fit(tmp_path, HealthMonitor(monitors=[gn], summary=False), max_steps=60)
    saved = gn.state_dict()
    assert set(saved["optimizers"]) == {"0", "1"}
    # two separate series: the generator's running level is not the discriminator's
    assert rule_state(gn.rules(0)["spike"]) != rule_state(gn.rules(1)["spike"])
    restored = GradientNormMonitor()
    restored.load_state_dict(saved)
    for index in (0, 1):
        for name, rule in gn.rules(index).items():
            assert rule_state(restored.rules(index)[name]) == rule_state(rule), (index, name)


class RunawayGenerator(GAN):
    """The sick twin: the generator's SGD learning rate is far too high (50)."""

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.Adam(self.disc.parameters(), lr=2e-3, betas=(0.5, 0.999)),
            torch.optim.SGD(self.gen.parameters(), lr=50.0),
        ]


def test_a_runaway_optimizer_is_named(tmp_path: Any) -> None:
    mon = HealthMonitor(summary=False)
    fit(tmp_path, mon, max_steps=300, model=RunawayGenerator())
    generator = [a for a in mon.alerts if a.where == "optimizer 1" and a.severity != "info"]
    assert generator, [a.line() for a in mon.alerts]
    assert all("(optimizer 1)" in a.message for a in generator)
