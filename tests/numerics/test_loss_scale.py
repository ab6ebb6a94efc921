"""LossScaleRule on the scale sequences a torch GradScaler really produces."""

from __future__ import annotations

import torch

from healthmon.numerics.loss_scale import LossScaleRule


def scaler_trace(overflows: list[bool], *, growth_interval: int = 2000) -> list[tuple[bool, float]]:
    """(skipped, scale used) per step of a real GradScaler fed gradients that overflow or not."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", growth_interval=growth_interval)
    trace = []
    for overflow in overflows:
        scale = scaler.scale(torch.ones(()))  # initialises the scale
        param.grad = torch.full((1,), float("inf") if overflow else 1.0) * scale
        used = scaler.get_scale()
        scaler.unscale_(optimizer)
        skipped = not bool(torch.isfinite(param.grad).all())
        scaler.step(optimizer)
        scaler.update()
        trace.append((skipped, used))
    return trace


def run(rule: LossScaleRule, trace: list[tuple[bool, float]]) -> list[tuple[int, str]]:
    return [(i, r) for i, (skipped, scale) in enumerate(trace) if (r := rule.update(skipped, scale))]


def test_initial_backoff_and_occasional_overflow_are_healthy() -> None:
    # 10 overflows while the scale backs off from 2**16, then one every 30 steps as it probes up
    overflows = [True] * 10 + [i % 30 == 29 for i in range(300)]
    trace = scaler_trace(overflows, growth_interval=10)
    assert trace[0] == (True, 65536.0) and trace[10] == (False, 64.0)
    assert run(LossScaleRule(), trace) == []


def test_scale_below_the_floor_is_reported_once() -> None:
    trace = scaler_trace([True] * 18 + [False] * 50)
    assert [s for _, s in trace[15:19]] == [2.0, 1.0, 0.5, 0.25]
    fired = run(LossScaleRule(max_consecutive_skips=100), trace)
    assert [i for i, _ in fired] == [17]
    assert "0.5, below 1" in fired[0][1]


def test_consecutive_skips_are_reported_once_per_run_of_skips() -> None:
    trace = scaler_trace([True] * 25 + [False] * 5 + [True] * 20)
    rule = LossScaleRule(max_consecutive_skips=20, min_scale=1e-30)
    fired = run(rule, trace)
    assert [i for i, _ in fired] == [19, 49]
    assert "20 optimizer steps in a row" in fired[0][1]
    assert rule.consecutive == 20


def test_scale_recovering_above_the_floor_rearms_it() -> None:
    rule = LossScaleRule(min_scale=1.0)
    steps = [(True, 1.0), (True, 0.5), (False, 0.25), (False, 2.0), (True, 0.5)]
    assert [i for i, _ in run(rule, steps)] == [1, 4]


def test_no_scale_known_judges_skips_only() -> None:
    rule = LossScaleRule(max_consecutive_skips=3)
    assert [i for i, _ in run(rule, [(True, None)] * 4)] == [2]  # type: ignore[list-item]
