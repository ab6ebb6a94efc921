"""CountedStep: a monitored step's host facts, its fetched counts turned into exact scalars and findings.

Gradients are set by hand so that every count is known: subnormals are ``torch.finfo`` 's smallest
normal over 8, zeros are exact zeros. The counts travel the way the monitor sends them (split for
float32, :func:`to_float32_exact`). The monitor in training is tests/monitors/test_underflow_monitor.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from healthmon.alerts import AlertPolicy
from healthmon.engine.driver import Driver
from healthmon.engine.run import Run
from healthmon.monitors.counted_step import (
    TAG_DEAD,
    TAG_DEPTH,
    TAG_FLUSH_DTYPE,
    TAG_FLUSH_LAYER,
    TAG_RMS,
    TAG_SUB_DTYPE,
    TAG_SUB_LAYER,
    TAG_ZERO_DTYPE,
    TAG_ZERO_LAYER,
    CountedStep,
    Limits,
)
from healthmon.numerics.depth_decay import depth_decay_orders
from healthmon.numerics.underflow import gradient_counts, to_float32_exact
from healthmon.numerics.zero_gradients import ZeroGradientRule

TINY = torch.finfo(torch.float32).smallest_normal / 8  # subnormal in float32


def _measured(step: int = 3) -> tuple[CountedStep, Driver, list[float]]:
    """A step of ``Linear(4, 4) -> ReLU -> Linear(4, 2)`` with known gradients, measured and sent."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    w0, b0, w2, b2 = model.parameters()
    w0.grad = torch.tensor([TINY] * 8 + [0.0] * 4 + [1e-3] * 4).reshape(4, 4)  # 8 subnormal, 4 zeros
    b0.grad = torch.full((4,), 1e-3)
    w2.grad = torch.ones(2, 4)
    b2.grad = torch.zeros(2)  # entirely zero
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Run(model, [opt])
    driver = Driver([], AlertPolicy(), write_report=False, print_summary=False)
    driver.setup(run)
    run.global_step = step
    params = [w0, b0, w2, b2]
    stats = driver.grad_step(run, opt)
    counted = CountedStep.measure(step, True, params, [False] * 4, stats, driver.params)
    values = to_float32_exact(gradient_counts([p.grad for p in params])).reshape(-1).tolist()
    return counted, driver, values


def _exact_rms(*grads: torch.Tensor) -> float:
    flat = torch.cat([g.reshape(-1).double() for g in grads])
    return float(flat.pow(2).mean().sqrt())


def test_measure_keeps_layers_dtypes_loss_and_the_depth_profile() -> None:
    counted, driver, _ = _measured()
    assert counted.step == 3
    assert counted.layer_index == [0, 0, 1, 1]
    assert driver.params.layers == ["0", "2"]
    assert counted.dtypes == ["float32"] * 4
    assert counted.judged == [True] * 4
    assert math.isnan(counted.loss)  # no loss was handed to backward
    w0, b0, w2, b2 = counted.params
    assert counted.profile.layers == ["0", "2"]
    assert counted.profile.rms == pytest.approx([_exact_rms(w0.grad, b0.grad), _exact_rms(w2.grad, b2.grad)])
    assert counted.profile.decay == depth_decay_orders(counted.profile.rms)


def test_structural_zeros_are_not_judged_nor_profiled() -> None:
    counted, driver, _ = _measured()
    stats = driver.grad_step(driver.run, driver.run.optimizers[0])
    again = CountedStep.measure(3, True, counted.params, [False, False, True, False], stats, driver.params)
    assert again.judged == [True, True, False, True]
    w0, b0, _, b2 = counted.params
    assert again.profile.rms == pytest.approx([_exact_rms(w0.grad, b0.grad), _exact_rms(b2.grad)])


def test_judge_gives_exact_shares_and_the_underflow_finding() -> None:
    counted, driver, values = _measured()
    counted.dead_names = ["1"]
    limits = Limits(underflow_fraction=0.5, dead_fraction=0.9, depth_orders=100.0, min_depth=3)
    scalars, findings = counted.judge(
        [*values, 0.25], driver.params, ZeroGradientRule(1.0, 2), lambda name: "ReLU", limits
    )
    # layer 0: 20 entries, 4 zeros, 8 of the 16 nonzero subnormal, its 4 zeros counted as flushed
    assert scalars[TAG_ZERO_LAYER + "0"] == 4 / 20
    assert scalars[TAG_SUB_LAYER + "0"] == 8 / 16
    assert scalars[TAG_FLUSH_LAYER + "0"] == 4 / 20
    # layer 2: 10 entries, 2 zeros (the bias), no subnormal so nothing counted as flushed
    assert (scalars[TAG_ZERO_LAYER + "2"], scalars[TAG_SUB_LAYER + "2"]) == (2 / 10, 0.0)
    assert scalars[TAG_FLUSH_LAYER + "2"] == 0.0
    assert scalars[TAG_ZERO_DTYPE + "float32"] == 6 / 30
    assert scalars[TAG_SUB_DTYPE + "float32"] == 8 / 24
    assert scalars[TAG_FLUSH_DTYPE + "float32"] == 4 / 30
    assert scalars[TAG_DEAD + "1"] == 0.25
    assert scalars[TAG_RMS + "0"] == counted.profile.rms[0]
    assert scalars[TAG_DEPTH] == counted.profile.decay
    assert [(f.code, f.where, f.value) for f in findings] == [("grad.underflow", "0", 0.5)]


def test_a_zero_gradient_is_found_once_it_stays_zero_over_updates() -> None:
    rule = ZeroGradientRule(1.0, 2)
    limits = Limits(underflow_fraction=1.0, dead_fraction=0.9, depth_orders=100.0, min_depth=3)
    counted, driver, values = _measured()
    counted.judge_zero = True
    found = []
    for updates in (1, 1, 2):  # the same tensors, checked again before and after an update
        counted.updates = updates
        _, findings = counted.judge(values, driver.params, rule, lambda name: "ReLU", limits)
        found.append([(f.code, f.where, f.value) for f in findings])
    assert found == [[], [], [("grad.zero", "2.bias", 1.0)]]
