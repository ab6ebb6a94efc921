"""Extreme eigenpairs of a symmetric operator given only ``v -> A v`` (pure torch).

Lanczos with full reorthogonalisation and thick restarts, and block power (subspace) iteration,
both with Rayleigh-Ritz. Every eigenvalue reported is a Rayleigh-Ritz value of an orthonormal
basis, so it lies inside ``[lambda_min, lambda_max]`` whether or not it converged: an unconverged
top value is a lower bound on ``lambda_max`` and an unconverged bottom value an upper bound on
``lambda_min``. The ``converged`` flag is computed from the true residual
``||A y - theta y|| / |theta|`` of the returned pair (products are stored, so no extra product is
spent on it): it never claims more than was measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Which = Literal["largest", "smallest", "magnitude"]
Solver = Literal["lanczos", "power"]
MatVec = Callable[[Tensor], Tensor]

SOLVERS: tuple[str, ...] = ("lanczos", "power")


@dataclass(frozen=True)
class EigenResult:
    """Ritz pairs from an iterative eigensolver.

    Attributes:
        eigenvalues: Ritz values, in the order asked for (``largest``: descending).
        eigenvectors: ``(n, k)`` orthonormal Ritz vectors, on the operator's device.
        converged: per value, whether its relative residual is at or below ``tol``.
        residuals: per value, ``||H y - theta y|| / max(|theta|, scale)``.
        num_products: Hessian-vector products spent.
        method: "lanczos" or "power".
    """

    eigenvalues: tuple[float, ...]
    eigenvectors: Tensor
    converged: tuple[bool, ...]
    residuals: tuple[float, ...]
    num_products: int
    method: str

    @property
    def all_converged(self) -> bool:
        return all(self.converged)


def _orthonormalise(x: Tensor, basis: Tensor | None, *, drop: float = 1e-6) -> Tensor:
    """Columns of ``x`` orthonormalised against ``basis`` and each other.

    Classical Gram-Schmidt with a second pass only where the first one cancelled most of the
    vector (Daniel-Gragg-Kaufman-Stewart: "twice is enough"). Columns that lose more than
    ``1 - drop`` of their norm are dropped.
    """
    cols: list[Tensor] = []
    for j in range(x.shape[1]):
        z = x[:, j].clone()
        norm0 = float(torch.linalg.vector_norm(z))
        if norm0 == 0 or not math.isfinite(norm0):
            continue
        before = norm0
        for _ in range(2):
            for b in (basis, torch.stack(cols, 1) if cols else None):
                if b is not None and b.shape[1]:
                    z -= b @ (b.T @ z)
            norm = float(torch.linalg.vector_norm(z))
            if norm > 0.7 * before:
                break
            before = norm
        if norm > drop * norm0:
            cols.append(z / norm)
    if not cols:
        return x.new_zeros(x.shape[0], 0)
    return torch.stack(cols, 1)


@dataclass(frozen=True)
class _Ritz:
    values: Tensor  # float64, cpu, chosen order
    vectors: Tensor  # (n, k)
    products: Tensor  # (n, k) = H @ vectors
    residuals: list[float]


def _rayleigh_ritz(
    q: Tensor,
    w: Tensor,
    which: Which,
    shift: float,
    scale: float | None,
    *,
    t: Tensor | None = None,
    cols: int | None = None,
) -> _Ritz:
    """Ritz pairs of the symmetric ``H`` on ``span(q)`` given ``w = H q``, ordered.

    ``t`` is the projected matrix ``q^T H q`` when the caller maintains it (Lanczos grows it one
    row at a time: O(n m) per product instead of O(n m^2)); ``cols`` limits the Ritz vectors built
    (and their residuals) to the first ``cols`` in order. ``values`` always holds all of them.
    """
    if t is None:
        t = (q.T @ w).double().cpu()
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(
            "non-finite Hessian-vector products: the loss or its curvature is NaN/Inf here"
        )
    t = (t + t.T) / 2
    theta, s = torch.linalg.eigh(t)
    if which == "largest":
        order = torch.argsort(theta, descending=True)
    elif which == "smallest":
        order = torch.argsort(theta)
    else:
        order = torch.argsort((theta - shift).abs(), descending=True)
    theta, s = theta[order], s[:, order]
    if cols is not None:
        s = s[:, :cols]
    s = s.to(dtype=q.dtype, device=q.device)
    built = theta[: s.shape[1]]
    y, hy = q @ s, w @ s
    r = torch.linalg.vector_norm(hy - y * built.to(dtype=q.dtype, device=q.device), dim=0)
    r = r.double().cpu() / torch.linalg.vector_norm(y, dim=0).double().cpu()
    denom = built.abs()
    if scale is not None:
        denom = denom.clamp_min(abs(scale))
    res = (r / denom).tolist()
    res = [x if math.isfinite(x) else math.inf for x in res]
    return _Ritz(theta, y, hy, res)


def _result(ritz: _Ritz, k: int, tol: float, products: int, method: str) -> EigenResult:
    k = min(k, ritz.values.numel())
    res = tuple(ritz.residuals[:k])
    return EigenResult(
        eigenvalues=tuple(ritz.values[:k].tolist()),
        eigenvectors=ritz.vectors[:, :k],
        converged=tuple(r <= tol for r in res),
        residuals=res,
        num_products=products,
        method=method,
    )


def _start_block(
    v0: Tensor | None,
    n: int,
    cols: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    """The start vectors: ``v0`` (``(n,)`` or ``(n, j)``) padded with Gaussian columns to ``cols``."""
    parts = []
    if v0 is not None:
        v0 = v0.reshape(n, -1).to(dtype=dtype, device=device)
        if torch.isfinite(v0).all():
            parts.append(v0)
    have = sum(p.shape[1] for p in parts)
    if have < cols:
        parts.append(torch.randn(n, cols - have, generator=generator, dtype=dtype).to(device))
    return torch.cat(parts, 1)


def _check_solver_args(k: int, tol: float, max_products: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k`: expected an integer >= 1, got {k!r}.")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"`tol`: expected a number in (0, 1), got {tol!r}.")
    if isinstance(max_products, bool) or not isinstance(max_products, int) or max_products < k:
        raise ValueError(f"`max_products`: expected an integer >= k = {k}, got {max_products!r}.")


def _operator_facts(
    matvec: MatVec | Tensor, n: int | None
) -> tuple[MatVec, int, torch.dtype, torch.device, torch.dtype]:
    """The product in the working dtype, the dimension, the working dtype, device and operator dtype.

    A dense symmetric matrix works too. Products of a low-precision operator are cast to
    :func:`working_dtype` (float32), so the solvers never compute in bf16/fp16.
    """
    if isinstance(matvec, Tensor):
        dense = matvec
        n, op_dtype, device = dense.shape[0], dense.dtype, dense.device
        work = working_dtype(op_dtype)
        return (lambda v: (dense @ v.to(op_dtype)).to(work)), n, work, device, op_dtype
    n = getattr(matvec, "n", n)
    if n is None:
        raise ValueError("`n`: expected the operator's dimension (the operator has no `.n`), got None.")
    op_dtype = getattr(matvec, "dtype", torch.float32)
    work = working_dtype(op_dtype)
    inner = matvec

    def product(v: Tensor) -> Tensor:
        out = inner(v if op_dtype == work else v.to(op_dtype))
        return out if out.dtype == work else out.to(work)

    return product, int(n), work, getattr(matvec, "device", torch.device("cpu")), op_dtype


# ---- solvers -----------------------------------------------------------------------------------------
def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the solvers compute in: float64 stays, anything else (bf16, fp16, fp32) is float32.

    Products of a low-precision model are rounded to its dtype, but the Krylov basis, its
    orthogonalisation and the projected problem must not be: a bf16 basis loses orthogonality
    within a few vectors and its Ritz values leave the spectrum.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def vector_ratio(dtype: torch.dtype) -> float:
    """Memory of one working-dtype vector over one parameter-dtype vector (bf16: 2, float32: 1)."""
    return working_dtype(dtype).itemsize / dtype.itemsize


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
    ``||H y - theta y||``: ``converged`` is never claimed from the recurrence alone.

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
        n: dimension, when ``matvec`` has no ``.n``.
        generator: for the random start vector (pass a seeded one for reproducibility; the global
            RNG is not touched).
    """
    _check_solver_args(k, tol, max_products)
    if which not in ("largest", "smallest"):
        raise ValueError(f"`which`: expected 'largest' or 'smallest', got {which!r}.")
    if not (isinstance(random_weight, (int, float)) and random_weight >= 0):
        raise ValueError(f"`random_weight`: expected a number >= 0, got {random_weight!r}.")
    matvec, n, dtype, device, op_dtype = _operator_facts(matvec, n)
    cap = min(basis_capacity(op_dtype, k=k, max_memory_factor=max_memory_factor, max_basis=max_basis), n)
    q_buf = torch.empty(cap, n, dtype=dtype, device=device)  # one basis vector per row
    t = torch.zeros(0, 0, dtype=torch.float64)
    m = 0
    products = 0

    start = torch.randn(n, generator=generator, dtype=dtype).to(device)
    if v0 is not None:
        warm = v0.reshape(n, -1).to(dtype=dtype, device=device).sum(1)
        norm = torch.linalg.vector_norm(warm)
        if bool(torch.isfinite(norm)) and float(norm) > 0 and random_weight > 0:
            # the random part filtered once by H: its weight is then relative within H's range
            # (a Hessian is nearly low-rank; a plain random vector would put ~all its norm in
            # the null space and leave a new top direction a component of ~1/sqrt(n))
            start = matvec(start).reshape(n)
            products += 1
            filtered = torch.linalg.vector_norm(start)
            if bool(torch.isfinite(filtered)) and float(filtered) > 0:
                start = warm / norm + random_weight * start / filtered
            else:
                start = warm / norm
        elif bool(torch.isfinite(norm)) and float(norm) > 0:
            start = warm / norm
        del warm
    f = start
    del start
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
    _check_solver_args(k, tol, max_products)
    matvec, n, dtype, device, _ = _operator_facts(matvec, n)
    x = _orthonormalise(_start_block(v0, n, k, dtype, device, generator)[:, : max(k, 1)], None)
    while x.shape[1] < k:
        x = torch.cat([x, _orthonormalise(_start_block(None, n, 1, dtype, device, generator), x)], 1)
    products = 0
    while True:
        w = torch.stack([matvec(x[:, j]) for j in range(x.shape[1])], 1)
        products += x.shape[1]
        ritz = _rayleigh_ritz(x, w, "magnitude", shift, scale)
        if max(ritz.residuals[:k]) <= tol or products + k > max_products:
            return _result(ritz, k, tol, products, "power")
        nxt = _orthonormalise(ritz.products - shift * ritz.vectors, None)
        while nxt.shape[1] < k:  # H annihilated a direction: refill at random
            nxt = torch.cat(
                [nxt, _orthonormalise(_start_block(None, n, 1, dtype, device, generator), nxt)], 1
            )
        x = nxt


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
