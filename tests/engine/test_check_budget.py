"""The overhead budget: which steps get the gradient checks, and what an unchecked step still catches.

The stride itself is planned from measured times (:class:`~healthmon.schedules.CheckBudget`,
tested here with a given clock); the runs use a budget so small that the stride is always the
largest, 64, so that which steps are checked is known in advance. Real Trainers on CPU with
Lightning's default logging cadence (50), long enough to pass the 20 calibration steps.
"""

from __future__ import annotations

import inspect
import json
import random
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import DigitsClassifier, digits_loader, trainer

from healthmon import GradientNormMonitor, HealthMonitor, LogitsCheck
from healthmon.engine.step_stats import StepStatistics
from healthmon.monitors.bundle import default_monitors
from healthmon.monitors.hessian import HessianEigenMonitor
from healthmon.monitors.underflow import GradientUnderflowMonitor
from healthmon.schedules import CheckBudget, SampledEvery

TINY = 1e-9  # no check fits: the stride is always the largest
STRIDE = CheckBudget(TINY).max_stride
CALIBRATION = CheckBudget(TINY).calibration


def fake_clock(step_seconds: float) -> Any:
    ticks = iter(range(10**9))
    return lambda: next(ticks) * step_seconds


def test_the_stride_is_the_smallest_power_of_two_within_the_budget() -> None:
    # a step every 1 ms, checks of 0.1 ms: 10% if every step; 1% needs every 16th (every 8th: 1.25%)
    for budget, cost, stride in ((0.01, 1e-4, 16), (0.02, 1e-4, 8), (0.2, 1e-4, 1), (0.01, 1e-6, 1)):
        checks = CheckBudget(budget, calibration=10, now=fake_clock(1e-3))
        for step in range(30):
            checks.step_started()
            if checks.checks(step):
                checks.spent(cost)
            checks.plan(step)
        assert checks.stride == stride, (budget, cost)
    assert all(checks.checks(step) for step in range(10))  # calibration: every step


def test_no_budget_or_every_step_keeps_the_stride_at_one_until_a_reset() -> None:
    checks = CheckBudget(None, calibration=2, now=fake_clock(1.0))
    for step in range(10):
        checks.step_started()
        checks.spent(10.0)
        checks.plan(step)
    assert checks.stride == 1
    checks = CheckBudget(TINY, calibration=2, now=fake_clock(1.0))
    checks.every_step()
    for step in range(10):
        checks.step_started()
        checks.spent(10.0)
        checks.plan(step)
    assert checks.stride == 1
    checks.reset()  # a new fit, single-process and without a scaler: the budget plans again
    for step in range(10):
        checks.step_started()
        checks.spent(10.0)
        checks.plan(step)
    assert checks.enabled and checks.stride == checks.max_stride


def test_forced_checks_are_paid_first_and_the_stride_gets_what_they_leave() -> None:
    # a step every 1 ms, stride checks of 0.1 ms, budget 1% (10 us a step): alone, every 16th
    # (6.25 us); with forced checks (log steps, samples) of 5 us a step, every 32nd (3.1 us)
    for forced, stride in ((0.0, 16), (5e-6, 32), (20e-6, 64)):
        checks = CheckBudget(0.01, calibration=10, now=fake_clock(1e-3))
        for step in range(200):
            checks.step_started()
            if checks.checks(step):
                checks.spent(1e-4)
            elif forced:
                checks.spent(forced, forced=True)  # every other step pays its forced share
            checks.plan(step)
        assert checks.stride == stride, forced
        assert checks.seconds_forced_per_step == pytest.approx(forced * (1 - 1 / stride), rel=0.05)
        assert checks.stretch == 1  # nothing was sampled: nothing to space out


def test_samples_that_overrun_the_budget_are_spaced_out_up_to_eight_times() -> None:
    # samples every 100 steps cost 20 ms each: 0.2 ms a step, 20x the budget even at stride 64:
    # once one is measured, the stretch goes straight to its largest, 8
    every = SampledEvery(100)
    checks = CheckBudget(0.01, calibration=10, now=fake_clock(1e-3))
    sampled_at: list[int] = []
    stretches = []
    for step in range(4000):
        checks.step_started()
        if step >= 10 and every(step, checks.stretch):  # a sample is forced, on the stride or not
            sampled_at.append(step)
            checks.sample(100)
            checks.spent(0.02, forced=True, sampled=True)
        elif checks.checks(step):
            checks.spent(1e-4)
        checks.plan(step)
        stretches.append(checks.stretch)
    assert checks.stride == checks.max_stride and checks.stretch == checks.max_stretch == 8
    assert stretches == sorted(stretches) and set(stretches) == {1, 8}  # once, and never back
    assert sampled_at == [100, 800, 1600, 2400, 3200]
    # 0.2 ms a step at stretch 1, 8x less now
    assert checks.seconds_forced_per_step == pytest.approx(0.02 / 100 / 8)
    assert checks.summary()["sampled_stretch"] == 8
    checks.reset()
    assert checks.stretch == 1
    checks.every_step()
    assert checks.stretch == 1 and checks.stride == 1


