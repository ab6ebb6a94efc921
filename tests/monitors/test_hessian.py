"""HessianEigenMonitor with a real Trainer: sharpness alerts, no side effects, tags, schedule, state."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import DigitsClassifier, digits, digits_loader, trainer
from pytorch_lightning.callbacks import Callback
from torch import nn

from healthmon import HealthMonitor
from healthmon.monitors.hessian import TAG_LAMBDA_MAX, TAG_LAMBDA_MIN, HessianEigenMonitor, log_then_every
from healthmon.numerics.hessian import HessianOperator, lanczos


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.values.append(float(outputs["loss"]))


def _initial_lambda_max(model: pl.LightningModule, n: int) -> float:
    x, y = digits()
    op = HessianOperator(model, [(lambda: F.cross_entropy(model(x[:n]), y[:n]), 1.0)])
    return lanczos(op, k=1, generator=torch.Generator().manual_seed(0)).eigenvalues[0]


@pytest.mark.parametrize("factor", [3.0, 0.5])
def test_full_batch_gd_above_two_over_lr_oscillates_and_alerts(tmp_path, factor: float) -> None:
    torch.manual_seed(0)
    probe = DigitsClassifier(hidden=(32,), activation=nn.Tanh)
    lam = _initial_lambda_max(probe, 256)
    lr = factor * 2 / lam  # factor 3: lambda_max = 3 * 2/lr; factor 0.5: half of it
    torch.manual_seed(0)
    model = DigitsClassifier(hidden=(32,), activation=nn.Tanh, lr=lr)
    mon = HessianEigenMonitor(every_n_steps=5, top_k=2)
    losses = Losses()
    t = trainer(tmp_path, [mon, losses], max_steps=15)
    t.fit(model, digits_loader(256, n=256, shuffle=False))
    codes = [a.code for a in mon.alerts]
    rises = sum(b > a for a, b in zip(losses.values, losses.values[1:], strict=False))
    if factor > 1:
        assert "hessian.sharpness" in codes
        alert = next(a for a in mon.alerts if a.code == "hessian.sharpness")
        assert alert.step == 0 and f"{lam:.4g}" in alert.message  # the first estimate, before any step
        assert "2/lr" in alert.message
        assert rises >= 3  # it oscillates
    else:
        assert "hessian.sharpness" not in codes
        assert rises == 0  # monotone descent
    assert mon.estimates == 3  # steps 0, 5, 10
    assert mon.driver.last[TAG_LAMBDA_MAX] > 0
    assert mon.driver.last["healthmon/hessian/two_over_lr"] == pytest.approx(2 / lr)


class NoisyNet(pl.LightningModule):
    """Dropout and BatchNorm: everything an estimate could disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 10)
        )

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("hvp", ["double_backward", "auto"])
def test_weights_bit_identical_with_and_without_the_monitor(tmp_path, hvp: str) -> None:
    def run(callbacks: list[Any], root: str) -> dict[str, torch.Tensor]:
        pl.seed_everything(0, verbose=False)
        model = NoisyNet()
        t = trainer(tmp_path / root, callbacks, max_steps=8)
        t.fit(model, digits_loader(64, n=512))
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    mon = HessianEigenMonitor(every_n_steps=2, hvp=hvp, trace_samples=2)  # type: ignore[arg-type]
    with_mon = run([mon], "on")
    without = run([], "off")
    assert mon.estimates == 4
    assert with_mon.keys() == without.keys()
    for k in without:
        assert torch.equal(with_mon[k], without[k]), k


