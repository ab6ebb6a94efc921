"""Block power (subspace) iteration with Rayleigh-Ritz: the eigenvalues farthest from a shift.

>>> import torch
>>> h = torch.diag(torch.tensor([5.0, -3.0, 1.0], dtype=torch.float64))
>>> g = torch.Generator().manual_seed(0)
>>> r = power_iteration(h, k=1, tol=1e-6, max_products=400, generator=g)
>>> round(r.eigenvalues[0], 6), r.all_converged
(5.0, True)
"""

from __future__ import annotations

import torch
from torch import Tensor

from healthmon.numerics.eigensolvers.operators import MatVec, check_solver_args, operator_facts, start_block
from healthmon.numerics.eigensolvers.ritz import EigenResult, orthonormalise, rayleigh_ritz, ritz_result


def power_iteration(
    matvec: MatVec | Tensor,
    *,
    k: int = 1,
    v0: Tensor | None = None,
    shift: float = 0.0,
    tol: float = 1e-3,
    max_products: int = 200,
    scale: float | None = None,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The ``k`` eigenpairs of ``H`` farthest from ``shift`` by block power iteration.

    Each iteration multiplies a block of ``k`` orthonormal vectors by ``H - shift * I`` and
    orthonormalises it: vector ``j`` is deflated against vectors ``< j`` inside the block, and a
    Rayleigh-Ritz step on the block returns values inside the spectrum even before convergence
    (plain sequential deflation with unconverged vectors does not). With ``shift = 0`` this finds
    the eigenvalues of largest magnitude; with ``shift >= lambda_max`` every eigenvalue of the
    shifted operator is ``<= 0`` and the one of largest magnitude is ``lambda_min`` (the most
    negative curvature). Convergence is geometric with ratio ``|lambda_{k+1} - s| / |lambda_k - s|``;
    warm starts (``v0`` = previous eigenvectors) make it a few iterations during training.

    Args:
        matvec: ``v -> H v`` on flat vectors.
        k: block size (number of eigenvalues), ordered by distance from ``shift``.
        v0: warm start ``(n,)`` or ``(n, j)``; missing columns are random.
        shift: ``sigma`` of ``H - sigma I``; reported eigenvalues are those of ``H``.
        tol: relative residual to stop at (see :func:`lanczos`).
        max_products: cap on Hessian-vector products (``k`` per iteration).
        scale: floor of the residual's denominator.
        n: dimension, when ``matvec`` has no ``.n``.
        generator: for random start columns.
    """
    check_solver_args(k, tol, max_products)
    matvec, n, dtype, device, _ = operator_facts(matvec, n)
    x = orthonormalise(start_block(v0, n, k, dtype, device, generator)[:, : max(k, 1)], None)
    while x.shape[1] < k:
        x = torch.cat([x, orthonormalise(start_block(None, n, 1, dtype, device, generator), x)], 1)
    products = 0
    while True:
        w = torch.stack([matvec(x[:, j]) for j in range(x.shape[1])], 1)
        products += x.shape[1]
        ritz = rayleigh_ritz(x, w, "magnitude", shift, scale)
        if max(ritz.residuals[:k]) <= tol or products + k > max_products:
            return ritz_result(ritz, k, tol, products, "power")
        nxt = orthonormalise(ritz.products - shift * ritz.vectors, None)
        while nxt.shape[1] < k:  # H annihilated a direction: refill at random
            nxt = torch.cat([nxt, orthonormalise(start_block(None, n, 1, dtype, device, generator), nxt)], 1)
        x = nxt
