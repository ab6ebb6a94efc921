"""The forward tracer: provenance through masks, in-place ops, views and custom Functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from numerics.nonfinite.common import marker_line
from torch import nn

from healthmon.numerics.nonfinite import NonFiniteTracer, trace_nonfinite

line = marker_line(__file__)


def test_the_tracer_never_changes_results() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 4)

    def step() -> torch.Tensor:
        return (torch.log(F.softmax(x * 50, 1)) * 2).sum()

    plain = step()
    with NonFiniteTracer():
        traced = step()
    assert torch.equal(plain, traced)


def test_a_nan_literal_is_named() -> None:
    x = torch.ones(3)
    o = trace_nonfinite(lambda: (x * float("nan")).sum()).forward
    assert o is not None and "NaN literal" in o.cause


def test_masks_are_intended_and_a_fully_masked_row_is_named() -> None:
    s = torch.randn(4, 4)
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)

    def healthy() -> torch.Tensor:
        return torch.softmax(s.masked_fill(causal, float("-inf")), -1).sum()

    t = trace_nonfinite(healthy)
    assert t.loss_finite and t.origin is None

    def empty_row() -> torch.Tensor:
        m = causal.clone()
        m[0, 0] = True  # row 0 loses its only visible position
        w = torch.softmax(s.masked_fill(m, float("-inf")), -1)  # <- softmax
        return w.sum()

    o = trace_nonfinite(empty_row).forward
    assert o is not None and o.where == line("softmax") and "fully masked row" in o.cause
    assert not o.intended


def test_a_mask_before_an_overflow_is_not_the_origin() -> None:
    s = torch.tensor([[1.0, 100.0], [2.0, 3.0]])
    mask = torch.tensor([[False, False], [False, True]])

    def step() -> torch.Tensor:
        w = torch.exp(s.masked_fill(mask, float("-inf")))  # <- exp
        return (w / w.sum(-1, keepdim=True)).sum()

    o = trace_nonfinite(step).forward
    assert o is not None and o.where == line("exp") and "exp overflows" in o.cause


def test_a_nan_made_and_discarded_is_not_blamed_but_its_successor_is() -> None:
    h = torch.tensor([1.0, -1.0, 4.0])

    def step() -> torch.Tensor:
        r = torch.where(h > 0, torch.sqrt(h), 0.0)  # NaN at -1, discarded
        return torch.log(r - 1.0).sum()  # <- second

    o = trace_nonfinite(step).forward
    assert o is not None and o.where == line("second") and o.op == "`torch.log`"


def test_an_earlier_real_origin_wins_over_the_op_that_turned_it_into_nan() -> None:
    p = torch.tensor([0.0, 0.5])

    def entropy() -> torch.Tensor:
        return -(p * torch.log(p)).sum()  # <- entropy

    o = trace_nonfinite(entropy).forward
    assert o is not None and o.op == "`torch.log`" and o.where == line("entropy")
    assert o.then is not None and "turned it into NaN" in o.then


def test_the_module_running_the_op_is_named() -> None:
    class Norm(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / x.std(0)

    net = nn.Sequential(Norm(), nn.Linear(2, 1))
    x = torch.tensor([[1.0, 2.0], [1.0, 3.0]])
    o = trace_nonfinite(lambda: net(x).sum(), module=net).forward
    assert o is not None and o.module == "0 (Norm)" and "comes from std" in o.cause


def test_in_place_ops_are_explained_with_the_values_they_read() -> None:
    x = torch.tensor([0.0, 1.0, 0.0])
    o = trace_nonfinite(lambda: x.clone().log_().sum()).forward
    assert o is not None and o.op == "`Tensor.log_`" and "log of 2 exact zero(s)" in o.cause


def test_an_in_place_op_on_a_non_finite_tensor_is_not_a_new_origin() -> None:
    x = torch.tensor([0.0, 1.0])

    def step() -> torch.Tensor:
        y = torch.log(x)  # <- first
        y.mul_(0.0)  # -inf * 0 = NaN, in place: the origin stays the log
        return y.sum()

    o = trace_nonfinite(step).forward
    assert o is not None and o.where == line("first") and o.op == "`torch.log`"


def test_properties_and_views_keep_their_provenance() -> None:
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])

    def step() -> torch.Tensor:
        y = torch.log(x)  # <- log_t
        return (y.T @ torch.ones(2, 2)).sum() + y.mT.sum()

    o = trace_nonfinite(step).forward
    assert o is not None and o.where == line("log_t")


def test_custom_autograd_functions_are_traced_inside() -> None:
    class Bad(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
            return x / 0.0  # <- custom

        @staticmethod
        def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
            return g

    x = torch.ones(2, requires_grad=True)
    o = trace_nonfinite(lambda: (Bad.apply(x) * 2).sum()).forward
    assert o is not None and o.where == line("custom") and "division by the constant 0" in o.cause