def test_the_stretch_is_the_smallest_at_which_the_samples_fit() -> None:
    # 1 ms steps, budget 1% (10 us a step); samples of 1.2 ms every 100 steps: 12 us a step at
    # stretch 1, 6 at 2, 3 at 4; stride checks of 0.1 ms at stride 64 take 1.6 us: stretch 2
    every = SampledEvery(100)
    checks = CheckBudget(0.01, calibration=10, now=fake_clock(1e-3))
    for step in range(1000):
        checks.step_started()
        if step >= 10 and every(step, checks.stretch):
            checks.sample(100)
            checks.spent(1.2e-3, forced=True, sampled=True)
        elif checks.checks(step):
            checks.spent(1e-4)
        checks.plan(step)
    assert checks.stretch == 2 and checks.stride >= 32  # the stride takes what the samples leave


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, "1%", True])
def test_a_bad_overhead_budget_is_refused_by_name(bad: Any) -> None:
    with pytest.raises(ValueError, match="`overhead_budget`: expected None or a number in \\(0, 1\\]"):
        HealthMonitor(overhead_budget=bad)


def checked_steps(monitor: HealthMonitor) -> list[int]:
    """Record the steps whose gradient statistics are computed (the checks' one pass)."""
    stats = monitor.driver.stats
    steps: list[int] = []
    original = stats.grad_step

    def grad_step(run: Any, optimizer: Any) -> Any:
        if not steps or steps[-1] != run.global_step:
            steps.append(run.global_step)
        return original(run, optimizer)

    stats.grad_step = grad_step  # type: ignore[method-assign]
    return steps


def spy(obj: Any, name: str, record: Callable[..., Any], *, after: bool = False) -> None:
    """Replace the method ``obj.name`` by a call that also hands its arguments to ``record``.

    ``record`` runs before the method, or after it with ``after=True`` (to read what it changed).
    """
    original = getattr(obj, name)

    def call(*args: Any, **kwargs: Any) -> Any:
        if not after:
            record(*args, **kwargs)
        result = original(*args, **kwargs)
        if after:
            record(*args, **kwargs)
        return result

    setattr(obj, name, call)


def test_past_calibration_only_the_stride_log_steps_and_own_cadences_are_checked(tmp_path: Any) -> None:
    monitors = [m for m in default_monitors() if not isinstance(m, GradientNormMonitor)]
    monitors.append(GradientNormMonitor(every_n_steps=90))  # its own cadence forces a check
    monitor = HealthMonitor(overhead_budget=TINY, monitors=monitors, summary=False)
    steps = checked_steps(monitor)
    t = trainer(tmp_path, [monitor], max_steps=260, log_every_n_steps=100)
    t.fit(DigitsClassifier(), digits_loader())
    assert monitor.driver.stats.budget.stride == STRIDE
    # log steps (every 100; GradientUnderflowMonitor samples every 100 too) and the cadence of 90
    # are checked; the stride adds a check where they leave a gap of STRIDE steps
    expected, last = set(range(CALIBRATION)), CALIBRATION - 1
    for s in range(CALIBRATION, 260):
        if s - last >= STRIDE or s % 100 == 0 or s % 90 == 0:
            expected.add(s)
            last = s
    assert set(steps) == expected
    assert {19 + STRIDE, 100 + STRIDE} <= expected  # the gaps the stride fills: not its multiples
    assert not [a for a in monitor.alerts if a.severity != "info"]


