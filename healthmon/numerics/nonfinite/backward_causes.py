"""Why the derivative of a forward operation made a finite gradient NaN/Inf, and the fix.

The classic cases: the derivative of ``sqrt`` at 0 (a distance between identical points), of
``log`` or ``pow`` at 0, a norm of a zero vector, and the ``torch.where`` trap (the discarded
branch is NaN/Inf, and its zero incoming gradient times inf is NaN).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from healthmon.alerts import CLIP_HOW
from healthmon.numerics.nonfinite.operations import TracedOp, argument
from healthmon.numerics.nonfinite.values import NAN, count_true, largest_finite, nonfinite_kinds, number_text
from healthmon.numerics.precision import dtype_name

#: Operations whose inputs are kept so their backward can be explained.
BACKWARD_EXPLAINED = frozenset(
    {
        "sqrt",
        "rsqrt",
        "log",
        "log2",
        "log10",
        "log1p",
        "pow",
        "rpow",
        "float_power",
        "div",
        "divide",
        "true_divide",
        "truediv",
        "rtruediv",
        "reciprocal",
        "norm",
        "vector_norm",
        "dist",
        "cdist",
        "acos",
        "arccos",
        "asin",
        "arcsin",
        "atan2",
        "where",
    }
)


def _masked_note(x: Any, grad_out: list[Tensor | None], grad_in: list[Tensor | None]) -> str:
    """The ``torch.where`` trap: the non-finite gradient entries had a zero incoming gradient."""
    g = next((t for t in grad_out if isinstance(t, Tensor)), None)
    if g is None or not isinstance(x, Tensor) or g.shape != x.shape:
        return ""
    bad = next((t for t in grad_in if isinstance(t, Tensor) and t.shape == g.shape), None)
    if bad is None:
        return ""
    with torch.no_grad():
        where_bad = ~torch.isfinite(bad)
        if bool(where_bad.any()) and bool((g[where_bad] == 0).all()):
            return (
                " The incoming gradient there is 0 (those entries were discarded by torch.where or "
                "a mask), but 0 * inf = NaN: a where does not stop NaN in the branch it discards."
            )
    return ""


@torch.no_grad()
def explain_backward(
    op: TracedOp, grad_out: list[Tensor | None], grad_in: list[Tensor | None]
) -> tuple[str, str]:
    """Why the derivative of ``op`` produced NaN/Inf from a finite incoming gradient, and the fix."""
    name = op.name
    args, kwargs = op.args, op.kwargs
    x = argument(args, kwargs, 0, "input")
    masked = _masked_note(x, grad_out, grad_in)
    safe_where = (
        "Make the discarded branch safe too (the safe-where pattern): "
        "torch.where(h > 0, torch.sqrt(torch.where(h > 0, h, 1.0)), 0.0)"
    )
    if name in ("sqrt", "rsqrt") and isinstance(x, Tensor):
        zeros, neg = count_true(x == 0), count_true(x < 0)
        parts = []
        if zeros:
            parts.append(
                f"the derivative of sqrt, 1/(2 sqrt(x)), is infinite at the {zeros} entries where x is "
                f"exactly 0"
            )
        if neg:
            parts.append(f"sqrt of {neg} negative entries is NaN (its derivative too)")
        cause = " and ".join(parts) + "." + masked
        hint = (
            f"{safe_where}, or clamp inside the root: torch.sqrt(h.clamp_min(1e-12))."
            if masked
            else "Add an epsilon inside the root (torch.sqrt(d2 + 1e-12)) or clamp (d2.clamp_min(1e-12)); "
            "for a norm or a distance use torch.linalg.vector_norm(h - c, dim=-1), whose gradient at 0 is 0."
        )
        return cause, hint
    if name in ("log", "log2", "log10") and isinstance(x, Tensor):
        return (
            f"the derivative of log, 1/x, is infinite at the {count_true(x == 0)} exact zero(s) of its input "
            f"({count_true(x < 0)} negative).{masked}",
            "Keep the argument of log positive (x.clamp_min(eps)); inside torch.where make the discarded "
            "branch safe: torch.log(torch.where(m, x, 1.0)).",
        )
    if name in ("pow", "rpow", "float_power") and isinstance(x, Tensor):
        e = argument(args, kwargs, 1, "exponent")
        return (
            f"the derivative of x ** {e!r}, {e!r} * x ** ({e!r} - 1), is infinite at the "
            f"{count_true(x == 0)} exact zero(s) of x.{masked}",
            "Add an epsilon to the base ((x + eps) ** p) or clamp it away from 0.",
        )
    if name in ("div", "divide", "true_divide", "truediv", "rtruediv", "reciprocal"):
        den = x if name in ("rtruediv", "reciprocal") else argument(args, kwargs, 1, "other")
        zeros = count_true(den == 0) if isinstance(den, Tensor) else 0
        return (
            f"the derivative of a / b, -a / b^2, is infinite where the denominator is 0 ({zeros} "
            f"entries).{masked}",
            "Guard the denominator: d + eps or d.clamp_min(eps), also inside the branch torch.where "
            "discards.",
        )
    if name in ("norm", "vector_norm", "dist", "cdist"):
        return (
            f"the derivative of a norm, x / ||x||, is 0/0 = NaN for a zero vector (a distance between "
            f"identical points).{masked}",
            "Use torch.linalg.vector_norm (its gradient at 0 is 0) or add an epsilon: sqrt(sum(x^2) + "
            "1e-12).",
        )
    if name in ("acos", "arccos", "asin", "arcsin") and isinstance(x, Tensor):
        return (
            f"the derivative of {name}, 1/sqrt(1 - x^2), is infinite at |x| = 1 ({count_true(x.abs() >= 1)} "
            f"entries).",
            "Clamp into the open interval: x.clamp(-1 + 1e-7, 1 - 1e-7).",
        )
    bad = [t for t in grad_in if isinstance(t, Tensor) and t.is_floating_point()]
    kinds = frozenset().union(*nonfinite_kinds(bad)) if bad else frozenset()
    if kinds and NAN not in kinds and not masked:
        top = largest_finite([t for t in grad_out if isinstance(t, Tensor)])
        dt = dtype_name(bad[0].dtype)
        return (
            f"the gradient overflows the {dt} maximum {number_text(torch.finfo(bad[0].dtype).max)} "
            f"in the backward of this operation (largest incoming gradient {number_text(top or 0.0)}): "
            "exploding gradients.",
            "Lower the learning rate, clip gradients " + CLIP_HOW + ", normalise the "
            "activations; in float16 use loss scaling or bf16.",
        )
    return (
        f"its derivative is not finite at the values it received.{masked}",
        "Keep the inputs of this operation inside the region where its derivative is finite (add an "
        "epsilon, clamp).",
    )