def test_tags_reach_tensorboard_and_bundle(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    mon = HealthMonitor(monitors=[HessianEigenMonitor(every_n_steps=3, top_k=3, trace_samples=3)])
    t = trainer(tmp_path, [mon], max_steps=7)
    t.fit(DigitsClassifier(hidden=(16,), activation=nn.Tanh, momentum=0.9), digits_loader(64, n=256))
    acc = EventAccumulator(mon.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (TAG_LAMBDA_MAX, TAG_LAMBDA_MIN, "healthmon/hessian/lambda_3", "healthmon/hessian/products",
                "healthmon/hessian/seconds", "healthmon/hessian/stability_limit", "healthmon/hessian/trace"):  # fmt: skip  # noqa: E501
        assert tag in tags, tag
    steps = [e.step for e in acc.Scalars(TAG_LAMBDA_MAX)]
    assert steps == [0, 3, 6]
    limits = [e.value for e in acc.Scalars("healthmon/hessian/stability_limit")]
    assert limits == pytest.approx([(2 + 2 * 0.9) / 0.1] * 3)  # heavy-ball limit
    lam = [e.value for e in acc.Scalars("healthmon/hessian/lambda_1")]
    assert lam == pytest.approx([e.value for e in acc.Scalars(TAG_LAMBDA_MAX)])


def test_adam_preconditioned_sharpness(tmp_path) -> None:
    torch.manual_seed(0)
    model = DigitsClassifier(hidden=(16,), activation=nn.Tanh, optimizer="adam", lr=1.0)
    mon = HessianEigenMonitor(every_n_steps=2, negative_curvature=False)
    t = trainer(tmp_path, [mon], max_steps=5)
    t.fit(model, digits_loader(64, n=256))
    assert "healthmon/hessian/preconditioned_sharpness" in mon.driver.last
    assert mon.driver.last["healthmon/hessian/preconditioned_limit"] == pytest.approx(38.0)
    assert "hessian.sharpness" in [a.code for a in mon.alerts]  # lr=1 with Adam is far too large


def test_user_probe_batch_and_chunks_agree(tmp_path) -> None:
    x, y = digits()
    results = []
    for chunk in (None, 50):
        torch.manual_seed(0)
        mon = HessianEigenMonitor(
            every_n_steps=100, hvp="double_backward", probe_batch=(x[:200], y[:200]), probe_chunk_size=chunk
        )
        t = trainer(tmp_path / str(chunk), [mon], max_steps=1, tensorboard=False)
        t.fit(DigitsClassifier(hidden=(16,), activation=nn.Tanh), digits_loader(32, n=64))
        assert mon.last_estimate is not None
        results.append(mon.last_estimate.lambda_max)
    assert results[0] == pytest.approx(results[1], rel=1e-5)


class Manual(DigitsClassifier):
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


def test_manual_optimization_is_skipped(tmp_path) -> None:
    mon = HessianEigenMonitor(every_n_steps=1)
    trainer(tmp_path, [mon], max_steps=2, tensorboard=False).fit(Manual(), digits_loader(32, n=64))
    assert [a.code for a in mon.alerts] == ["monitor.skipped"]
    assert mon.estimates == 0


def test_state_round_trip_keeps_warm_start(tmp_path) -> None:
    torch.manual_seed(0)
    mon = HessianEigenMonitor(every_n_steps=2)
    trainer(tmp_path, [mon], max_steps=3, tensorboard=False).fit(
        DigitsClassifier(hidden=(16,), activation=nn.Tanh), digits_loader(32, n=64)
    )
    state = mon.state_dict()
    other = HessianEigenMonitor(every_n_steps=2)
    other.load_state_dict(state)
    assert other.estimates == mon.estimates == 2
    assert torch.equal(other._warm.top, mon._warm.top.cpu())
    assert other._method == mon._method


def test_schedule_and_arguments() -> None:
    sched = log_then_every(100)
    assert [s for s in range(450) if sched(s)] == [0, 1, 4, 16, 64, 100, 200, 300, 400]
    default = HessianEigenMonitor()
    assert default.config()["every_n_steps"] == "time budget 2%" and default.budgeted
    assert (
        HessianEigenMonitor(every_n_steps=log_then_every(2000))
        .config()["every_n_steps"]
        .startswith("log_then_every(2000")
    )
    HessianEigenMonitor(every_n_steps=10)
    HessianEigenMonitor(every_n_steps=lambda s: s in (3, 7))
    for kwargs, name in (
        ({"top_k": 0}, "top_k"),
        ({"solver": "arnoldi"}, "solver"),
        ({"hvp": "finite"}, "hvp"),
        ({"tol": 1.5}, "tol"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"negative_ratio": 2.0}, "negative_ratio"),
        ({"probe_chunk_size": 0}, "probe_chunk_size"),
        ({"max_products": 1, "top_k": 2}, "max_products"),
    ):
        with pytest.raises(ValueError, match=f"`{name}`"):
            HessianEigenMonitor(**kwargs)
    with pytest.raises(TypeError, match="`warm_start`"):
        HessianEigenMonitor(warm_start=1)  # type: ignore[arg-type]


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class _Steps(Callback):
    """Records the global step of every HessianEigenMonitor estimate (from the driver's last values)."""

    def __init__(self, hessian: HessianEigenMonitor) -> None:
        self.hessian = hessian
        self.steps: list[int] = []
        self._seen = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.hessian.estimates > self._seen:
            self._seen = self.hessian.estimates
            self.steps.append(int(trainer.global_step) - 1)


def test_default_estimates_from_step_zero_log_spaced_then_budgeted(tmp_path) -> None:
    """HealthMonitor() as users add it: lambda_max at step 0, then 1, 4, 16, ... (>= 4 in 250)."""
    mon = HealthMonitor(summary=False)
    hessian = next(m for m in mon.monitors if isinstance(m, HessianEigenMonitor))
    steps = _Steps(hessian)
    trainer(tmp_path, [mon, steps], max_steps=250).fit(DigitsClassifier(), digits_loader())
    assert {0, 1, 4, 16} <= set(steps.steps) and steps.steps[0] == 0  # the budget may add more
    assert hessian.estimates >= 4 and hessian.driver.last[TAG_LAMBDA_MAX] > 0
    assert not [a for a in mon.alerts if a.code == "hessian.sharpness"]  # lr 0.1: far below 2/lr


def test_default_raises_sharpness_at_step_zero_for_a_far_too_high_lr(tmp_path) -> None:
    mon = HealthMonitor(summary=False)
    trainer(tmp_path, [mon], max_steps=2).fit(DigitsClassifier(lr=10.0), digits_loader())
    alert = next(a for a in mon.alerts if a.code == "hessian.sharpness")
    assert alert.step == 0 and "2/lr = 0.2" in alert.message and "lambda_max = " in alert.message


class LinearRegression(pl.LightningModule):
    """Least squares on 32 standard-normal features: the Hessian is 2/n X^T X (exactly known)."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.linear = nn.Linear(32, 1)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.linear(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    return x, x @ torch.randn(32, generator=g) / 6 + 0.1 * torch.randn(64, generator=g)


def _exact_lambda_max(rows: torch.Tensor) -> float:
    """Top eigenvalue of the Hessian of the mean squared error over ``rows`` (weights and bias)."""
    design = torch.cat([rows, torch.ones(len(rows), 1)], dim=1).double()
    return float(torch.linalg.eigvalsh(2 * design.T @ design / len(rows))[-1])


@pytest.mark.parametrize("accumulate", [1, 16])
def test_the_probe_is_the_first_optimizer_steps_whole_batch(tmp_path, accumulate: int) -> None:
    """Batches of 2 at lr = 1/lambda_max(32 samples).

    Without accumulation each SGD step descends a 2-sample loss whose curvature is far above
    2/lr: the run really diverges, and the step-0 estimate says so. With 16 micro-batches per
    step, the step's loss is the mean over 32 samples: lr * lambda_max = 1 < 2, the run is stable
    and quiet, and the estimate is the exact top eigenvalue of that 32-sample Hessian.
    """
    x, y = _regression_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    lr = 1.0 / _exact_lambda_max(x[:32])
    assert _exact_lambda_max(x[:2]) > 2 / lr
    torch.manual_seed(0)
    model = LinearRegression(lr)
    mon = HessianEigenMonitor(every_n_steps=log_then_every(2000), tol=1e-6)
    losses = Losses()
    t = trainer(tmp_path, [mon, losses], max_steps=30, accumulate_grad_batches=accumulate)
    t.fit(model, loader)
    sharp = [a for a in mon.alerts if a.code == "hessian.sharpness"]
    logged = mon.driver.last
    assert mon.last_estimate is not None
    if accumulate == 1:
        assert [a.step for a in sharp][:1] == [0] and "probe of 2 samples" in sharp[0].message
        assert max(losses.values) > 100 * losses.values[0]  # it does diverge
    else:
        assert not sharp
        assert losses.values[-1] < losses.values[0]
        # the Hessian of least squares does not depend on the weights: every estimate is exact
        assert mon.last_estimate.lambda_max == pytest.approx(_exact_lambda_max(x[:32]), rel=1e-4)
    assert logged[TAG_LAMBDA_MAX] > 0


def test_a_given_probe_batch_is_used_as_it_is(tmp_path) -> None:
    torch.manual_seed(0)
    model = DigitsClassifier(hidden=(32,), activation=nn.Tanh, lr=50.0)
    x, y = digits()
    mon = HessianEigenMonitor(every_n_steps=log_then_every(2000), probe_batch=(x[:8], y[:8]))
    trainer(tmp_path, [mon], max_steps=2).fit(model, digits_loader(64, n=256))
    assert mon._probe_rows == 8
    assert [a.step for a in mon.alerts if a.code == "hessian.sharpness"][:1] == [0]


@pytest.mark.parametrize("clipped", [False, True])
def test_clipping_scales_the_sharpness_that_counts(tmp_path, clipped: bool) -> None:
    """lambda_max = 1.5 x 2/lr: unstable for the plain step, stable for a step clipped to half."""
    torch.manual_seed(0)
    probe = DigitsClassifier(hidden=(32,), activation=nn.Tanh)
    lam = _initial_lambda_max(probe, 256)
    x, y = digits()
    grads = torch.autograd.grad(F.cross_entropy(probe(x[:256]), y[:256]), list(probe.parameters()))
    g0 = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))
    lr = 1.5 * 2 / lam
    torch.manual_seed(0)
    model = DigitsClassifier(hidden=(32,), activation=nn.Tanh, lr=lr)
    mon = HessianEigenMonitor(every_n_steps=5)
    options = {"gradient_clip_val": 0.5 * g0} if clipped else {}
    trainer(tmp_path, [mon], max_steps=1, **options).fit(model, digits_loader(256, n=256, shuffle=False))
    sharp = [a for a in mon.alerts if a.code == "hessian.sharpness"]
    if clipped:
        assert mon.driver.last["healthmon/hessian/clip_factor"] == pytest.approx(0.5, rel=1e-4)
        assert not sharp  # 0.5 x 1.5 x 2/lr is below 2/lr
    else:
        assert "healthmon/hessian/clip_factor" not in mon.driver.last
        assert sharp and sharp[0].step == 0


@pytest.mark.parametrize("negative_every", [1, 2, 4, 5])
def test_the_clock_learns_the_next_estimates_kind(tmp_path, negative_every: int) -> None:
    """The clock prices the next estimate as what it will be.

    Past the early steps, every ``negative_every``-th estimate also seeks lambda_min.
    """
    mon = HessianEigenMonitor(negative_every=negative_every)
    trainer(tmp_path, [mon], max_steps=200, tensorboard=False).fit(DigitsClassifier(), digits_loader())
    assert mon.estimates >= 4  # steps 0, 1, 4 and 16 at least
    assert mon._clock.next_negative is ((mon.estimates + 1) % negative_every == 0)
