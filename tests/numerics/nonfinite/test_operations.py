"""How a traced call is named (as the user wrote it), whether it is in place, and its arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from healthmon.numerics.nonfinite.operations import (
    TracedOp,
    argument,
    base_name,
    display_name,
    is_inplace,
    raw_name,
)


@pytest.mark.parametrize(
    ("func", "shown"),
    [
        (torch.log, "`torch.log`"),
        (torch.Tensor.__truediv__, "`/` (truediv)"),
        (torch.Tensor.__rsub__, "`-` (rsub)"),
        (torch.Tensor.__imul__, "`*=` (imul)"),
        (torch.Tensor.__matmul__, "`@` (matmul)"),
        (F.softmax, "`F.softmax`"),
        (torch.Tensor.sqrt, "`Tensor.sqrt`"),
        (torch.Tensor.div, "`/` (div)"),
        (torch.Tensor.log_, "`Tensor.log_`"),
        (torch.linalg.inv, "`torch.linalg.inv`"),
    ],
)
def test_display_name_is_how_the_call_was_written(func: object, shown: str) -> None:
    assert display_name(func) == shown


def test_base_name_strips_dunders_inplace_marks_and_linalg() -> None:
    assert base_name(torch.Tensor.__truediv__) == "truediv"
    assert base_name(torch.Tensor.log_) == "log"
    assert base_name(F.softmax) == "softmax"
    assert base_name(torch.linalg.inv) == "inv"
    assert raw_name(torch.Tensor.log_) == "log_"
    assert raw_name("aten::exp") == "aten::exp"  # no name attribute: the object itself


def test_is_inplace_for_trailing_underscores_augmented_operators_and_setitem() -> None:
    assert is_inplace(torch.Tensor.log_)
    assert is_inplace(torch.Tensor.__itruediv__)
    assert is_inplace(torch.Tensor.__setitem__)
    assert not is_inplace(torch.Tensor.__truediv__)
    assert not is_inplace(torch.log)


def test_argument_by_position_or_keyword() -> None:
    x = torch.ones(2)
    assert argument((x, 3), {}, 1, "dim") == 3
    assert argument((x,), {"dim": 0}, 1, "dim") == 0
    assert argument((x,), {}, 1, "dim") is None


def test_traced_ops_link_to_the_ops_that_made_their_inputs() -> None:
    exp = TracedOp(0, torch.exp, "`torch.exp`", "model.py:3", "net.0 (Linear)", (), {}, [None])
    log = TracedOp(1, torch.log, "`torch.log`", "model.py:4", None, (), {}, [exp])
    assert log.parents[0] is exp
    assert exp.parents == [None]


def test_reflected_division_is_shown_as_the_operator() -> None:
    # torch names Tensor.__rtruediv__ "__rdiv__": `1 / x` must still read as `/`
    assert display_name(torch.Tensor.__rtruediv__) == "`/` (rdiv)"
