"""NaN/Inf that was there before the step: the batch (path and sample indices), a weight, untraced code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics.nonfinite.common import marker_line
from torch import nn

from healthmon.numerics.nonfinite import batch_names, trace_nonfinite
from healthmon.numerics.nonfinite.operations import is_inplace

line = marker_line(__file__)


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


# Library models pass NaN from the batch through calls that return their input as it is: timm's
# ResNets through ReLU(inplace=True), ViTs through Dropout(p=0). Both once made the pass-through
# call the origin ("it turned finite inputs into NaN"), and hid the batch.
PASS_THROUGH = {
    "Dropout(p=0)": nn.Dropout(0.0),  # F.dropout returns its input itself
    "ReLU(inplace=True)": nn.ReLU(inplace=True),  # F.relu(x, inplace=True)
    "Dropout(inplace=True)": nn.Dropout(0.1, inplace=True),  # F.dropout(x, p, training, True)
    "Hardswish(inplace=True)": nn.Hardswish(inplace=True),  # F.hardswish(x, True): by position
}


@pytest.mark.parametrize("name", PASS_THROUGH)
def test_nan_from_the_batch_keeps_its_origin_through_calls_that_return_their_input(name: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), PASS_THROUGH[name], nn.Linear(4, 1)).train()
    x = torch.randn(8, 4)
    x[3, 1] = float("nan")
    o = trace_nonfinite(lambda: net(x).sum(), module=net, batch=[x]).forward
    assert o is not None and o.phase == "input" and o.source_kind == "batch", o
    assert o.source == "batch[0]" and o.samples == [3]


@pytest.mark.parametrize("name", PASS_THROUGH)
def test_an_origin_inside_a_model_keeps_its_line_through_calls_that_return_their_input(name: str) -> None:
    layer = PASS_THROUGH[name]

    def step() -> torch.Tensor:
        y = torch.sqrt(torch.tensor([-1.0, 1.0, 4.0]))  # <- made
        return layer(y).sum()

    o = trace_nonfinite(step).forward
    assert o is not None and o.op == "`torch.sqrt`" and o.where == line("made")


def test_is_inplace_reads_the_inplace_flag_by_keyword_and_by_position() -> None:
    assert is_inplace(F.relu, (torch.ones(1),), {"inplace": True})
    assert not is_inplace(F.relu, (torch.ones(1),), {"inplace": False})
    assert is_inplace(F.dropout, (torch.ones(1), 0.5, True, True), {})
    assert not is_inplace(F.dropout, (torch.ones(1), 0.5, True, False), {})
    assert is_inplace(F.hardswish, (torch.ones(1), True), {})
    assert not is_inplace(torch.relu, (torch.ones(1),), {})
