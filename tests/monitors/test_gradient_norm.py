"""GradientNormMonitor's scalars against exact references: norms of the concatenated gradient.

A hand-written loop drives the monitor through the driver and keeps, before each optimizer step,
the exact float64 norm of all gradients concatenated, of each layer's, and the clipped norm; the
event files are read back with TensorBoard's ``EventAccumulator``. Alerts in training runs are
tests/integration/test_health_monitor.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine.runs import FolderRun
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from healthmon.alerts import AlertPolicy
from healthmon.engine.driver import Driver
from healthmon.monitors.gradient_norm import (
    TAG_LAYER,
    TAG_LOSS,
    TAG_NORM,
    TAG_NORM_CLIPPED,
    GradientNormMonitor,
)

MAX_NORM = 0.05


def _exact_norm(params: list[torch.Tensor]) -> float:
    return float(torch.cat([p.grad.reshape(-1).double() for p in params]).norm())


def _train(tmp_path: Path, steps: int = 4) -> dict[str, list[float]]:
    """Drive the monitor over ``steps`` clipped SGD steps; return the exact references per step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = FolderRun(model, [opt], str(tmp_path))
    run.clips_gradients = True
    driver = Driver([GradientNormMonitor()], AlertPolicy("warn"), print_summary=False)
    exact: dict[str, list[float]] = {"norm": [], "0": [], "2": [], "loss": [], "clipped": []}
    driver.setup(run)
    driver.start(run)
    for step in range(steps):
        run.global_step = step
        x = torch.randn(16, 4)
        driver.batch_start(run, x, step)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        driver.before_backward(run, loss)
        loss.backward()
        exact["loss"].append(float(loss.detach()))
        exact["norm"].append(_exact_norm(list(model.parameters())))
        exact["0"].append(_exact_norm(list(model[0].parameters())))
        exact["2"].append(_exact_norm(list(model[2].parameters())))
        driver.before_optimizer_step(run, opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        exact["clipped"].append(_exact_norm(list(model.parameters())))
        opt.step()
        opt.zero_grad()
        driver.batch_end(run, x, step)
    driver.train_end(run)
    driver.end(run)
    driver.teardown(run)
    return exact


def test_logged_norms_and_loss_are_the_exact_ones(tmp_path: Path) -> None:
    exact = _train(tmp_path)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()

    def written(tag: str) -> list[float]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(4))
        return [e.value for e in events]

    assert written(TAG_NORM) == pytest.approx(exact["norm"], rel=1e-6)
    assert written(TAG_LAYER + "0") == pytest.approx(exact["0"], rel=1e-6)
    assert written(TAG_LAYER + "2") == pytest.approx(exact["2"], rel=1e-6)
    assert written(TAG_LOSS) == pytest.approx(exact["loss"], rel=1e-6)
    assert all(n > MAX_NORM for n in exact["norm"])  # every step really was clipped
    assert written(TAG_NORM_CLIPPED) == pytest.approx(exact["clipped"], rel=1e-5)
    assert exact["clipped"] == pytest.approx([MAX_NORM] * 4, rel=1e-5)
