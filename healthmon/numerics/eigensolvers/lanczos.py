"""Thick-restart Lanczos with full reorthogonalisation, within a memory budget.

The Krylov basis is the memory: :func:`basis_capacity` turns a multiple of the parameter memory
into a number of basis vectors, and :func:`lanczos` restarts (Krylov-Schur form) when the basis
is full. Convergence is never claimed from the recurrence alone: the wanted pairs are verified
with explicit products.

>>> import torch
>>> h = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
>>> g = torch.Generator().manual_seed(0)
>>> top = lanczos(h, k=2, tol=1e-8, generator=g)
>>> [round(v, 6) for v in top.eigenvalues], top.all_converged
([10.0, 9.0], True)
>>> basis_capacity(torch.float32, k=1, max_memory_factor=10.0)
6
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from healthmon.numerics.eigensolvers.operators import (
    MatVec,
    check_solver_args,
    operator_facts,
    vector_ratio,
    working_dtype,
)
from healthmon.numerics.eigensolvers.ritz import EigenResult


def minimum_memory_factor(dtype: torch.dtype, k: int) -> float:
    """The smallest ``max_memory_factor`` :func:`lanczos` accepts for ``k`` values (fp32 k=1: 6)."""
    return (2 * k + 4) * vector_ratio(dtype)


def basis_capacity(n_dtype: torch.dtype, *, k: int, max_memory_factor: float, max_basis: int = 60) -> int:
    """How many basis vectors :func:`lanczos` may keep within ``max_memory_factor`` x parameter memory.

    Parameter memory is ``n`` elements of the operator's dtype ``n_dtype``; the solver's vectors
    are in :func:`working_dtype`. Alive at once: the basis (``cap``), the residual ``f``, ``k``
    Ritz vectors (at a restart ``k + 1``, ``f`` included) and one Hessian-vector product, whose
    own memory is taken as two vectors (its result and one temporary; the autograd graph of the
    probe batch is activation memory, not counted here): ``cap + k + 3`` vectors in all.
    Raises ValueError when not even a basis of ``k + 1`` vectors fits.
    """
    work = working_dtype(n_dtype)
    ratio = vector_ratio(n_dtype)
    vectors = math.floor(max_memory_factor / ratio + 1e-9)
    cap = min(int(max_basis), vectors - (k + 3))
    if cap < k + 1:
        raise ValueError(
            f"`max_memory_factor`: expected at least {minimum_memory_factor(n_dtype, k):g} for k={k} "
            f"on a {n_dtype} operator (a {work} basis of k + 1 vectors and k + 3 work vectors), "
            f"got {max_memory_factor!r}."
        )
    return cap


def lanczos(
    matvec: MatVec | Tensor,
    *,
    k: int = 1,
    which: Literal["largest", "smallest"] = "largest",
    v0: Tensor | None = None,
    random_weight: float = 0.5,
    tol: float = 1e-3,
    max_products: int = 100,
    max_basis: int = 60,
    max_memory_factor: float = 10.0,
    scale: float | None = None,
    verify: bool = True,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The ``k`` largest (or smallest) eigenpairs by thick-restart Lanczos.

    The Krylov sequence starts from ``v0`` (a warm start: the previous eigenvectors, ``(n,)`` or
    ``(n, j)``, summed) mixed with a fresh Gaussian vector of ``random_weight`` times its norm, or
    from the Gaussian vector alone. The random part is what makes the space honest: it gives
    every eigendirection a component of the size a cold start gives it, so a new top eigenvector
    orthogonal to the previous one (an eigenvalue crossing) is found, instead of the warm vector
    converging to the previous, no longer extreme, eigenvalue.

    Each product is orthogonalised twice against the basis (full reorthogonalisation); the
    residual of a Ritz pair is ``||f|| |s_last|`` (``f`` the part of the last product outside the
    basis). When the basis reaches its capacity (:func:`basis_capacity`: at most
    ``max_memory_factor`` x the parameter memory in all) it restarts from the ``k + 1`` best
    Ritz vectors (thick restart, Krylov-Schur form: no product is recomputed). Once every wanted
    pair's residual is at or below ``tol``, it is verified with ``k`` explicit products
    ``||H y - theta y||``: ``converged`` is never claimed from the recurrence alone, unless
    ``verify=False`` (a loose, early estimate), which stops on the recurrence's residual as ARPACK
    does, one product sooner; the value is the same extreme Ritz value of the same space.

    Args:
        matvec: ``v -> H v`` on flat vectors (a :class:`~healthmon.numerics.hvp.HessianOperator`,
            any callable with ``n``, or a dense symmetric matrix).
        k: how many eigenvalues.
        which: "largest" (descending) or "smallest" (ascending) algebraic eigenvalues.
        v0: warm start vectors, or None for a random start.
        random_weight: norm of the random part of a warm start, relative to ``v0``'s (>= 0).
        tol: relative residual ``||H y - theta y|| / max(|theta|, scale)`` to stop at.
        max_products: cap on Hessian-vector products (verification products included).
        max_basis: most basis vectors kept, whatever the memory allows.
        max_memory_factor: the solver's vectors stay within this multiple of the parameter
            memory (``n`` elements of the operator's dtype).
        scale: floor of the residual's denominator (for eigenvalues near 0, e.g. ``lambda_min``).
        verify: confirm convergence with explicit products (default); False trusts the
            recurrence's residual.
        n: dimension, when ``matvec`` has no ``.n``.
        generator: for the random start vector (pass a seeded one for reproducibility; the global
            RNG is not touched).
    """
    _check_lanczos_args(k, tol, max_products, which, random_weight)
    matvec, n, dtype, device, op_dtype = operator_facts(matvec, n)
    cap = min(basis_capacity(op_dtype, k=k, max_memory_factor=max_memory_factor, max_basis=max_basis), n)
    q_buf = torch.empty(cap, n, dtype=dtype, device=device)  # one basis vector per row
    t = torch.zeros(0, 0, dtype=torch.float64)
    m = 0

    f, products = _start_vector(matvec, n, dtype, device, v0, random_weight, generator)
    beta = float(torch.linalg.vector_norm(f))
    tiny = torch.finfo(dtype).eps * 100
    wnorm = beta
    verified_at = -1  # basis size at which a verification last failed
    while True:
        if m >= cap:  # thick restart (Krylov-Schur): keep the best Ritz vectors, f stays orthogonal
            theta, s = _ritz(t, which)
            keep = min(m - 1, k + 2)  # k + 2 new rows fit the k + 3 work vectors, f included
            y = q_buf[:m].T @ s[:, :keep].to(dtype=dtype, device=device)
            q_buf[:keep] = y.T
            del y
            t = torch.diag(theta[:keep])
            m = keep
        if beta <= tiny * wnorm:  # an invariant subspace: go on with a fresh random direction
            if m >= n:
                break
            f = torch.randn(n, generator=generator, dtype=dtype).to(device)
            f = _orthogonalise(f, q_buf[:m])
            beta = float(torch.linalg.vector_norm(f))
        q_buf[m] = f / beta
        m += 1
        del f
        f, t, beta, wnorm = _product_residual(matvec, q_buf, m, n, dtype, t)
        products += 1
        theta, s = _ritz(t, which)
        wanted = min(k, m)
        res = _scaled(beta * s[-1, :wanted].abs(), theta[:wanted], scale)
        if wanted == k and max(res) <= tol and not verify:
            y = q_buf[:m].T @ s[:, :wanted].to(dtype=dtype, device=device)
            return _lanczos_result(theta, y, res, tol, products, verified=True)
        if wanted == k and max(res) <= tol and m != verified_at:
            y = s[:, :wanted].T.to(dtype=dtype, device=device) @ q_buf[:m]  # Ritz vectors as rows
            true = []
            for j in range(wanted):
                if products >= max_products:
                    break
                r = matvec(y[j]).reshape(n)
                products += 1
                r.sub_(y[j], alpha=float(theta[j]))
                true.append(float(torch.linalg.vector_norm(r)))
                del r
            if len(true) == wanted:
                res = _scaled(torch.tensor(true, dtype=torch.float64), theta[:wanted], scale)
                if max(res) <= tol:
                    return _lanczos_result(theta, y.T, res, tol, products, verified=True)
            verified_at = m
            del y
        if products >= max_products or m >= n:
            break
    theta, s = _ritz(t, which)
    wanted = min(k, m)
    res = _scaled(beta * s[-1, :wanted].abs(), theta[:wanted], scale)
    y = q_buf[:m].T @ s[:, :wanted].to(dtype=dtype, device=device)
    return _lanczos_result(theta, y, res, tol, products, verified=False)


