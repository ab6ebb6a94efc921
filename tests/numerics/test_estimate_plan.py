"""healthmon.numerics.estimate_plan: tolerance, lambda_min switch, memory cap, product method."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from healthmon.numerics.eigensolvers import minimum_memory_factor, vector_ratio
from healthmon.numerics.estimate_plan import (
    EstimatePlan,
    method_tolerance,
    plan_estimate,
    select_hvp_method,
    solver_memory_factor,
)
from healthmon.numerics.hvp import FD_AGREEMENT, HessianOperator
from healthmon.schedules import BudgetClock

PLAN = {"early_until": 1000, "tol": 1e-3, "early_tol": 5e-2, "negative_every": 4}


def test_fixed_schedule_uses_tol_and_always_seeks_lambda_min() -> None:
    for step in (0, 10, 5000):
        plan = plan_estimate(step, budgeted=False, estimates_done=0, negative_curvature=True, **PLAN)
        assert plan == EstimatePlan(1e-3, True)
    assert not plan_estimate(0, budgeted=False, estimates_done=0, negative_curvature=False, **PLAN).negative


def test_budgeted_schedule_is_loose_early_and_seeks_lambda_min_every_nth_later() -> None:
    early = plan_estimate(999, budgeted=True, estimates_done=3, negative_curvature=True, **PLAN)
    assert early == EstimatePlan(5e-2, False, verify=False)  # the 4th estimate, but an early one
    later = [
        plan_estimate(1000 + i, budgeted=True, estimates_done=i, negative_curvature=True, **PLAN).negative
        for i in range(8)
    ]
    assert later == [False, False, False, True, False, False, False, True]
    late = plan_estimate(1000, budgeted=True, estimates_done=3, negative_curvature=True, **PLAN)
    assert late.tol == 1e-3 and late.verify
    assert not plan_estimate(1000, budgeted=True, estimates_done=3, negative_curvature=False, **PLAN).negative


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("top_k", [1, 3])
def test_memory_factor_is_raised_to_what_the_basis_needs(dtype: torch.dtype, top_k: int) -> None:
    floor = minimum_memory_factor(dtype, top_k) + top_k * vector_ratio(dtype)
    assert solver_memory_factor(dtype, top_k, 0.5) == floor
    assert solver_memory_factor(dtype, top_k, floor + 100) == floor + 100


def test_finite_differences_must_be_ten_times_more_accurate_than_the_tolerance() -> None:
    assert method_tolerance(1e-3) == pytest.approx(1e-4)
    assert method_tolerance(0.5) == FD_AGREEMENT


def test_a_tolerance_no_finite_difference_can_meet_selects_the_exact_product() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def make(method):
        return HessianOperator(model, [(lambda: ((model(x) - y) ** 2).mean(), 1.0)], method=method)

    assert select_hvp_method(make, 1e-12, torch.Generator().manual_seed(0)) == "double_backward"


def test_early_estimates_are_affordable_while_all_of_them_fit_their_share_of_the_planned_run() -> None:
    clock = BudgetClock(0.02)
    clock.total_steps, clock.train_seconds, clock.timed_steps = 100.0, 10.0, 10  # 1 s a step
    assert clock.early_affordable(0.05)  # no estimate yet
    clock.spent(0, 1e9)  # the step-0 estimate is promised, not counted
    clock.spent(4, 2.0)
    assert clock.early_affordable(0.05)  # 2 + 2 <= 5% of 100 s
    clock.spent(16, 2.0)
    assert not clock.early_affordable(0.05)  # 4 + 2 > 5
    clock.total_steps = math.inf
    assert clock.early_affordable(0.05)  # no planned length: the early schedule runs
