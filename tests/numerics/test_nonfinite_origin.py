"""The NaN/Inf origin tracer on hand-built steps: the exact operation, line, counts and cause."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from healthmon.numerics.nonfinite_origin import (
    NonFiniteTracer,
    batch_names,
    nonfinite_kinds,
    trace_nonfinite,
)

HERE = os.path.relpath(__file__)


def line(marker: str) -> str:
    with open(__file__) as f:
        for i, text in enumerate(f, 1):
            if text.rstrip().endswith(f"# <- {marker}"):
                return f"{HERE}:{i}"
    raise AssertionError(marker)


def leaf(*values: float) -> torch.Tensor:
    return torch.tensor(values, requires_grad=True)


def test_nonfinite_kinds_are_exact() -> None:
    t = [torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")]), torch.ones(3), torch.empty(0)]
    assert nonfinite_kinds(t) == [frozenset({"NaN"}), frozenset({"-inf"}), frozenset(), frozenset()]
    c = torch.tensor([complex(1, float("inf"))])
    assert nonfinite_kinds([c]) == [frozenset({"+inf"})]
    mixed = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=torch.float16)
    assert nonfinite_kinds([mixed]) == [frozenset({"NaN", "+inf", "-inf"})]
    assert nonfinite_kinds([torch.tensor([1e300], dtype=torch.float64)]) == [frozenset()]


def test_the_tracer_never_changes_results() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 4)

    def step() -> torch.Tensor:
        return (torch.log(F.softmax(x * 50, 1)) * 2).sum()

    plain = step()
    with NonFiniteTracer():
        traced = step()
    assert torch.equal(plain, traced)


def test_log_of_exact_zeros_from_a_softmax() -> None:
    z = torch.tensor([[0.0, 200.0, -200.0], [1.0, 2.0, 3.0]])

    def step() -> torch.Tensor:
        p = F.softmax(z, dim=1)
        return torch.log(p).sum()  # <- log

    o = trace_nonfinite(step).forward
    assert o is not None and o.phase == "forward" and o.where == line("log")
    assert o.op == "`torch.log`" and o.produced == {"-inf"}
    assert "log of 2 exact zero(s) gives -inf" in o.cause and "comes from softmax" in o.cause
    assert "F.log_softmax" in o.hint


def test_division_counts_zero_denominators_and_zero_over_zero() -> None:
    n = torch.tensor([0.0, 1.0, 0.0, 2.0])
    d = torch.tensor([0.0, 0.0, 1.0, 2.0])
    o = trace_nonfinite(lambda: (n / d).sum()).forward  # <- div
    assert o is not None and o.where == line("div") and o.op == "`/` (div)"
    assert "2 denominator entries are 0 (1 of them 0/0 = NaN)" in o.cause


def test_sqrt_of_negative_values_shows_the_minimum() -> None:
    v = torch.tensor([4.0, -0.5, -2.0])
    o = trace_nonfinite(lambda: torch.sqrt(v).sum()).forward
    assert o is not None and "sqrt of 2 negative value(s) (min -2) gives NaN" in o.cause


def test_exp_overflow_shows_the_largest_input_and_the_limit() -> None:
    s = torch.tensor([1.0, 90.5, 3.0])
    o = trace_nonfinite(lambda: torch.exp(s).sum()).forward
    assert o is not None and "the largest input is 90.5" in o.cause and "x = 88.72" in o.cause
    h = torch.tensor([1.0, 12.0], dtype=torch.float16)
    o16 = trace_nonfinite(lambda: torch.exp(h).float().sum()).forward
    assert o16 is not None and "float16 maximum 6.55e+04" in o16.cause and "x = 11.09" in o16.cause


def test_float16_overflow_beyond_65504_suggests_bf16_or_loss_scaling() -> None:
    a = torch.full((4, 4), 200.0, dtype=torch.float16)
    o = trace_nonfinite(lambda: (a @ a).float().sum()).forward
    assert o is not None and o.op == "`@` (matmul)"
    assert "exceeds the float16 maximum 6.55e+04 (largest input magnitude 200)" in o.cause
    assert "bf16" in o.hint and "loss scaling" in o.hint
    big = torch.tensor([1e5, 1.0])
    cast = trace_nonfinite(lambda: big.half().float().sum()).forward
    assert cast is not None and "casting to float16 overflows: values up to 1e+05" in cast.cause


def test_empty_mean_single_value_std_and_acos_domain() -> None:
    x = torch.tensor([1.0, 2.0])
    empty = trace_nonfinite(lambda: x[x > 5].mean()).forward
    assert empty is not None and "mean of an empty tensor" in empty.cause
    one = trace_nonfinite(lambda: x[:1].std()).forward
    assert one is not None and "N - 1 = 0" in one.cause
    cos = torch.tensor([0.5, 1.0000001], dtype=torch.float64)
    ac = trace_nonfinite(lambda: torch.acos(cos).sum()).forward
    assert ac is not None and "acos of 1 value(s) outside its domain" in ac.cause


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


def test_inf_minus_inf_and_zero_times_inf() -> None:
    a = torch.tensor([float("-inf"), 1.0])
    o = trace_nonfinite(lambda: (a - a.max(-1, keepdim=True).values.clamp(max=float("-inf"))).sum()).forward
    assert o is not None and "inf - inf" in o.cause


def test_an_earlier_real_origin_wins_over_the_op_that_turned_it_into_nan() -> None:
    p = torch.tensor([0.0, 0.5])

    def entropy() -> torch.Tensor:
        return -(p * torch.log(p)).sum()  # <- entropy

    o = trace_nonfinite(entropy).forward
    assert o is not None and o.op == "`torch.log`" and o.where == line("entropy")
    assert o.then is not None and "turned it into NaN" in o.then


def test_the_batch_is_named_with_its_path_and_sample_indices() -> None:
    lin = nn.Linear(3, 2)
    x = torch.randn(6, 3)
    x[1, 0] = float("nan")
    x[4, 2] = float("inf")
    batch = {"x": x, "y": torch.zeros(6)}
    o = trace_nonfinite(lambda: lin(batch["x"]).sum(), module=lin, batch=batch).forward
    assert o is not None and o.phase == "input" and o.source_kind == "batch"
    assert o.source == "batch['x']" and o.samples == [1, 4] and o.bad_samples == 2 and o.batch_size == 6
    assert "in 2 of its 6 samples (indices 1, 4)" in o.cause
    assert dict((p, t is x) for t, p in batch_names(batch))["batch['x']"]


def test_a_nan_weight_is_named_as_a_corrupted_parameter() -> None:
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    o = trace_nonfinite(lambda: lin(torch.ones(1, 3)).sum(), module=lin).forward
    assert o is not None and o.source_kind == "parameter" and o.source == "weight"


def test_the_module_running_the_op_is_named() -> None:
    class Norm(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / x.std(0)

    net = nn.Sequential(Norm(), nn.Linear(2, 1))
    x = torch.tensor([[1.0, 2.0], [1.0, 3.0]])
    o = trace_nonfinite(lambda: net(x).sum(), module=net).forward
    assert o is not None and o.module == "0 (Norm)" and "comes from std" in o.cause


# ---- backward ---------------------------------------------------------------------------------
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


def test_cross_entropy_with_every_target_ignored() -> None:
    z = torch.randn(3, 4)
    y = torch.full((3,), -100)
    o = trace_nonfinite(lambda: F.cross_entropy(z, y)).forward
    assert o is not None and o.op == "`F.cross_entropy`" and "every target equals ignore_index" in o.cause


def test_division_by_a_zero_norm() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    o = trace_nonfinite(lambda: (x / torch.linalg.vector_norm(x, dim=1, keepdim=True)).sum()).forward
    assert o is not None and "comes from vector_norm" in o.cause and "zero vector" in o.cause


def test_a_backward_overflow_is_named_as_exploding_gradients() -> None:
    w = leaf(1.0, 2.0)
    t = trace_nonfinite(lambda: torch.sin(torch.sin(w * 1e30) * 1e30).sum())  # d/dw ~ 1e60
    o = t.backward
    assert (
        t.loss_finite and o is not None and o.op == "`*` (mul)" and "overflows the float32 maximum" in o.cause
    )
    assert "clip gradients" in o.hint


def test_the_batch_origin_says_where_it_enters_the_computation() -> None:
    lin = nn.Linear(2, 1)
    x = torch.tensor([[1.0, float("nan")]])
    o = trace_nonfinite(lambda: lin(x).sum(), module=lin, batch=[x]).forward
    assert o is not None and o.source == "batch[0]"
    assert "It first enters the computation at `F.linear` in Linear.forward at" in o.cause


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


def test_values_made_by_code_the_tracer_does_not_see_are_named_so() -> None:
    x = torch.ones(2, requires_grad=True)

    def step() -> torch.Tensor:
        with torch._C.DisableTorchFunction():  # as an extension kernel would
            y = x / 0.0
        return (y * 2).sum()

    o = trace_nonfinite(step).forward
    assert o is not None and o.phase == "input" and o.source_kind == "untraced"
    assert "custom autograd Function" in o.cause


def test_multi_head_attention_with_a_fully_padded_sequence() -> None:
    attn = nn.MultiheadAttention(4, 1, batch_first=True)
    x = torch.randn(2, 3, 4)
    pad = torch.tensor([[False, False, True], [True, True, True]])  # the second sequence is all padding
    o = trace_nonfinite(lambda: attn(x, x, x, key_padding_mask=pad)[0].sum(), module=attn).forward
    assert o is not None and o.op == "`F.multi_head_attention_forward`" and "keys are all masked" in o.cause
    assert o.module == "MultiheadAttention.forward"


def test_layer_norm_of_a_constant_row_without_eps() -> None:
    h = torch.ones(2, 4)
    o = trace_nonfinite(lambda: F.layer_norm(h, (4,), eps=0.0).sum()).forward
    assert o is not None and o.op == "`F.layer_norm`" and "variance is exactly 0 with eps=0.0" in o.cause