def _check_lanczos_args(k: int, tol: float, max_products: int, which: str, random_weight: float) -> None:
    """Raise ValueError, naming the argument, for arguments :func:`lanczos` cannot work with."""
    check_solver_args(k, tol, max_products)
    if which not in ("largest", "smallest"):
        raise ValueError(f"`which`: expected 'largest' or 'smallest', got {which!r}.")
    if not (isinstance(random_weight, (int, float)) and random_weight >= 0):
        raise ValueError(f"`random_weight`: expected a number >= 0, got {random_weight!r}.")


def _start_vector(
    matvec: MatVec,
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    v0: Tensor | None,
    random_weight: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, int]:
    """The first Krylov vector (not normalised) and the products it cost (0 or 1).

    A Gaussian vector; with a finite, nonzero warm start ``v0`` (its columns summed), the unit
    warm vector plus ``random_weight`` times the Gaussian vector filtered once by ``H`` and
    normalised (the unit warm vector alone when ``random_weight`` is 0 or the filtered vector
    vanishes).
    """
    start = torch.randn(n, generator=generator, dtype=dtype).to(device)
    if v0 is None:
        return start, 0
    warm = v0.reshape(n, -1).to(dtype=dtype, device=device).sum(1)
    norm = torch.linalg.vector_norm(warm)
    if not (bool(torch.isfinite(norm)) and float(norm) > 0):
        return start, 0
    if not random_weight > 0:
        return warm / norm, 0
    # the random part filtered once by H: its weight is then relative within H's range
    # (a Hessian is nearly low-rank; a plain random vector would put ~all its norm in
    # the null space and leave a new top direction a component of ~1/sqrt(n))
    start = matvec(start).reshape(n)
    filtered = float(torch.linalg.vector_norm(start))
    if math.isfinite(filtered) and filtered > 0:  # in place: no temporary of the model's size
        return start.mul_(random_weight / filtered).add_(warm, alpha=1 / float(norm)), 1
    return warm.div_(norm), 1


