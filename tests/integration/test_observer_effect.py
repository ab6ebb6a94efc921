"""Permanent regression test: with every monitor on at a high rate, the run is bit-identical.

A deterministic CPU run of a model with BatchNorm and dropout ends with exactly the same weights
and BatchNorm statistics with and without healthmon (every check at every step: gradient norms,
NaN replay machinery, underflow counts and stale-update sampling, logits interception, Hessian
estimates through the model's own training_step). A recipe with NumPy/Python randomness, a
torchmetrics metric and ``self.log`` also ends with identical logged metrics (CSV, TensorBoard,
``trainer.callback_metrics`` and ``logged_metrics``), with and without a forced NaN replay.
"""

from __future__ import annotations

import csv
import os
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import digits, digits_loader, trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from healthmon import GradientUnderflowMonitor, HealthMonitor, HessianEigenMonitor, LogitsCheck
from healthmon.monitors import GradientNormMonitor, NonFiniteMonitor


class BatchNormDropout(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _every_check_every_step() -> HealthMonitor:
    return HealthMonitor(
        summary=False,
        log_every_n_steps=1,
        monitors=[
            NonFiniteMonitor(),
            GradientNormMonitor(),
            GradientUnderflowMonitor(every_n_steps=1, histogram_every_n_steps=2),
            LogitsCheck(every_n_steps=1),
            HessianEigenMonitor(every_n_steps=3, top_k=2),
        ],
    )


def _train(root: Any, callbacks: list[Any]) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    model = BatchNormDropout()
    trainer(root, callbacks, max_steps=12, gradient_clip_val=1.0).fit(model, digits_loader(seed=3))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_weights_and_buffers_are_bit_identical_with_every_monitor_on(tmp_path: Any) -> None:
    plain = _train(tmp_path / "plain", [])
    mon = _every_check_every_step()
    watched = _train(tmp_path / "watched", [mon])
    assert plain.keys() == watched.keys()
    for name in plain:
        assert torch.equal(plain[name], watched[name]), name
    hessian = mon.monitor(HessianEigenMonitor)
    assert hessian is not None and hessian.estimates >= 3  # the estimates really ran


# ---- a recipe with host randomness, torchmetrics and self.log: replays leave no trace -----------


class MixupWithMetrics(pl.LightningModule):
    """A recipe with host randomness, torchmetrics and ``self.log``.

    Mixup drawn from NumPy and Python's ``random``, a torchmetrics accuracy updated by
    ``forward``, ``self.log(on_step=True, on_epoch=True)`` (also a ``log_dict`` and a call through
    the class that a patched ``self.log`` does not see, and a direct ``self.logger.log_metrics``), a
    list of step outputs, BatchNorm, dropout.
    """

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassAccuracy

        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10)
        )
        self.acc = MulticlassAccuracy(num_classes=10)
        self.step_losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        lam = 1.0
        if random.random() < 0.7:
            lam = float(np.random.beta(0.4, 0.4))
            x = lam * x + (1 - lam) * x[torch.randperm(x.shape[0])]
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.acc(logits.detach(), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", self.acc, on_step=True, on_epoch=True)
        self.log_dict({"mix_lambda": lam}, on_step=True, on_epoch=True)
        pl.LightningModule.log(self, "train_loss_sum", loss, on_step=False, on_epoch=True, reduce_fx="sum")
        self.logger.log_metrics({"direct_lambda": lam}, step=self.global_step)  # type: ignore[union-attr]
        self.step_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


USER_TAGS = ("train_loss", "train_acc", "mix_lambda", "direct_lambda")


def _nan_loader(nan_at_batch: int, batch_size: int = 64) -> Any:
    """Digits with one NaN feature in batch ``nan_at_batch`` (a corrupt sample, as in real data)."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = digits()
    x = x[: 6 * batch_size].clone()
    x[nan_at_batch * batch_size + 5, 7] = float("nan")
    return DataLoader(TensorDataset(x, y[: 6 * batch_size]), batch_size=batch_size, shuffle=False)


def _train_recipe(root: Any, callbacks: list[Any], *, nan_at_batch: int | None = None) -> dict[str, Any]:
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    model = MixupWithMetrics()
    loggers = [CSVLogger(str(root), name="csv"), TensorBoardLogger(str(root), name="tb")]
    loader = digits_loader(n=6 * 64, seed=3) if nan_at_batch is None else _nan_loader(nan_at_batch)
    fit = trainer(root, callbacks, max_steps=18, logger=loggers)
    fit.fit(model, loader)

    def user(metrics: dict[str, Any]) -> dict[str, float]:
        return {k: float(v) for k, v in metrics.items() if k.startswith(USER_TAGS)}

    with open(os.path.join(loggers[0].log_dir, "metrics.csv"), newline="") as f:
        rows = [
            {k: v for k, v in row.items() if k.startswith((*USER_TAGS, "step", "epoch"))}
            for row in csv.DictReader(f)
        ]
    events = EventAccumulator(loggers[1].log_dir)
    events.Reload()
    scalars = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith(USER_TAGS)
    }
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "callback_metrics": user(fit.callback_metrics),
        "logged_metrics": user(fit.logged_metrics),
        "csv": [row for row in rows if any(row.get(t) for t in row if t.startswith(USER_TAGS))],
        "tensorboard": scalars,
        "step_losses": list(model.step_losses),
    }


def _assert_same_run(plain: dict[str, Any], watched: dict[str, Any]) -> None:
    assert plain["weights"].keys() == watched["weights"].keys()
    for name, value in plain["weights"].items():  # bitwise, NaN included
        torch.testing.assert_close(watched["weights"][name], value, rtol=0, atol=0, equal_nan=True, msg=name)
    for key in ("callback_metrics", "logged_metrics", "csv", "tensorboard", "step_losses"):
        assert plain[key], key  # the comparison is not vacuous
        assert repr(watched[key]) == repr(plain[key]), key  # repr: NaN == NaN


def test_replays_leave_no_trace_on_weights_metrics_and_logs(tmp_path: Any) -> None:
    plain = _train_recipe(tmp_path / "plain", [])
    mon = _every_check_every_step()
    watched = _train_recipe(tmp_path / "watched", [mon])
    hessian = mon.monitor(HessianEigenMonitor)
    assert hessian is not None and hessian.estimates >= 6  # training_step really was replayed
    assert {"train_loss_epoch", "train_acc_step", "train_acc_epoch", "train_loss_sum"} <= plain[
        "logged_metrics"
    ].keys()
    _assert_same_run(plain, watched)


def test_nan_replay_leaves_no_trace(tmp_path: Any) -> None:
    plain = _train_recipe(tmp_path / "plain", [], nan_at_batch=4)
    mon = _every_check_every_step()
    watched = _train_recipe(tmp_path / "watched", [mon], nan_at_batch=4)
    nonfinite = mon.monitor(NonFiniteMonitor)
    assert nonfinite is not None and nonfinite.replays == 1  # the NaN step was replayed
    assert any(a.code == "batch.nonfinite" for a in mon.alerts)  # the corrupt sample is named
    # NaN gradients are not "dead units" or "zero gradients": the underflow checks skip that step
    assert not {"grad.dead_units", "grad.zero", "grad.underflow"} & {a.code for a in mon.alerts}
    _assert_same_run(plain, watched)


class ManualOptimization(MixupWithMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_a_step_that_cannot_be_replayed_is_not_replayed_and_says_so(tmp_path: Any) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    x, y = digits()
    x = x[:256].clone()
    x[2 * 64, 0] = float("nan")
    mon = HealthMonitor(summary=False, monitors=[NonFiniteMonitor(), HessianEigenMonitor(every_n_steps=2)])
    model = ManualOptimization()
    trainer(tmp_path, [mon], max_steps=4).fit(model, DataLoader(TensorDataset(x, y[:256]), batch_size=64))
    nonfinite = mon.monitor(NonFiniteMonitor)
    assert nonfinite is not None and nonfinite.replays == 0
    skipped = [a.message for a in mon.alerts if a.code == "monitor.skipped"]
    assert any("NonFiniteMonitor" in m and "manual optimization" in m for m in skipped), skipped
    assert any("HessianEigenMonitor" in m and "manual optimization" in m for m in skipped), skipped
