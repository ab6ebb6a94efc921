"""Hostile models and loops: healthmon never crashes, never raises false alerts, says what it skips."""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import DigitsClassifier, digits_loader, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from healthmon import HealthMonitor


def _loader(n: int = 64, d: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    return DataLoader(TensorDataset(x, (x.sum(1) > 0).long()), batch_size=16)


class Base(pl.LightningModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


class Frozen(Base):
    """A frozen backbone, an unused head and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(8, 8).requires_grad_(False)
        self.head = nn.Linear(8, 2)
        self.unused = nn.Linear(8, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.calls += 1
        x, y = batch
        return F.cross_entropy(self.head(torch.relu(self.backbone(x))), y)


class SparseEmbedding(Base):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 8, sparse=True)
        self.dense_embed = nn.Embedding(100, 8)  # most rows get exactly-zero gradients: legitimate
        self.head = nn.Linear(8, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        idx = (x[:, 0].abs() * 10).long().clamp(max=99)
        return F.cross_entropy(self.head(self.embed(idx) + self.dense_embed(idx)), y)


class SparseManual(SparseEmbedding):
    """Manual optimisation: SparseAdam on the sparse embedding, SGD on the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        dense = [*self.dense_embed.parameters(), *self.head.parameters()]
        return [torch.optim.SparseAdam([self.embed.weight]), torch.optim.SGD(dense, lr=0.05)]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opts = self.optimizers()
        for o in opts:
            o.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        for o in opts:
            o.step()


class ComplexParams(Base):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 2, dtype=torch.complex64) * 0.1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        z = x.to(torch.complex64) @ self.w
        return F.cross_entropy(z.abs(), y)


class MixedDtypes(Base):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16).to(torch.bfloat16)
        self.b = nn.Linear(16, 16).to(torch.float16)
        self.c = nn.Linear(16, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = torch.relu(self.a(x.bfloat16()))
        h = torch.relu(self.b(h.half()))
        return F.cross_entropy(self.c(h.float()), y)


class DictOrNone(Base):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 2)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if batch_idx % 3 == 2:
            return None  # Lightning skips this step
        x, y = batch
        return {"loss": F.cross_entropy(self.net(x), y), "extra": 1.0}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        torch.log(torch.softmax(self.net(x), -1))  # would be an alert in training; quiet here

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return torch.softmax(self.net(batch[0]), -1)


class GAN(pl.LightningModule):
    """Manual optimisation with two optimizers, GAN-style."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.disc = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        fake = self.gen(torch.randn(real.shape[0], 4))
        d_loss = F.binary_cross_entropy_with_logits(
            self.disc(real), torch.ones(real.shape[0], 1)
        ) + F.binary_cross_entropy_with_logits(self.disc(fake.detach()), torch.zeros(real.shape[0], 1))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(self.disc(fake), torch.ones(real.shape[0], 1))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.Adam(self.gen.parameters(), lr=1e-3),
            torch.optim.Adam(self.disc.parameters(), lr=1e-3),
        ]


class NoTrainable(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fixed = nn.Linear(8, 2).requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.fixed(batch[0])  # nothing to train: Lightning runs the loop without an optimizer

    def configure_optimizers(self) -> None:
        return None


@pytest.mark.parametrize(
    "make",
    [Frozen, SparseEmbedding, SparseManual, ComplexParams, MixedDtypes, DictOrNone, GAN, NoTrainable],
    ids=lambda c: c.__name__,
)
def test_hostile_model_runs_without_crash_or_false_alert(tmp_path: Any, make: type) -> None:
    mon = HealthMonitor(summary=False)
    trainer(tmp_path, [mon], max_steps=8).fit(make(), _loader())
    # pure bf16/fp16 weights trained at lr 0.05 really do lose most updates: those alerts are true
    expected = {"update.stale", "grad.underflow"} if make is MixedDtypes else set()
    assert {a.code for a in mon.alerts if a.severity != "info"} <= expected
    assert mon.report_path is not None and os.path.exists(mon.report_path)


def test_validation_test_and_predict_loops_stay_quiet(tmp_path: Any) -> None:
    model = DictOrNone()
    mon = HealthMonitor(summary=False)
    t = trainer(tmp_path, [mon], max_steps=4, limit_val_batches=2, val_check_interval=2)
    t.fit(model, _loader(), _loader())
    t.validate(model, _loader())
    t.test(model, _loader())
    t.predict(model, _loader())
    assert mon.alerts == []


def test_compiled_module_degrades_gracefully(tmp_path: Any) -> None:
    model = DigitsClassifier()
    model.net = torch.compile(model.net, backend="eager")
    mon = HealthMonitor(summary=False)
    trainer(tmp_path, [mon], max_steps=4).fit(model, digits_loader())
    assert [a for a in mon.alerts if a.severity != "info"] == []
