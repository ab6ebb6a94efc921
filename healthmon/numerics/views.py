"""Tensor methods that keep their input's values: copies, casts and views (by name).

Two tracers follow a value back through these: the logits interceptor keeps a provenance tag
across them (a ``.float()`` of softmax output is still probabilities), and the non-finite tracer
walks back through them to the operation that made an input. Each adds its own extras (the
interceptor: ``detach``, ``t``, ``__getitem__``...; the tracer: arithmetic, indexing). The same
idea for autograd nodes is :data:`healthmon.numerics.loss_inputs.VIEW_NODES`.

>>> "reshape" in CASTS_AND_VIEWS, "exp" in CASTS_AND_VIEWS
(True, False)
"""

from __future__ import annotations

#: Methods whose result holds the input's values (copied, cast or re-viewed).
CASTS_AND_VIEWS: tuple[str, ...] = (
    "clone",
    "contiguous",
    "to",
    "float",
    "double",
    "half",
    "view",
    "reshape",
    "squeeze",
    "unsqueeze",
    "flatten",
    "permute",
    "transpose",
)
