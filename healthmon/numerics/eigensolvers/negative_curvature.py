"""``lambda_min``: the bottom of the spectrum (negative curvature), by either solver.

>>> import torch
>>> h = torch.diag(torch.tensor([4.0, 1.0, -2.0], dtype=torch.float64))
>>> g = torch.Generator().manual_seed(0)
>>> bottom = most_negative_eigenvalue(h, lambda_max=4.0, tol=1e-8, generator=g)
>>> round(bottom.eigenvalues[0], 6)
-2.0
"""

from __future__ import annotations

import torch
from torch import Tensor

from healthmon.numerics.eigensolvers.lanczos import lanczos
from healthmon.numerics.eigensolvers.operators import SOLVERS, MatVec, Solver
from healthmon.numerics.eigensolvers.power import power_iteration
from healthmon.numerics.eigensolvers.ritz import EigenResult


def most_negative_eigenvalue(
    matvec: MatVec | Tensor,
    *,
    lambda_max: float,
    solver: Solver = "lanczos",
    v0: Tensor | None = None,
    random_weight: float = 0.5,
    tol: float = 1e-3,
    max_products: int = 100,
    max_memory_factor: float = 10.0,
    scale: float | None = None,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """``lambda_min`` (negative curvature): the bottom of the spectrum.

    "lanczos" reads off the smallest Ritz value of a Krylov space (shift-invariant, so no shift
    is needed); "power" iterates on the shifted operator ``H - lambda_max I``, whose eigenvalues
    are all ``<= 0`` (``lambda_max`` from a Ritz value may be slightly low, which only leaves a
    tiny positive one), so its dominant eigenvalue is ``lambda_min - lambda_max``. The result
    is an upper bound on ``lambda_min`` even unconverged.
    """
    if solver == "power":
        return power_iteration(
            matvec, k=1, v0=v0, shift=float(lambda_max), tol=tol, max_products=max_products,
            scale=scale, n=n, generator=generator,
        )  # fmt: skip
    if solver != "lanczos":
        raise ValueError(f"`solver`: expected one of {SOLVERS}, got {solver!r}.")
    return lanczos(
        matvec, k=1, which="smallest", v0=v0, random_weight=random_weight, tol=tol,
        max_products=max_products, max_memory_factor=max_memory_factor, scale=scale, n=n,
        generator=generator,
    )  # fmt: skip
