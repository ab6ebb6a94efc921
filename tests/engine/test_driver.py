"""Driver: the one hook sequence, per-step dispatch, the policy at the step's end, state round trip.

The loop is written by hand here (the way :func:`healthmon.watch` and the Lightning adapter call
the driver), over a real model and optimizer, with real TensorBoard event files.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from engine.runs import FolderRun, PointRecorder
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from healthmon.alerts import AlertPolicy, NumericalHealthError
from healthmon.engine.driver import Driver
from healthmon.engine.run import Run
from healthmon.monitors.base import Monitor
from healthmon.tags import LOSS


class Recorder(PointRecorder):
    """Records the points it is called at; logs the loss and alerts when told to."""

    def __init__(self, alert_at: int | None = None) -> None:
        super().__init__()
        self.alert_at = alert_at

    def on_optimizer_step(self, run: Run, optimizer: Any) -> None:
        super().on_optimizer_step(run, optimizer)
        stats = self.driver.grad_step(run, optimizer)
        self.driver.log(run, {LOSS: stats.loss or 0.0})
        if run.global_step == self.alert_at:
            self.driver.alert(run, "loss.nonfinite", "seeded alert")


class Quiet(Monitor):
    """Implements no per-step point: the driver must not call it every step."""


def loop(driver: Driver, run: Run, steps: int) -> None:
    opt = run.optimizers[0]
    driver.setup(run)
    driver.start(run)
    try:
        for step in range(steps):
            run.global_step = step
            x = torch.randn(8, 4)
            driver.batch_start(run, x, step)
            loss = run.model(x).pow(2).mean()
            driver.before_backward(run, loss)
            loss.backward()
            driver.before_optimizer_step(run, opt)
            opt.step()
            opt.zero_grad()
            driver.batch_end(run, x, step)
        driver.train_end(run)
        driver.end(run)
    except BaseException as err:
        driver.end(run, err)
        raise
    finally:
        driver.teardown(run)


def _run(tmp_path: Any) -> Run:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    return FolderRun(model, [torch.optim.SGD(model.parameters(), lr=0.01)], str(tmp_path))


def test_the_points_of_a_step_in_order(tmp_path: Any) -> None:
    rec, quiet = Recorder(), Quiet()
    driver = Driver([quiet, rec], AlertPolicy("warn"), print_summary=False)
    loop(driver, _run(tmp_path), steps=2)
    step = ["batch_start", "loss", "optimizer_step@{}", "batch_end"]
    calls = [c.format(i) for i in range(2) for c in step]
    assert rec.calls == ["setup", "start", *calls, "training_end", "end", "teardown"]
    assert quiet not in driver._per_step["on_optimizer_step"] and rec in driver._per_step["on_loss"]
    assert quiet.driver is driver is rec.driver


def test_the_report_and_event_files(tmp_path: Any) -> None:
    driver = Driver([Recorder()], AlertPolicy("warn"), print_summary=False)
    loop(driver, _run(tmp_path), steps=3)
    report = json.loads(Path(os.path.join(str(tmp_path), "healthmon_report.json")).read_text())
    assert report["run"]["status"] == "completed" and report["alerts"] == []
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars(LOSS)] == [0, 1, 2]


def test_raise_policy_raises_at_the_step_and_reports_the_exception(tmp_path: Any) -> None:
    rec = Recorder(alert_at=1)
    driver = Driver([rec], AlertPolicy("raise", "error"), print_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NumericalHealthError):
            loop(driver, _run(tmp_path), steps=4)
    assert rec.calls[-2:] == ["end:error", "teardown"]
    assert (
        sum(c.startswith("optimizer_step") for c in rec.calls) == 2
    )  # the failing step raised before its update


def test_stop_policy_drops_the_step(tmp_path: Any) -> None:
    run = _run(tmp_path)
    driver = Driver([Recorder(alert_at=0)], AlertPolicy("stop"), print_summary=False)
    before = run.model.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop(driver, run, steps=1)
    assert run.stop_requested and driver.stop_requested
    assert torch.equal(before, run.model.weight)


def test_state_round_trip(tmp_path: Any) -> None:
    driver = Driver([Recorder(alert_at=1)], AlertPolicy("warn"), print_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop(driver, _run(tmp_path), steps=3)
    state = json.loads(json.dumps(driver.state_dict()))
    again = Driver([Recorder()], AlertPolicy("warn"), print_summary=False)
    again.load_state_dict(state)
    assert [a.code for a in again.alerts] == ["loss.nonfinite"] and again.last == driver.last
