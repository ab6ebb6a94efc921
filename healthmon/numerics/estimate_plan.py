"""How one curvature estimate runs: its tolerance, whether it seeks ``lambda_min``, its memory.

Why: the default (time-budgeted) schedule makes cheap, loose estimates early and looks for negative
curvature only on some later estimates; the eigensolvers' memory cap may not go below what a
basis of ``top_k + 1`` vectors needs; finite-difference products are kept only where they are far
more accurate than the tolerance asked for. These decisions are pure arithmetic, kept out of the
monitor so they can be tested alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from healthmon.numerics.eigensolvers import minimum_memory_factor, vector_ratio
from healthmon.numerics.hvp import FD_AGREEMENT, HessianOperator, HVPMethod, choose_hvp_method


@dataclass(frozen=True)
class EstimatePlan:
    """The settings of one estimate.

    Attributes:
        tol: the relative residual the solvers stop at.
        negative: estimate ``lambda_min`` too.
        verify: confirm convergence with explicit products (False for the loose early estimates:
            the Lanczos recurrence's residual decides, one product sooner).
    """

    tol: float
    negative: bool
    verify: bool = True


def plan_estimate(
    step: int,
    *,
    budgeted: bool,
    early_until: int,
    estimates_done: int,
    tol: float,
    early_tol: float,
    negative_curvature: bool,
    negative_every: int,
) -> EstimatePlan:
    """The tolerance and ``lambda_min`` switch of the estimate at ``step``.

    With a fixed schedule (``budgeted=False``) every estimate uses ``tol`` and looks for negative
    curvature when asked. With the time budget, estimates before ``early_until`` use ``early_tol``,
    skip ``lambda_min`` and are not verified by extra products; later ones look for ``lambda_min``
    on every ``negative_every``-th estimate.
    """
    early = budgeted and step < early_until
    negative = negative_curvature and (
        not budgeted or (not early and (estimates_done + 1) % negative_every == 0)
    )
    return EstimatePlan(early_tol if early else tol, negative, verify=not early)


def solver_memory_factor(dtype: torch.dtype, top_k: int, max_memory_factor: float) -> float:
    """``max_memory_factor``, raised to the smallest that a ``top_k + 1`` vector basis needs."""
    return max(max_memory_factor, minimum_memory_factor(dtype, top_k) + top_k * vector_ratio(dtype))


def method_tolerance(tol: float) -> float:
    """The agreement finite differences must reach to be used: well below the solver's ``tol``.

    An operator less accurate than the tolerance asked for could never honestly converge.
    """
    return min(FD_AGREEMENT, 0.1 * tol)


def select_hvp_method(
    make_operator: Callable[[HVPMethod], HessianOperator], tol: float, generator: torch.Generator | None
) -> HVPMethod:
    """The product method for a run (see :func:`choose_hvp_method`).

    Finite differences only where they agree within :func:`method_tolerance` with the exact product.
    """
    return choose_hvp_method(make_operator, rtol=method_tolerance(tol), generator=generator)
