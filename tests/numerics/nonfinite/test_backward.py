"""Backward origins: the derivative that made a finite gradient NaN/Inf; finite steps trace nothing."""

from __future__ import annotations

import pytest
import torch
from numerics.nonfinite.common import leaf, marker_line
from torch import nn

from healthmon.numerics.nonfinite import trace_nonfinite

line = marker_line(__file__)


def test_backward_of_sqrt_at_zero() -> None:
    h = leaf(1.0, 2.0, 3.0)

    def step() -> torch.Tensor:
        c = h.detach()[0]
        return torch.sqrt((h - c) ** 2).sum()  # <- dist

    t = trace_nonfinite(step)
    assert t.loss_finite and t.forward is None and t.grads_finite is False
    o = t.backward
    assert o is not None and o.phase == "backward" and o.where == line("dist") and o.op == "`torch.sqrt`"
    assert "infinite at the 1 entries where x is exactly 0" in o.cause


def test_backward_of_the_where_trap_names_the_masked_zero_gradient() -> None:
    h = leaf(-1.0, 0.0, 4.0)
    o = trace_nonfinite(lambda: torch.where(h > 0, torch.sqrt(h), 0.0).sum()).backward
    assert o is not None and o.op == "`torch.sqrt`" and "0 * inf = NaN" in o.cause and "safe-where" in o.hint
    assert "1 entries where x is exactly 0" in o.cause and "sqrt of 1 negative entries" in o.cause


@pytest.mark.parametrize(
    ("make", "op", "phrase"),
    [
        (
            lambda h: torch.where(h > 0, torch.log(h), 0.0),
            "`torch.log`",
            "1/x, is infinite at the 1 exact zero",
        ),
        (lambda h: h**0.5, "`**` (pow)", "is infinite at the 1 exact zero(s)"),
        (lambda h: torch.sqrt((h * h).sum(-1, keepdim=True)), "`torch.sqrt`", "x is exactly 0"),
        (lambda h: torch.asin(h), "`torch.asin`", "infinite at |x| = 1 (1 entries)"),
    ],
    ids=["log_where", "pow_half", "hand_written_norm", "asin"],
)
def test_backward_singularities(make: object, op: str, phrase: str) -> None:
    h = {"`torch.asin`": leaf(1.0, 0.5), "`torch.sqrt`": leaf(0.0, 0.0)}.get(op, leaf(0.0, 0.5))
    t = trace_nonfinite(lambda: make(h).sum())  # type: ignore[operator]
    assert t.loss_finite and t.backward is not None, t
    assert t.backward.op == op and phrase in t.backward.cause


def test_finite_steps_trace_nothing_and_report_finite_gradients() -> None:
    lin = nn.Linear(3, 2)
    t = trace_nonfinite(lambda: lin(torch.ones(4, 3)).pow(2).mean(), module=lin)
    assert t.loss_finite and t.grads_finite and t.origin is None and t.ops >= 3 and not t.errors
    assert lin.weight.grad is None  # autograd.grad: .grad is never written


def test_a_backward_overflow_is_named_as_exploding_gradients() -> None:
    w = leaf(1.0, 2.0)
    t = trace_nonfinite(lambda: torch.sin(torch.sin(w * 1e30) * 1e30).sum())  # d/dw ~ 1e60
    o = t.backward
    assert (
        t.loss_finite and o is not None and o.op == "`*` (mul)" and "overflows the float32 maximum" in o.cause
    )
    assert "clip gradients" in o.hint