def _ritz(t: Tensor, which: str) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the projected matrix, wanted end first."""
    theta, s = torch.linalg.eigh((t + t.T) / 2)
    order = torch.argsort(theta, descending=which == "largest")
    return theta[order], s[:, order]


def _scaled(residual: Tensor, theta: Tensor, scale: float | None) -> list[float]:
    denom = theta.abs()
    if scale is not None:
        denom = denom.clamp_min(abs(scale))
    return [x if math.isfinite(x) else math.inf for x in (residual.double().cpu() / denom).tolist()]


def _orthogonalise(f: Tensor, q: Tensor) -> Tensor:
    """``f`` minus its projection on the rows of ``q``, twice (in place, no temporary vector)."""
    if q.shape[0]:
        for _ in range(2):
            f.addmv_(q.T, (q @ f), alpha=-1)
    return f


def _product_residual(
    matvec: MatVec, q_buf: Tensor, m: int, n: int, dtype: torch.dtype, t: Tensor
) -> tuple[Tensor, Tensor, float, float]:
    """The newest basis vector's product.

    Returns ``f`` (the product's part outside the basis), ``t`` grown by one row, ``||f||`` and
    the product's norm.
    """
    f = matvec(q_buf[m - 1]).reshape(n)
    if f.dtype != dtype:
        f = f.to(dtype)
    column = (q_buf[:m] @ f).double().cpu().reshape(m, 1)
    if not bool(torch.isfinite(column).all()):
        raise FloatingPointError(
            "non-finite Hessian-vector products: the loss or its curvature is NaN/Inf here"
        )
    wnorm = float(torch.linalg.vector_norm(f))
    t = torch.cat([torch.cat([t, column[:-1]], 1), column.T], 0)
    f = _orthogonalise(f, q_buf[:m])
    return f, t, float(torch.linalg.vector_norm(f)), wnorm


def _lanczos_result(
    theta: Tensor, y: Tensor, res: list[float], tol: float, products: int, *, verified: bool
) -> EigenResult:
    return EigenResult(
        eigenvalues=tuple(theta[: y.shape[1]].tolist()),
        eigenvectors=y,
        converged=tuple(verified and r <= tol for r in res),
        residuals=tuple(res),
        num_products=products,
        method="lanczos",
    )
