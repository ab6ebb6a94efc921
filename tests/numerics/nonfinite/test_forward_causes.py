"""Why a forward operation made NaN/Inf: the counts, extremes and limits its explanation quotes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from numerics.nonfinite.common import marker_line
from torch import nn

from healthmon.numerics.nonfinite import trace_nonfinite

line = marker_line(__file__)


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


def test_inf_minus_inf_and_zero_times_inf() -> None:
    a = torch.tensor([float("-inf"), 1.0])
    o = trace_nonfinite(lambda: (a - a.max(-1, keepdim=True).values.clamp(max=float("-inf"))).sum()).forward
    assert o is not None and "inf - inf" in o.cause


def test_cross_entropy_with_every_target_ignored() -> None:
    z = torch.randn(3, 4)
    y = torch.full((3,), -100)
    o = trace_nonfinite(lambda: F.cross_entropy(z, y)).forward
    assert o is not None and o.op == "`F.cross_entropy`" and "every target equals ignore_index" in o.cause


def test_division_by_a_zero_norm() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    o = trace_nonfinite(lambda: (x / torch.linalg.vector_norm(x, dim=1, keepdim=True)).sum()).forward
    assert o is not None and "comes from vector_norm" in o.cause and "zero vector" in o.cause


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
