"""GradientUnderflowMonitor with a real Trainer: the failures it must catch and the runs it must not flag."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import DigitsClassifier, digits_loader, trainer
from pytorch_lightning import LightningModule
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from healthmon import GradientUnderflowMonitor, HealthMonitor
from healthmon.monitors.underflow import (
    TAG_DEAD,
    TAG_DEPTH,
    TAG_FLUSH_DTYPE,
    TAG_STALE_DTYPE,
    TAG_STALE_LAYER,
    TAG_SUB_DTYPE,
    TAG_ZERO_DTYPE,
    TAG_ZERO_LAYER,
)
from healthmon.schedules import SampledEvery


class ScaledLoss(DigitsClassifier):
    """The digits MLP with its loss multiplied by a constant (a tiny loss underflows in float16)."""

    def __init__(self, *args: Any, loss_factor: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_factor = loss_factor

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).float(), y) * self.loss_factor


def monitor(**kwargs: Any) -> GradientUnderflowMonitor:
    return GradientUnderflowMonitor(every_n_steps=kwargs.pop("every_n_steps", 1), **kwargs)


def fit(tmp_path, model: LightningModule, mon: Any, *, max_steps: int = 12, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path, [mon], max_steps=max_steps, **kwargs)
        t.fit(model, digits_loader(64, n=512))
    return t


def codes(mon: Any) -> set[str]:
    return {a.code for a in mon.alerts}


def scalars(mon: Any) -> dict[str, list[float]]:
    acc = EventAccumulator(
        mon.driver.log_dir if hasattr(mon, "driver") else mon.log_dir, size_guidance={"scalars": 0}
    )
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---- underflow and AMP --------------------------------------------------------------------------
def test_float16_tiny_loss_without_scaler_underflows(tmp_path):
    torch.manual_seed(0)
    mon = monitor()
    fit(tmp_path, ScaledLoss(loss_factor=1e-4, lr=1.0), mon, precision="16-true")
    assert {"grad.underflow"} <= codes(mon)
    alert = next(a for a in mon.alerts if a.code == "grad.underflow")
    assert "float16" in alert.message and alert.where in ("net.0", "net.2")
    logged = scalars(mon)
    assert max(logged[TAG_SUB_DTYPE + "float16"]) > 0.05
    assert TAG_FLUSH_DTYPE + "float16" in logged


def test_mixed_precision_same_model_raises_nothing(tmp_path):
    torch.manual_seed(0)
    mon = monitor()
    fit(tmp_path, ScaledLoss(loss_factor=1e-4, lr=1.0), mon, precision="bf16-mixed")
    assert mon.alerts == []
    logged = scalars(mon)
    assert logged[TAG_SUB_DTYPE + "float32"] == [0.0] * len(logged[TAG_SUB_DTYPE + "float32"])


class InfAtBatch(ScaledLoss):
    """Overflows once (first epoch, batch 3): the GradScaler skips that step and halves the loss scale."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if (self.current_epoch, batch_idx) == (0, 3) else loss


