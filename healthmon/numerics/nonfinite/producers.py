"""Which earlier operation made an input: the softmax whose zeros reached a log, the std under a division.

An explanation follows an input back through the operations that keep its values' meaning
(arithmetic with constants, casts, views, indexing) to the operation that made them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from healthmon.numerics.nonfinite.operations import TracedOp
from healthmon.numerics.views import CASTS_AND_VIEWS

#: The traced operation that made a tensor (the tracer's ``producer``), or None.
Producer = Callable[[Any], TracedOp | None]


#: Operations followed back: elementwise arithmetic, casts, views and indexing.
PASS_THROUGH = frozenset(
    {
        *CASTS_AND_VIEWS,
        "rsub",
        "sub",
        "add",
        "radd",
        "mul",
        "rmul",
        "getitem",
        "gather",
        "index_select",
        "expand",
        "expand_as",
        "neg",
        "abs",
        "clamp",
    }
)


def came_from(op: TracedOp | None, names: set[str], depth: int = 0) -> TracedOp | None:
    """The nearest producer among ``names``, following single-input elementwise steps back."""
    if op is None or depth > 6:
        return None
    if op.name in names:
        return op
    if op.name in PASS_THROUGH:
        for parent in op.parents:
            found = came_from(parent, names, depth + 1)
            if found is not None:
                return found
    return None