def test_a_forward_sampler_gets_its_steps_whole_and_is_not_called_on_other_steps(tmp_path: Any) -> None:
    monitors = [m for m in default_monitors() if not isinstance(m, LogitsCheck)]
    logits = LogitsCheck(every_n_steps=70)  # samples 0, 1, 2, then every 70: off the checked steps
    monitor = HealthMonitor(overhead_budget=TINY, monitors=[*monitors, logits], summary=False)
    starts: list[int] = []
    sampled: list[int] = []

    def finishing(run: Any) -> None:  # before the interceptor is popped: was this step sampled?
        if logits.active:
            sampled.append(run.global_step)

    spy(logits, "on_batch_start", lambda run, *_: starts.append(run.global_step))
    spy(logits, "_finish", finishing)
    steps = checked_steps(monitor)
    t = trainer(tmp_path, [monitor], max_steps=260, log_every_n_steps=100)
    t.fit(DigitsClassifier(), digits_loader())
    assert monitor.driver.stats.budget.stride == STRIDE
    assert sampled == [0, 1, 2, 70, 140, 210]
    assert not {70, 140, 210} & set(steps)  # whole steps for the interceptor, no gradient checks
    # called at its sampled steps and the checked ones (the calibration, log steps, the stride)
    assert set(starts) == set(steps) | set(sampled)


def test_the_hessian_monitor_is_called_only_on_steps_it_may_estimate_and_misses_none(tmp_path: Any) -> None:
    """Under the largest stride, the budgeted Hessian monitor's steps are planned with the checks.

    After each call at step ``s``, the monitor says the first step it may estimate again
    (:meth:`next_needed`): the driver's next call must come no later (an estimate is never
    missed), and the steps between are not given to it unless checked for another reason.
    """
    hessian = HessianEigenMonitor(budget=0.5)  # a large budget: the clock asks for many estimates
    monitors = [m for m in default_monitors() if not isinstance(m, HessianEigenMonitor)]
    monitor = HealthMonitor(overhead_budget=TINY, monitors=[*monitors, hessian], summary=False)
    calls: list[tuple[int, int]] = []  # (step, the next step it may estimate, said after the call)
    estimated: list[int] = []

    def called(run: Any, *_: Any) -> None:
        calls.append((run.global_step, hessian.next_needed(run.global_step)))

    spy(hessian, "on_batch_start", called, after=True)
    spy(hessian, "_estimate", lambda run: estimated.append(run.global_step))
    steps = checked_steps(monitor)
    t = trainer(tmp_path, [monitor], max_steps=600, log_every_n_steps=100)
    t.fit(DigitsClassifier(), digits_loader())
    assert monitor.driver.stats.budget.stride == STRIDE
    assert estimated[:4] == [0, 1, 4, 16] and len(estimated) >= 8  # the clock's too, past step 20
    called = [s for s, _ in calls]
    for (step, next_one), later in zip(calls, called[1:], strict=False):
        assert later <= next_one, (step, next_one, later)  # the step it asked for reached it
    planned = {next_one for _, next_one in calls}
    sampled = {s for s in range(600) if s % 100 == 0 or s < 3}  # LogitsCheck's default sampled steps
    assert set(called) <= set(steps) | planned | sampled
    assert len(called) < 600 // 4  # most steps never call it


def test_unchecked_losses_reach_the_divergence_rule_once_in_order_at_checked_steps(tmp_path: Any) -> None:
    """An unchecked step calls no loss watcher: its loss is handed over before the next checked step."""
    monitor = HealthMonitor(overhead_budget=TINY, summary=False)
    norms = monitor.monitor(GradientNormMonitor)
    assert norms is not None
    handed: list[tuple[int, list[int]]] = []  # (the step handing over, the steps of its losses)
    judged: list[float] = []

    def handing(run: Any, optimizer: Any, losses: Any) -> None:
        handed.append((run.global_step, [step for step, _ in losses]))

    spy(norms, "on_unchecked_losses", handing)
    spy(norms.rules(0)["divergence"], "update", lambda loss, norm=None: judged.append(loss))
    steps = checked_steps(monitor)
    t = trainer(tmp_path, [monitor], max_steps=300, log_every_n_steps=100)
    t.fit(DigitsClassifier(), digits_loader())
    assert monitor.driver.stats.budget.stride == STRIDE
    unchecked = [s for _, ss in handed for s in ss]
    assert unchecked == sorted(set(range(300)) - set(steps))  # each unchecked step once, in order
    for at, ss in handed[:-1]:
        assert at in steps and ss and max(ss) < at  # before the checked step's own judgement
    assert handed[-1][0] == 300  # the last ones when training ends (the step count by then)
    assert len(judged) == 300  # every step's loss, checked or not, reached the divergence rule


def test_without_a_budget_every_step_is_checked(tmp_path: Any) -> None:
    monitor = HealthMonitor(overhead_budget=None, summary=False)
    steps = checked_steps(monitor)
    trainer(tmp_path, [monitor], max_steps=150, log_every_n_steps=50).fit(DigitsClassifier(), digits_loader())
    assert steps == list(range(150))


