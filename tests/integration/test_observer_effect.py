"""Permanent regression test: with every monitor on at a high rate, the run is bit-identical.

A deterministic CPU run of a model with BatchNorm and dropout ends with exactly the same weights
and BatchNorm statistics with and without healthmon (every check at every step: gradient norms,
NaN replay machinery, underflow counts and stale-update sampling, logits interception, Hessian
estimates through the model's own training_step).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import digits_loader, trainer
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