def test_float16_autocast_with_grad_scaler_skips_without_false_alerts(tmp_path):
    """The scaler's loss scale and skipped steps are NonFiniteMonitor's (tests/monitors/test_amp.py)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    mon = monitor()
    scaler = torch.amp.GradScaler("cpu")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    fit(tmp_path, InfAtBatch(loss_factor=1e-4, lr=1.0), mon, plugins=[plugin])
    assert not codes(mon) & {"grad.underflow", "grad.zero", "update.stale", "grad.vanishing"}
    assert mon.driver.amp_skipped_steps == 1 and scaler.get_scale() == 32768.0
    assert TAG_ZERO_DTYPE + "float32" in scalars(mon)


# ---- stale updates ------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_bfloat16_weights_small_lr_stale_while_float32_twin_is_not(tmp_path, optimizer):
    lr = 1e-3 if optimizer == "sgd" else 1e-5
    torch.manual_seed(0)
    mon16 = monitor(every_n_steps=2)
    fit(tmp_path / "bf16", ScaledLoss(lr=lr, optimizer=optimizer), mon16, precision="bf16-true")
    assert "update.stale" in codes(mon16)
    stale = next(a for a in mon16.alerts if a.code == "update.stale")
    assert "bfloat16" in stale.message and stale.value >= 0.5
    assert max(scalars(mon16)[TAG_STALE_DTYPE + "bfloat16"]) >= 0.5

    torch.manual_seed(0)
    mon32 = monitor(every_n_steps=2)
    fit(tmp_path / "fp32", ScaledLoss(lr=lr, optimizer=optimizer), mon32, precision="32-true")
    assert "update.stale" not in codes(mon32)
    logged = scalars(mon32)
    assert max(logged[TAG_STALE_DTYPE + "float32"]) < 0.5
    assert any(tag.startswith(TAG_STALE_LAYER) for tag in logged)


# ---- exact zeros: the runs that must stay quiet -------------------------------------------------
class FrozenUnusedSparse(LightningModule):
    """Frozen layer, unused parameters, a dense and a sparse embedding touching few rows."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(64, 32)
        self.frozen.requires_grad_(False)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(32 + 8, 10))
        self.unused = nn.Linear(5, 5)
        self.dense_emb = nn.Embedding(1000, 4)
        self.sparse_emb = nn.Embedding(1000, 4, sparse=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        ids = y  # 10 distinct rows of 1000 are used
        h = torch.cat([self.frozen(x), self.dense_emb(ids), self.sparse_emb(ids)], dim=1)
        return F.cross_entropy(self.head(h), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


def test_frozen_unused_and_embeddings_raise_nothing(tmp_path):
    torch.manual_seed(0)
    mon = monitor()
    fit(tmp_path, FrozenUnusedSparse(), mon)
    assert mon.alerts == []
    logged = scalars(mon)
    assert not any("frozen" in tag or "unused" in tag for tag in logged)
    # the dense embedding's 990 absent rows are not counted as zeros
    assert logged[TAG_ZERO_LAYER + "dense_emb"] == [0.0] * len(logged[TAG_ZERO_LAYER + "dense_emb"])


class ZeroGrad(DigitsClassifier):
    """A parameter whose gradient is rounded to exactly zero: it is multiplied by 0 in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net[0](x) * 0.0 + self.net[0].bias.detach()  # weight gets an all-zero gradient
        return self.net[2](self.net[1](h))


def test_whole_zero_gradient_with_nonzero_loss_raises_grad_zero(tmp_path):
    torch.manual_seed(0)
    mon = monitor()
    fit(tmp_path, ZeroGrad(), mon, max_steps=3)
    zero = [a for a in mon.alerts if a.code == "grad.zero"]
    assert zero and zero[0].where == "net.0.weight"
    assert scalars(mon)[TAG_ZERO_DTYPE + "float32"][0] > 0.5


# ---- dead units ---------------------------------------------------------------------------------
def test_relu_killed_by_negative_bias_reports_dead_units(tmp_path):
    torch.manual_seed(0)
    model = DigitsClassifier(hidden=(32, 32))
    with torch.no_grad():
        model.net[2].bias.fill_(-100.0)  # the second hidden ReLU never fires
    mon = monitor()
    fit(tmp_path, model, mon, max_steps=4)
    dead = [a for a in mon.alerts if a.code == "grad.dead_units"]
    assert [a.where for a in dead] == ["net.3"]
    logged = scalars(mon)
    assert logged[TAG_DEAD + "net.3"] == [1.0] * 4
    assert max(logged[TAG_DEAD + "net.1"]) < 0.5


def test_forward_hooks_only_on_monitored_steps(tmp_path):
    torch.manual_seed(0)
    model = DigitsClassifier(hidden=(32,))
    mon = monitor(every_n_steps=3)
    fit(tmp_path, model, mon, max_steps=7)
    assert len(scalars(mon)[TAG_DEAD + "net.1"]) == 3  # steps 0, 3, 6
    assert not model.net[1]._forward_hooks  # removed at the end


# ---- vanishing along depth ----------------------------------------------------------------------
class KaimingMLP(DigitsClassifier):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)


def test_twenty_sigmoid_layers_vanish_relu_with_kaiming_does_not(tmp_path):
    torch.manual_seed(0)
    mon = monitor()
    fit(tmp_path / "sig", DigitsClassifier(hidden=(32,) * 19, activation=nn.Sigmoid), mon, max_steps=3)
    van = [a for a in mon.alerts if a.code == "grad.vanishing"]
    assert van and van[0].where == "net.0" and van[0].value >= 3
    assert min(scalars(mon)[TAG_DEPTH]) >= 3

    torch.manual_seed(0)
    mon_relu = monitor()
    fit(tmp_path / "relu", KaimingMLP(hidden=(32,) * 19, lr=0.01), mon_relu, max_steps=3)
    assert "grad.vanishing" not in codes(mon_relu)
    assert max(scalars(mon_relu)[TAG_DEPTH]) < 2


# ---- contract ----------------------------------------------------------------------------------
def test_weights_bit_identical_with_and_without_monitor(tmp_path):
    def run(callbacks: list[Any], root: Any) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = ScaledLoss(hidden=(16, 16), lr=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(root, callbacks, max_steps=6, precision="bf16-true").fit(model, digits_loader(64, n=512))
        return [p.detach().clone() for p in model.parameters()]

    rng = torch.get_rng_state()
    plain = run([], tmp_path / "a")
    watched = run([monitor(histogram_every_n_steps=2)], tmp_path / "b")
    assert all(
        torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(plain, watched, strict=True)
    )
    del rng


def test_inside_health_monitor_and_histograms(tmp_path):
    torch.manual_seed(0)
    model = DigitsClassifier(hidden=(32, 32))
    with torch.no_grad():
        model.net[2].bias.fill_(-100.0)
    hm = HealthMonitor(monitors=[monitor(histogram_every_n_steps=2)], summary=False)
    fit(tmp_path, model, hm, max_steps=4)
    assert "grad.dead_units" in {a.code for a in hm.alerts}
    acc = EventAccumulator(hm.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    assert acc.Tags()["histograms"] == [
        "healthmon/grad/log10_abs/net.4"
    ]  # the layers before the dead one have zero gradients


def test_state_round_trip_and_arguments():
    mon = GradientUnderflowMonitor()
    mon._samplings = 3
    state = mon.state_dict()
    other = GradientUnderflowMonitor()
    other.load_state_dict(state)
    assert other._samplings == 3
    assert GradientUnderflowMonitor().every_n_steps == SampledEvery(100)
    assert GradientUnderflowMonitor().state_key == GradientUnderflowMonitor(every_n_steps=100).state_key
    for kwargs, name in [
        ({"underflow_fraction": 0.0}, "underflow_fraction"),
        ({"dead_fraction": 1.5}, "dead_fraction"),
        ({"stale_samples": 0}, "stale_samples"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"depth_orders": -1.0}, "depth_orders"),
        ({"histogram_every_n_steps": 0}, "histogram_every_n_steps"),
        ({"seed": 1.5}, "seed"),
        ({"zero_steps": 0}, "zero_steps"),
    ]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            GradientUnderflowMonitor(**kwargs)
    with pytest.raises(TypeError, match="`dead_units`"):
        GradientUnderflowMonitor(dead_units="yes")  # type: ignore[arg-type]


def test_a_layer_killed_mid_run_is_reported_between_counting_steps(tmp_path):
    """Whole-zero gradients are seen every step from the shared norms, not only every 100 steps."""
    model = DigitsClassifier(hidden=(32,))

    def kill_from_step_5(module, inputs, output):
        return output * 0 if model.trainer.global_step >= 5 else output

    model.net[1].register_forward_hook(kill_from_step_5)  # the ReLU: net.0 gets no gradient from step 5
    mon = HealthMonitor(summary=False)
    trainer(tmp_path, [mon], max_steps=12).fit(model, digits_loader())
    zero = next(a for a in mon.alerts if a.code == "grad.zero")
    # zero at steps 5, 6, 7 (zero_steps=3, with updates between): reported at step 7, then each step
    assert zero.step == 7 and zero.where == "net.0.weight" and zero.count == 5
    assert "net.0.bias" in zero.message
