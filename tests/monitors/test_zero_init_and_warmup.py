"""Structural zeros and warm-up from a learning rate of 0: healthy recipes that must stay quiet.

LoRA's ``B = 0`` makes A's gradient exactly zero until B has moved once; a linear warm-up from 0
asks for no update at its first step. Neither is a bug; a gradient that stays zero is.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import DigitsClassifier, digits_loader, trainer
from pytorch_lightning import LightningModule
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from healthmon import GradientUnderflowMonitor, HealthMonitor
from healthmon.monitors.bundle import default_monitors
from healthmon.monitors.underflow import TAG_STALE_DTYPE


def health(underflow_every: int, on_alert: str = "raise") -> HealthMonitor:
    """Every default monitor; the underflow monitor counting every ``underflow_every`` steps."""
    monitors = [m for m in default_monitors() if not isinstance(m, GradientUnderflowMonitor)]
    return HealthMonitor(
        monitors=[*monitors, GradientUnderflowMonitor(every_n_steps=underflow_every)],
        on_alert=on_alert,  # type: ignore[arg-type]
        summary=False,
    )


def linear_warmup(optimizer: torch.optim.Optimizer, steps: int) -> dict[str, Any]:
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class LoRAClassifier(LightningModule):
    """A frozen base layer with a rank-4 adapter (A random, B = 0) and a trainable head.

    ``rounded=True`` is the sick twin: the adapter's input is quantised with ``torch.round``, so
    A's gradient is exactly zero forever.
    """

    def __init__(self, *, rounded: bool = False, warmup: int | None = None) -> None:
        super().__init__()
        self.base = nn.Linear(64, 32)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(4, 64) / 8)
        self.lora_b = nn.Parameter(torch.zeros(32, 4))
        self.head = nn.Linear(32, 10)
        self.rounded, self.warmup = rounded, warmup
        self.a_grad_zero: list[bool] = []
        self.lrs: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x @ self.lora_a.T
        if self.rounded:
            low = torch.round(low)
        return self.head(F.relu(self.base(x) + 2.0 * low @ self.lora_b.T))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        assert self.lora_a.grad is not None
        self.a_grad_zero.append(bool((self.lora_a.grad == 0).all()))
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def configure_optimizers(self) -> Any:
        params = [self.lora_a, self.lora_b, *self.head.parameters()]
        optimizer = torch.optim.AdamW(params, lr=3e-3)
        return optimizer if self.warmup is None else linear_warmup(optimizer, self.warmup)


@pytest.mark.parametrize("warmup", [None, 10], ids=["constant_lr", "warmup_from_0"])
@pytest.mark.parametrize("underflow_every", [100, 1])
def test_lora_with_zero_initialised_b_trains_without_alert(tmp_path, warmup, underflow_every):
    torch.manual_seed(0)
    model = LoRAClassifier(warmup=warmup)
    mon = health(underflow_every)
    t = trainer(tmp_path, [mon], max_steps=60)
    t.fit(model, digits_loader(64, n=512))  # on_alert="raise": any alert would end the run here
    assert t.global_step == 60 and mon.alerts == []
    # the structural zeros were there: A's gradient is zero until B has moved (a step with lr > 0)
    zeros = 2 if warmup else 1
    assert model.a_grad_zero[:zeros] == [True] * zeros and not any(model.a_grad_zero[zeros:])
    assert (model.lrs[0] == 0.0) == bool(warmup)


def test_lora_whose_adapter_gradient_stays_zero_is_reported(tmp_path):
    torch.manual_seed(0)
    model = LoRAClassifier(rounded=True, warmup=10)
    mon = health(100, on_alert="warn")
    trainer(tmp_path, [mon], max_steps=20).fit(model, digits_loader(64, n=512))
    assert all(model.a_grad_zero)
    zero = [a for a in mon.alerts if a.code == "grad.zero"]
    # zero at steps 0 (lr 0, nothing moves), 1, 2, 3: three of them with an update in between
    assert [(a.where, a.step) for a in zero] == [("lora_a", 3)]
    assert "lora_b" not in zero[0].message


class WarmupClassifier(DigitsClassifier):
    """The digits MLP with a linear learning-rate warm-up from 0 over 20 steps, stepped per batch."""

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        return linear_warmup(optimizer, 20)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.lrs = [*getattr(self, "lrs", []), optimizer.param_groups[0]["lr"]]


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.1), ("adam", 1e-3)])
def test_warmup_from_zero_is_not_a_stale_update(tmp_path, optimizer, lr):
    torch.manual_seed(0)
    model = WarmupClassifier(lr=lr, optimizer=optimizer)
    mon = health(1)
    t = trainer(tmp_path, [mon], max_steps=40)
    t.fit(model, digits_loader(64, n=512))
    assert model.lrs[0] == 0.0 and math.isclose(model.lrs[1], lr / 20)
    assert mon.alerts == []
    # the staleness of every step that asked for an update was measured, and is ~0
    acc = EventAccumulator(mon.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    stale = acc.Scalars(TAG_STALE_DTYPE + "float32")
    assert len(stale) >= 38 and max(e.value for e in stale) < 0.05


class CosineClassifier(DigitsClassifier):
    """SGD with momentum and a cosine annealing to lr 0 over the run, stepped per batch."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=300)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_the_end_of_a_cosine_annealing_is_not_a_stale_update(tmp_path):
    torch.manual_seed(0)
    under = GradientUnderflowMonitor(every_n_steps=1)
    mon = HealthMonitor(monitors=[under], summary=False)
    trainer(tmp_path, [mon], max_steps=301).fit(CosineClassifier(hidden=(64,)), digits_loader(64, n=512))
    assert "update.stale" not in {a.code for a in mon.alerts}, [a.line() for a in mon.alerts]
    acc = EventAccumulator(mon.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    stale = {e.step: e.value for e in acc.Scalars(TAG_STALE_DTYPE + "float32")}
    # judged while the schedule asks for updates (lr >= 1% of its base), and those are not lost
    assert len(stale) >= 270 and max(stale.values()) < 0.05
