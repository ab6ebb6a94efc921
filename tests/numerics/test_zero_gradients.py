"""Exactly-zero gradients: stationary points, streaks with updates between them, the finding."""

from __future__ import annotations

import math

import torch

from healthmon.numerics.zero_gradients import (
    StationaryWatch,
    ZeroGradientRule,
    ZeroStreaks,
    at_stationary_point,
    zero_finding,
    zero_hits,
)


def test_stationary_point_is_the_whole_gradient_collapsed_below_its_peak():
    # full-batch least squares at its float32 optimum: the bias gradient (the mean residual) is
    # exactly 0 and the weights' is roundoff, 7 orders of magnitude below the first step's
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = x @ torch.full((16, 1), 0.25, dtype=torch.float64) + 1.0
    xb = torch.cat([x, torch.ones(512, 1, dtype=torch.float64)], 1)
    w = torch.linalg.lstsq(xb, y).solution.float().requires_grad_()
    torch.nn.functional.mse_loss(xb.float() @ w, y.float()).backward()
    peak = 2.0 * float((y * x).mean(0).norm())  # the gradient at w = 0, about
    assert w.grad is not None and at_stationary_point(float(w.grad.norm()), peak)
    # a cut path while the rest of the model learns: the global norm is still at its scale
    assert not at_stationary_point(0.3, 1.0)
    assert at_stationary_point(1e-3, 1.0) and not at_stationary_point(1.01e-3, 1.0)
    # a model that never had a gradient (every path cut from the start) is at no optimum
    assert not at_stationary_point(0.0, 0.0)
    assert not at_stationary_point(math.nan, 1.0) and not at_stationary_point(0.0, math.inf)


def test_stationary_watch_keeps_a_peak_per_optimizer():
    watch = StationaryWatch()
    assert not watch.update(0, 2.0) and not watch.update(0, math.inf)
    assert watch.update(0, 2e-3) and not watch.update(1, 2e-3)
    assert watch.peaks == {0: 2.0, 1: 2e-3}


def test_streaks_count_only_steps_with_an_update_between():
    streaks = ZeroStreaks(3)
    assert [streaks.observe("a", u) for u in (0, 0, 1, 1, 2)] == [1, 1, 2, 2, 3]
    assert streaks.judge(["a", "b"], [0, 1], 3) == [0]  # a: 4; b: 1
    assert streaks.judge(["a", "b"], [1], 4) == []  # a ends, b: 2
    assert streaks.observe("a", 4) == 1


def test_zero_hits_skip_legitimate_and_empty_tensors():
    assert zero_hits(
        [4.0, 4.0, 0.0, 3.0, 0.0], [4.0, 4.0, 0.0, 4.0, 2.0], [True, False, True, True, True], 1.0
    ) == [0]
    assert zero_hits([3.0, math.nan], [4.0, math.nan], [True, True], 0.75) == [0]


def test_zero_finding_exact_message():
    names = [f"p{i}" for i in range(7)]
    found = zero_finding(names, 1.0, 1.0, 3, 2.3456)
    assert (found.code, found.where, found.value) == ("grad.zero", "p0", 1.0)
    assert found.message == (
        "The gradient of 7 parameter tensor(s) is entirely zero while the loss is 2.35, and stayed so "
        "over 3 checked steps with optimizer updates between them: p0, p1, p2, p3, p4 and 2 more."
    )
    partial = zero_finding(["w"], 0.9, 0.9, 2, math.nan)
    assert "is at least 90% zeros while the loss is unknown" in partial.message and partial.message.endswith(
        ": w."
    )


def test_rule_counts_and_norms_paths_share_streaks():
    w, b, emb = torch.zeros(2, 2), torch.zeros(2), torch.zeros(3, 2)
    rule = ZeroGradientRule(1.0, 3)
    names = {id(w): "w", id(b): "b", id(emb): "emb"}.__getitem__
    name_of = lambda p: names(id(p))  # noqa: E731
    # step 0 (counting): w and b entirely zero, emb's zeros are structural
    counts = {"zeros": [4.0, 2.0, 0.0], "totals": [4.0, 2.0, 6.0], "judged": [True, True, False]}
    assert rule.judge([w, b, emb], **counts, updates=0, loss=1.0, name_of=name_of) is None
    # steps 1 and 2 (norms): b's norm is nonzero at step 1, so only w reaches 3 zero steps
    assert (
        rule.judge_norms(
            [w, b, emb], [0.0, 0.5, 0.0], [True, True, False], updates=1, loss=1.0, name_of=name_of
        )
        is None
    )
    found = rule.judge_norms(
        [w, b, emb], [0.0, 0.0, 0.0], [True, True, False], updates=2, loss=1.0, name_of=name_of
    )
    assert found is not None and found.where == "w" and found.value == 1.0 and found.message.endswith(": w.")
    # a stationary point of the whole model restarts every streak
    assert not rule.at_stationary_point(0, 1.0, [id(w)])
    assert rule.at_stationary_point(0, 1e-4, [id(w), id(b)])
    assert rule.judge_norms([w], [0.0], [True], updates=3, loss=1.0, name_of=name_of) is None
