"""NaN/Inf that was there before the step: the batch (path and sample indices), a weight, untraced code."""

from __future__ import annotations

import torch
from torch import nn

from healthmon.numerics.nonfinite import batch_names, trace_nonfinite


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
    assert {p: t is x for t, p in batch_names(batch)}["batch['x']"]


def test_a_nan_weight_is_named_as_a_corrupted_parameter() -> None:
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    o = trace_nonfinite(lambda: lin(torch.ones(1, 3)).sum(), module=lin).forward
    assert o is not None and o.source_kind == "parameter" and o.source == "weight"


def test_the_batch_origin_says_where_it_enters_the_computation() -> None:
    lin = nn.Linear(2, 1)
    x = torch.tensor([[1.0, float("nan")]])
    o = trace_nonfinite(lambda: lin(x).sum(), module=lin, batch=[x]).forward
    assert o is not None and o.source == "batch[0]"
    assert "It first enters the computation at `F.linear` in Linear.forward at" in o.cause


def test_values_made_by_code_the_tracer_does_not_see_are_named_so() -> None:
    x = torch.ones(2, requires_grad=True)

    def step() -> torch.Tensor:
        with torch._C.DisableTorchFunction():  # as an extension kernel would
            y = x / 0.0
        return (y * 2).sum()

    o = trace_nonfinite(step).forward
    assert o is not None and o.phase == "input" and o.source_kind == "untraced"
    assert "custom autograd Function" in o.cause
