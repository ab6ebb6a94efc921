"""Why an optimizer step wrote NaN/Inf into weights whose gradients were finite.

When the gradients of a step are finite and the weights after it are not, the update itself is
the culprit. The classic case is an Adam-type optimizer on float16 weights: its default
``eps=1e-8`` is below half the smallest float16 subnormal (5.96e-8), so ``sqrt(v) + eps`` rounds
to ``sqrt(v)``; where the second-moment estimate ``v`` of a small gradient underflows to 0, the
update ``m / (sqrt(v) + eps)`` divides by zero (the seed's ``(a + 1e-8) == a``). Other causes read
from the parameter group and the optimizer state: a non-finite learning rate, and a state that
already holds NaN/Inf.

Pure torch: no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from healthmon.numerics.precision import dtype_facts, dtype_name


@dataclass(frozen=True)
class UpdateCause:
    """The explanation of a non-finite optimizer update.

    Attributes:
        cause: what in the optimizer or its state made the update non-finite ("" when unknown).
        hint: the fix.
    """

    cause: str
    hint: str


def _g(x: float) -> str:
    return f"{x:.3g}"


@torch.no_grad()
def explain_update(optimizer: Any, group: dict[str, Any], params: Sequence[Tensor]) -> UpdateCause:
    """Why ``optimizer``'s step on ``params`` (members of ``group``) produced NaN/Inf weights.

    Checked in order: a non-finite learning rate; an ``eps`` that rounds to 0 in the parameters'
    dtype (with the number of second-moment entries that are exactly 0, where the division by
    zero happens); optimizer state that holds NaN/Inf; otherwise an overflowing update.
    """
    name = type(optimizer).__name__
    lr = group.get("lr")
    lr_value = float(lr) if isinstance(lr, (int, float, Tensor)) else None
    if lr_value is not None and not math.isfinite(lr_value):
        return UpdateCause(
            f"the learning rate of this group is {lr_value} (a scheduler or a division produced it).",
            "Check the learning-rate schedule (a factor that divides by 0, an exponent that overflows).",
        )
    eps = group.get("eps")
    low = [p for p in params if p.is_floating_point() and p.dtype in (torch.float16, torch.bfloat16)]
    if isinstance(eps, (int, float)) and eps > 0 and low:
        dtype = low[0].dtype
        facts = dtype_facts(dtype)
        if float(torch.tensor(eps, dtype=torch.float64).to(dtype)) == 0.0:
            zeros = 0
            for p in low:
                state = optimizer.state.get(p, {})
                v = state.get("exp_avg_sq", state.get("square_avg", state.get("sum")))
                if isinstance(v, Tensor):
                    zeros += int((v == 0).sum())
            where = (
                f" {zeros} second-moment entr{'y is' if zeros == 1 else 'ies are'} exactly 0 (the squared "
                "gradients underflowed), so the update divides by zero there."
                if zeros
                else " Wherever the second moment underflows to 0, the update divides by zero."
            )
            return UpdateCause(
                f"{name}'s eps={eps:g} rounds to 0 in {dtype_name(dtype)} (the smallest {dtype_name(dtype)} "
                f"subnormal is {_g(facts.smallest_subnormal)}), so sqrt(v) + eps is not protected.{where}",
                "Keep float32 master weights (precision='16-mixed' or 'bf16-mixed' instead of '16-true'), or "
                f"use an eps that {dtype_name(dtype)} represents and that bounds the step (e.g. eps=1e-4).",
            )
    for p in params:
        for key, value in optimizer.state.get(p, {}).items():
            is_state_tensor = isinstance(value, Tensor) and value.is_floating_point() and value.numel() > 1
            if is_state_tensor and not bool(torch.isfinite(value).all()):
                return UpdateCause(
                    f"the optimizer state '{key}' holds NaN/Inf (it overflowed in "
                    f"{dtype_name(value.dtype)} "
                    "or absorbed an earlier non-finite gradient).",
                    "Keep the optimizer state in float32 (mixed precision with float32 master weights), "
                    "and reset the state after a non-finite step.",
                )
    dtypes = sorted({dtype_name(p.dtype) for p in params})
    return UpdateCause(
        f"the update overflowed the weights' dtype ({', '.join(dtypes)}) although the gradients were finite.",
        "Lower the learning rate or clip the update; keep float32 master weights for low-precision training.",
    )