class SickAt(DigitsClassifier):
    """An MLP that breaks at one step: a NaN in the forward pass, or only in the backward pass."""

    def __init__(self, step: int, *, backward_only: bool) -> None:
        super().__init__(lr=0.05)
        self.sick_step, self.backward_only = step, backward_only

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.global_step == self.sick_step:
            if self.backward_only:  # sqrt'(0) = inf: a finite loss, NaN gradients of net.0.weight
                loss = loss + 0.0 * torch.sqrt(self.net[0].weight[0, 0] * 0.0)
            else:
                loss = loss + torch.log(self.net[0].weight[0, 0] * 0.0 - 1.0)  # log(-1): NaN here
        return loss


LOG_LINE = (
    next(i for i, line in enumerate(inspect.getsource(SickAt).splitlines()) if "torch.log(" in line)
    + inspect.getsourcelines(SickAt)[1]
)


def test_a_nan_loss_on_an_unchecked_step_is_caught_at_that_step_with_its_line(tmp_path: Any) -> None:
    monitor = HealthMonitor(overhead_budget=TINY, summary=False)
    sick = 117  # past calibration, not on the stride (64) nor a log step (50)
    t = trainer(tmp_path, [monitor], max_steps=sick + 3, log_every_n_steps=50)
    t.fit(SickAt(sick, backward_only=False), digits_loader())
    assert monitor.driver.stats.budget.stride == STRIDE
    first = [a for a in monitor.alerts if a.severity == "error"]
    assert first and first[0].step == sick, [(a.code, a.step) for a in monitor.alerts]
    assert any(a.where and f"test_check_budget.py:{LOG_LINE}" in a.where for a in first), [
        (a.code, a.where) for a in first
    ]


def test_nan_gradients_under_a_finite_loss_on_an_unchecked_step_are_named_the_next_step(
    tmp_path: Any,
) -> None:
    monitor = HealthMonitor(overhead_budget=TINY, summary=False)
    sick = 117
    t = trainer(tmp_path, [monitor], max_steps=sick + 3, log_every_n_steps=50)
    t.fit(SickAt(sick, backward_only=True), digits_loader())
    update = [a for a in monitor.alerts if a.code == "update.nonfinite"]
    assert update and update[0].step == sick + 1, [(a.code, a.step) for a in monitor.alerts]
    assert f"step {sick} wrote NaN/Inf" in update[0].message
    assert "not checked" in update[0].message and "overhead_budget=None" in (update[0].hint or "")


def test_with_every_step_checked_the_same_backward_nan_is_found_at_its_step(tmp_path: Any) -> None:
    monitor = HealthMonitor(overhead_budget=None, summary=False)
    sick = 117
    t = trainer(tmp_path, [monitor], max_steps=sick + 3, log_every_n_steps=50)
    t.fit(SickAt(sick, backward_only=True), digits_loader())
    grads = [a for a in monitor.alerts if a.code == "grad.nonfinite"]
    assert grads and grads[0].step == sick and "net.0.weight" in (grads[0].message + str(grads[0].where))


def test_a_model_that_affords_every_check_keeps_the_stride_at_one(tmp_path: Any) -> None:
    monitor = HealthMonitor(overhead_budget=1.0, summary=False)  # a check is far below a whole step
    steps = checked_steps(monitor)
    trainer(tmp_path, [monitor], max_steps=130, log_every_n_steps=50).fit(DigitsClassifier(), digits_loader())
    budget = monitor.driver.stats.budget
    assert budget.stride == 1 and steps == list(range(130))
    assert budget.seconds_per_check is not None and budget.seconds_per_step is not None
    assert budget.seconds_per_check < budget.seconds_per_step


def test_the_report_says_how_often_the_gradients_were_checked(tmp_path: Any) -> None:
    monitor = HealthMonitor(overhead_budget=TINY, summary=False)
    trainer(tmp_path, [monitor], max_steps=60, log_every_n_steps=50).fit(DigitsClassifier(), digits_loader())
    assert monitor.report_path is not None
    with open(monitor.report_path) as f:
        checks = json.load(f)["run"]["gradient_checks"]
    assert checks["overhead_budget"] == TINY and checks["every_n_steps"] == STRIDE
    assert checks["seconds_per_check"] > 0 and checks["seconds_per_step"] > 0


