"""Gradient clipping: the global norm of the clipped gradients (pure torch).

Why: with clipping on, the monitor logs the norm after clipping next to the norm before it; the
clipped gradient exists only right before ``optimizer.step`` (clipping rewrites it in place).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from healthmon.numerics.gradients import global_norm, tensor_norms


def clipped_norm(params: Sequence[Tensor]) -> Tensor | None:
    """The global L2 norm of the parameters' current gradients (a device scalar), None without any."""
    grads = [p.grad for p in params if p.grad is not None]
    return global_norm(tensor_norms(grads)) if grads else None
