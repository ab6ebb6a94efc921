"""Origin: named at its traced operation, and described in one paragraph per phase; OriginTrace."""

from __future__ import annotations

import torch

from healthmon.numerics.nonfinite.operations import TracedOp
from healthmon.numerics.nonfinite.origin import Origin, OriginTrace
from healthmon.numerics.nonfinite.values import NAN, NEGINF, kinds_text

LOG = TracedOp(4, torch.log, "log", "model.py:12", "net.1 (Head)", (), {}, [])


def test_an_origin_at_an_op_takes_its_name_line_module_and_order() -> None:
    origin = Origin.at_op("forward", LOG, "log of 0", "add an epsilon", frozenset({NEGINF}))
    assert (origin.op, origin.where, origin.module, origin.seq) == (
        "`torch.log`",
        "model.py:12",
        "net.1 (Head)",
        4,
    )
    assert not origin.intended
    assert Origin.at_op("forward", LOG, "c", "h", frozenset(), intended=True).intended


def test_forward_and_backward_descriptions() -> None:
    forward = Origin.at_op("forward", LOG, "log of 0.", "h", frozenset({NEGINF}))
    assert forward.describe() == (
        f"The first {kinds_text(frozenset({NEGINF}))} of the step is produced by `torch.log` "
        "at model.py:12 (in net.1 (Head)): log of 0."
    )
    backward = Origin.at_op("backward", LOG, "1/x at 0.", "h", frozenset({NAN}))
    backward.then = "and became NaN."
    assert backward.describe() == (
        f"The forward pass is finite; the first {kinds_text(frozenset({NAN}))} appears in the backward "
        "of `torch.log` at model.py:12 (in net.1 (Head)): 1/x at 0. and became NaN."
    )


def test_without_line_or_module_and_for_inputs() -> None:
    bare = Origin("forward", "`torch.exp`", None, None, "overflow.", "h", frozenset({NAN}))
    assert (
        bare.describe()
        == f"The first {kinds_text(frozenset({NAN}))} of the step is produced by `torch.exp`: overflow."
    )
    batch = Origin(
        "input", "batch", None, None, "batch[0] holds NaN in 2 of 8 samples.", "h", source="batch[0]"
    )
    assert batch.describe() == "batch[0] holds NaN in 2 of 8 samples."


def test_the_trace_origin_is_the_forward_one_first() -> None:
    forward = Origin.at_op("forward", LOG, "c", "h", frozenset({NAN}))
    backward = Origin.at_op("backward", LOG, "c", "h", frozenset({NAN}))
    assert OriginTrace(False, forward, backward, False, 3, []).origin is forward
    assert OriginTrace(True, None, backward, False, 3, []).origin is backward
    assert OriginTrace(True, None, None, True, 3, []).origin is None