def test_with_a_grad_scaler_every_step_is_checked_whatever_the_budget(tmp_path: Any) -> None:
    """A GradScaler can skip any step: its skips are counted from every step's norms."""
    from pytorch_lightning.plugins import MixedPrecision

    monitor = HealthMonitor(overhead_budget=TINY, summary=False)
    steps = checked_steps(monitor)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    t = trainer(tmp_path, [monitor], max_steps=60, log_every_n_steps=50, plugins=[plugin])
    t.fit(DigitsClassifier(), digits_loader())
    assert monitor.driver.stats.budget.stride == 1 and steps == list(range(60))


def counted_steps(monitor: GradientUnderflowMonitor) -> list[int]:
    """Record the steps at which the underflow monitor counts the gradients."""
    steps: list[int] = []
    original = monitor._check

    def check(run: Any, optimizer: Any) -> None:
        steps.append(run.global_step)
        original(run, optimizer)

    monitor._check = check  # type: ignore[method-assign]
    return steps


def test_on_a_model_too_fast_for_its_samples_the_default_cadence_spaces_out(tmp_path: Any) -> None:
    """The underflow counts and logits checks of the default bundle, not a cadence given as an int."""
    monitor = HealthMonitor(overhead_budget=TINY, summary=False)
    underflow = monitor.monitor(GradientUnderflowMonitor)
    assert isinstance(underflow, GradientUnderflowMonitor)
    default = counted_steps(underflow)
    explicit = GradientUnderflowMonitor(every_n_steps=100)  # joins the same bundle, as an int
    fixed = counted_steps(explicit)
    t = trainer(tmp_path, [monitor, explicit], max_steps=900, log_every_n_steps=50)
    t.fit(DigitsClassifier(), digits_loader())
    # nothing fits a budget of 1e-9: after one sample past calibration, the largest stretch, 8
    assert default == [0, 100, 800]
    assert fixed == list(range(0, 900, 100))
    assert monitor.driver.stats.budget.stretch == 8
    assert monitor.report_path is not None
    with open(monitor.report_path) as f:
        assert json.load(f)["run"]["gradient_checks"]["sampled_stretch"] == 8
    assert not [a for a in monitor.alerts if a.severity != "info"]
    # with a budget every check fits into, nothing is stretched
    roomy = HealthMonitor(overhead_budget=1.0, summary=False)
    roomy_steps = counted_steps(roomy.monitor(GradientUnderflowMonitor))  # type: ignore[arg-type]
    trainer(tmp_path / "roomy", [roomy], max_steps=450, log_every_n_steps=50).fit(
        DigitsClassifier(), digits_loader()
    )
    assert roomy_steps == list(range(0, 450, 100)) and roomy.driver.stats.budget.stretch == 1


def test_the_next_checked_step_is_the_one_a_step_by_step_scan_finds() -> None:
    """The driver computes the next checked step from the stride, the log cadence and the periods."""
    rng = random.Random(0)
    for _ in range(200):
        stats = StepStatistics(log_every_n_steps=rng.choice([7, 50, 100]), overhead_budget=TINY)
        stats.budget.calibration = rng.choice([1, 5, 20])
        stats.budget.stride = rng.choice([2, 8, 64])
        period = rng.choice([30, 100, 10**6])  # a monitor's own cadence
        run = SimpleNamespace(global_step=0, optimizers=[object()], log_every_n_steps=50)
        optimizer = run.optimizers[0]
        planned = 0
        for step in range(400):
            run.global_step = step
            if step < planned:
                stats.count_unchecked()
                continue
            assert step == planned
            stats.checks(run, optimizer)
            stats.is_log_step(run, 0)  # the checks' one pass asks it
            stats.mark_checked()
            count, last = stats._optimizer_steps[0], stats._last_checked.get(0)
            ahead = 1
            while not (  # on the stride, a log step, or on the cadence
                stats.budget.checks(count + ahead - 1, last)
                or stats._logs_at(0, step + ahead, run)
                or (step + ahead) % period == 0
            ):
                ahead += 1
            planned = stats.next_checked_step(run, (step // period + 1) * period)
            assert planned == step + ahead, (step, stats.budget.stride, period)


def test_next_check_is_the_first_step_that_checks() -> None:
    budget = CheckBudget(TINY, calibration=5)
    budget.stride = 8
    for last in (None, 4, 9, 30):
        for step in range(40):
            expected = next(s for s in range(step, step + 64) if budget.checks(s, last))
            assert budget.next_check(step, last) == expected, (step, last)
