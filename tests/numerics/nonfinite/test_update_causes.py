"""Why an optimizer step wrote NaN/Inf into weights: read from the optimizer, its group and its state."""

from __future__ import annotations

import torch

from healthmon.numerics.nonfinite import explain_update


def test_adam_eps_that_rounds_to_zero_in_float16_counts_the_zero_second_moments() -> None:
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = torch.optim.Adam([w], lr=1e-3)
    w.grad = torch.tensor([1.0, 1e-7, 1e-7, 0.5], dtype=torch.float16)  # squares of 1e-7 underflow
    opt.step()
    assert int((opt.state[w]["exp_avg_sq"] == 0).sum()) == 2
    why = explain_update(opt, opt.param_groups[0], [w])
    assert "Adam's eps=1e-08 rounds to 0 in float16" in why.cause
    assert "smallest float16 subnormal is 5.96e-08" in why.cause
    assert "2 second-moment entries are exactly 0" in why.cause
    assert "float32 master weights" in why.hint


def test_a_non_finite_learning_rate_is_named_before_anything_else() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=float("inf"))
    why = explain_update(opt, opt.param_groups[0], [w])
    assert why.cause.startswith("the learning rate of this group is inf")
