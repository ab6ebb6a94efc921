"""came_from: following an input back through value-keeping steps to the operation that made it."""

from __future__ import annotations

import torch

from healthmon.numerics.nonfinite.operations import TracedOp
from healthmon.numerics.nonfinite.producers import PASS_THROUGH, came_from
from healthmon.numerics.views import CASTS_AND_VIEWS


def _op(seq: int, name: str, *parents: TracedOp | None) -> TracedOp:
    return TracedOp(seq, torch.log, name, None, None, (), {}, list(parents))


def test_casts_views_and_constant_arithmetic_are_followed() -> None:
    assert set(CASTS_AND_VIEWS) <= PASS_THROUGH
    assert {"sub", "mul", "getitem", "clamp"} <= PASS_THROUGH
    assert "exp" not in PASS_THROUGH
    assert "softmax" not in PASS_THROUGH


def test_the_nearest_named_producer_through_pass_through_steps() -> None:
    softmax = _op(0, "softmax", None)
    chain = _op(3, "getitem", _op(2, "float", _op(1, "mul", None, softmax)))
    assert came_from(chain, {"softmax"}) is softmax
    assert came_from(softmax, {"softmax"}) is softmax
    assert came_from(chain, {"std"}) is None


def test_other_operations_stop_the_walk() -> None:
    softmax = _op(0, "softmax", None)
    assert came_from(_op(1, "exp", softmax), {"softmax"}) is None
    assert came_from(None, {"softmax"}) is None


def test_the_walk_stops_after_six_steps_back() -> None:
    def chain(length: int) -> TracedOp:
        op = _op(0, "softmax", None)
        for i in range(length):
            op = _op(i + 1, "view", op)
        return op

    assert came_from(chain(6), {"softmax"}) is not None
    assert came_from(chain(7), {"softmax"}) is None
