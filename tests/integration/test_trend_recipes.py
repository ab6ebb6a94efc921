"""Trend rules on real runs: healthy recipes that used to raise false errors, and bugs to catch."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import DigitsClassifier, digits_loader, trainer
from pytorch_lightning.demos.boring_classes import BoringModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from healthmon import HealthMonitor
from healthmon.monitors import GradientNormMonitor


class RecordedBoringModel(BoringModel):
    """Lightning's BoringModel, recording the loss of each micro-batch."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().training_step(batch, batch_idx)
        self.losses.append(float(out["loss"].detach()))
        return out


def test_boring_model_with_a_lucky_first_batch_is_quiet(tmp_path: Any) -> None:
    torch.manual_seed(0)
    mon = HealthMonitor(summary=False)
    model = RecordedBoringModel()
    t = trainer(
        tmp_path,
        [mon],
        max_steps=300,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
    )
    t.fit(model)
    losses = model.losses
    assert t.global_step == 300 and len(losses) == 600
    # the condition that raised loss.divergence: a first loss well below the stationary level
    stationary = sorted(losses[100:])[len(losses[100:]) // 2]
    assert max(losses) > 10 * min(losses[:4]) and stationary > 2 * losses[1]
    assert [a.line() for a in mon.alerts if a.severity != "info"] == []


def test_learning_rate_100x_too_high_is_caught_in_the_first_10_percent(tmp_path: Any) -> None:
    torch.manual_seed(0)
    mon = HealthMonitor(summary=False)
    trainer(tmp_path, [mon], max_steps=300, tensorboard=False).fit(DigitsClassifier(lr=10.0), digits_loader())
    divergence = [a for a in mon.alerts if a.code == "loss.divergence"]
    assert divergence and divergence[0].step < 30, [a.line() for a in mon.alerts]
    assert "blew up" in divergence[0].message
    nonfinite = [a for a in mon.alerts if a.code == "loss.nonfinite"]
    assert nonfinite and divergence[0].step < nonfinite[0].step  # before the loss is NaN


class FullBatchRegression(pl.LightningModule):
    """Least squares with noisy targets, trained by full-batch gradient descent to the optimum."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.linear(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.3)


def regression_data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    w = torch.full((8, 1), 0.25)
    return x, x @ w + torch.randn(n, 1, generator=g)  # noise variance 1: the loss floor is ~1


def test_full_batch_regression_at_its_optimum_is_not_vanishing(tmp_path: Any) -> None:
    torch.manual_seed(0)
    x, y = regression_data()
    model = FullBatchRegression()
    gn = GradientNormMonitor()
    mon = HealthMonitor(monitors=[gn], summary=False)
    t = trainer(tmp_path, [mon], max_steps=300)
    t.fit(model, DataLoader(TensorDataset(x, y), batch_size=len(x)))

    with torch.no_grad():
        final = F.mse_loss(model.linear(x), y).item()
        xb = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        optimum = F.mse_loss(xb @ torch.linalg.lstsq(xb, y).solution, y).item()
    rule = gn.collapse
    assert rule.initial_loss is not None and rule.peak is not None and rule.norm.value is not None
    # the case: the optimum is reached, the gradient vanished, and the floor is above half the
    # initial loss (the old rule's "still high")
    assert abs(final - optimum) < 1e-5 * optimum
    assert rule.peak - rule.norm.value >= 3.0
    assert optimum > 0.5 * rule.initial_loss
    assert [a.line() for a in mon.alerts] == []
