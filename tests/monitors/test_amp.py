"""fp16 mixed precision with a real GradScaler that really overflows.

The scaler working is not an alert, a scaler in trouble is, and the logged loss is the loss
``training_step`` returned.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import DigitsClassifier, digits_loader, trainer
from pytorch_lightning.plugins.precision import MixedPrecision
from tensorboard.backend.event_processing import event_accumulator as ea

from healthmon import HealthMonitor, NumericalHealthError
from healthmon.monitors import GradientNormMonitor, NonFiniteMonitor


def fp16() -> MixedPrecision:
    """precision="16-mixed" as on a GPU (on CPU Lightning silently falls back to bf16)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


class SummedLoss(DigitsClassifier):
    """Cross-entropy summed over the batch, times ``factor``.

    At the scaler's initial scale 2**16 its float16 gradients overflow until the scale has backed
    off (with a huge ``factor``, at every scale). Records what ``training_step`` returned and
    brute-force gradient facts.
    """

    def __init__(self, factor: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = factor
        self.returned: dict[int, float] = {}
        self.skipped: dict[int, bool] = {}
        self.norms: dict[int, float] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).float(), y, reduction="sum") * self.factor
        self.returned.setdefault(self.trainer.global_step, float(loss))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = torch.cat([p.grad.reshape(-1) for p in self.parameters()])  # unscaled here
        self.skipped[self.trainer.global_step] = not bool(torch.isfinite(grads).all())
        self.norms[self.trainer.global_step] = float(torch.linalg.vector_norm(grads))


def fit(tmp_path: Any, model: Any, mon: Any, max_steps: int) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path, [mon], max_steps=max_steps, plugins=[fp16()])
        t.fit(model, digits_loader())
    return t


def scalars(log_dir: str) -> dict[str, dict[int, float]]:
    acc = ea.EventAccumulator(log_dir, size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_overflowing_scaler_is_healthy_and_logs_the_users_loss(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = SummedLoss(100.0, lr=1e-5)
    mon = HealthMonitor(on_alert="stop", summary=False)
    t = fit(tmp_path, model, mon, max_steps=120)
    # the run really overflowed: the scaler skipped steps and backed off
    skipped = [s for s, bad in sorted(model.skipped.items()) if bad]
    assert len(skipped) >= 5 and skipped[:5] == [0, 1, 2, 3, 4]
    # ... which is the scaler working: no warning or error, no crash record, the run is not stopped
    assert [a.line() for a in mon.alerts if a.severity != "info"] == []
    assert t.global_step == 120 and not t.should_stop
    assert not os.path.exists(os.path.join(t.logger.log_dir, "healthmon_crash.json"))
    assert mon.monitor(NonFiniteMonitor).replays == 0  # no replay of the batch either
    assert json.loads(Path(mon.report_path).read_text())["run"]["status"] == "completed"
    tags = scalars(t.logger.log_dir)
    # the logged loss is what training_step returned (not scale x loss), skipped steps included
    assert tags["healthmon/loss"] == model.returned
    # skipped steps are counted, and the scale halves after each of them
    assert tags["healthmon/amp/skipped_steps"][119] == len(skipped)
    scale = tags["healthmon/amp/loss_scale"]
    assert scale[0] == 65536.0
    assert all(scale[s + 1] == scale[s] / 2 for s in skipped if s + 1 in scale)
    # gradient norms: unscaled, of the applied steps only
    norms = tags["healthmon/grad/norm"]
    assert sorted(norms) == [s for s in range(120) if s not in skipped]
    for step, value in norms.items():
        assert value == pytest.approx(model.norms[step], rel=1e-5)


def test_scale_collapsing_below_one_is_an_error(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = SummedLoss(1e7, lr=1e-10)  # gradients overflow float16 even unscaled
    mon = HealthMonitor(on_alert="raise", summary=False)
    with pytest.raises(NumericalHealthError) as info:
        fit(tmp_path, model, mon, max_steps=40)
    alert = info.value.alert
    assert alert.code == "amp.scaler_unstable" and alert.severity == "error"
    assert alert.step == 17 and alert.value == 0.5  # 2**16 halved 17 times
    assert alert.where is not None and alert.where.startswith("net.")
    assert [a.code for a in mon.alerts] == ["amp.scaler_unstable"]


def test_many_consecutive_skips_are_an_error(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = SummedLoss(1e7, lr=1e-10)
    nonfinite = NonFiniteMonitor(max_consecutive_skips=12, min_loss_scale=1e-30)
    mon = HealthMonitor(monitors=[nonfinite, GradientNormMonitor()], summary=False)
    fit(tmp_path, model, mon, max_steps=20)
    assert [(a.code, a.step) for a in mon.alerts] == [("amp.scaler_unstable", 11)]
    assert "12 optimizer steps in a row" in mon.alerts[0].message


def test_nan_loss_under_fp16_is_still_a_fault(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = DigitsClassifier(hidden=(32, 32), nan_at_step=5, nan_layer=2)
    mon = HealthMonitor(on_alert="stop", summary=False)
    t = fit(tmp_path, model, mon, max_steps=40)
    codes = {a.code: a for a in mon.alerts}
    assert {"loss.nonfinite", "grad.nonfinite", "activation.nonfinite"} <= set(codes)
    origin = codes["activation.nonfinite"]
    assert codes["loss.nonfinite"].step == 5
    assert origin.where is not None and origin.where.startswith("tests/models.py:")  # the NaN hook
    assert "net.2" in origin.message
    assert t.global_step <= 6 and t.should_stop
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert os.path.exists(os.path.join(t.logger.log_dir, "healthmon_crash.json"))
