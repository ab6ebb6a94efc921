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


def _operator_facts(matvec: MatVec | Tensor, n: int | None) -> tuple[MatVec, int, torch.dtype, torch.device]:
    """The product, dimension, dtype and device of an operator (a dense symmetric matrix works too)."""
    if isinstance(matvec, Tensor):
        dense = matvec
        return (lambda v: dense @ v), dense.shape[0], dense.dtype, dense.device
    n = getattr(matvec, "n", n)
    if n is None:
        raise ValueError("`n`: expected the operator's dimension (the operator has no `.n`), got None.")
    return (
        matvec,
        int(n),
        getattr(matvec, "dtype", torch.float32),
        getattr(matvec, "device", torch.device("cpu")),
    )


# ---- solvers -----------------------------------------------------------------------------------------
@dataclass
class KrylovBasis:
    """An orthonormal basis ``q``, its products ``w = H q`` and the projection ``t = q^T H q``.

    What a Lanczos run leaves behind: a second run on the same operator (``lambda_min`` after
    ``lambda_max``) continues from it and pays only for the products it adds.
    """

    q: Tensor
    w: Tensor
    t: Tensor


def lanczos(
    matvec: MatVec | Tensor,
    *,
    k: int = 1,
    which: Literal["largest", "smallest"] = "largest",
    v0: Tensor | None = None,
    tol: float = 1e-3,
    max_products: int = 100,
    max_basis: int = 60,
    scale: float | None = None,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The ``k`` largest (or smallest) eigenpairs by Lanczos with full reorthogonalisation.

    The basis grows one product at a time from ``v0`` (a warm start: the previous estimate's
    eigenvectors, ``(n,)`` or ``(n, j)``; their sum starts a single Krylov sequence) or a random
    vector. Each new direction is the residual of the least-converged wanted Ritz pair,
    orthogonalised twice against the basis: from one start vector this is exactly the Lanczos
    sequence, and it stays right after a restart. When the basis reaches ``max_basis`` vectors it
    is restarted from the wanted Ritz vectors and their stored products (a thick restart: no
    product is recomputed). Stops when every wanted pair has ``residual <= tol`` or after
    ``max_products`` products.

    Args:
        matvec: ``v -> H v`` on flat vectors (a :class:`HessianOperator`, any callable with
            ``n``, or a dense symmetric matrix).
        k: how many eigenvalues.
        which: "largest" (descending) or "smallest" (ascending) algebraic eigenvalues.
        v0: warm start vectors, or None for a random start.
        tol: relative residual ``||H y - theta y|| / max(|theta|, scale)`` to stop at.
        max_products: cap on Hessian-vector products.
        max_basis: largest basis kept in memory (two ``n x max_basis`` blocks: vectors and products).
        scale: floor of the residual's denominator (for eigenvalues near 0, e.g. ``lambda_min``).
        n: dimension, when ``matvec`` has no ``.n``.
        generator: for the random start vector (pass a seeded one for reproducibility; the global
            RNG is not touched).
    """
    result, _ = lanczos_with_basis(
        matvec, k=k, which=which, v0=v0, tol=tol, max_products=max_products, max_basis=max_basis,
        scale=scale, n=n, generator=generator,
    )  # fmt: skip
    return result


def lanczos_with_basis(
    matvec: MatVec | Tensor,
    *,
    k: int = 1,
    which: Literal["largest", "smallest"] = "largest",
    v0: Tensor | None = None,
    basis: KrylovBasis | None = None,
    tol: float = 1e-3,
    max_products: int = 100,
    max_basis: int = 60,
    scale: float | None = None,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[EigenResult, KrylovBasis]:
    """:func:`lanczos`, continuing from ``basis`` (its products are free) and returning the basis.

    ``v0`` is added to ``basis`` as a further start direction. ``num_products`` counts only the
    products this call computed. Buffers are allocated once (``n x max_basis``) and the projected
    matrix grows by one row per product, so a product costs O(n m) on top of ``H v``.
    """
    _check_solver_args(k, tol, max_products)
    if which not in ("largest", "smallest"):
        raise ValueError(f"`which`: expected 'largest' or 'smallest', got {which!r}.")
    matvec, n, dtype, device = _operator_facts(matvec, n)
    cap = max(int(max_basis), k + 2)
    # one basis vector per row (contiguous): q_buf[:m].T is the n x m basis without a copy
    q_buf = torch.empty(cap, n, dtype=dtype, device=device)
    w_buf = torch.empty(cap, n, dtype=dtype, device=device)
    t = torch.zeros(0, 0, dtype=torch.float64)
    m = 0
    products = 0
    if basis is not None and basis.q.shape[1]:
        m = min(basis.q.shape[1], cap - 1)
        q_buf[:m], w_buf[:m], t = basis.q[:, :m].T, basis.w[:, :m].T, basis.t[:m, :m]

    def add(z: Tensor) -> None:
        """Append the unit vector ``z`` (orthogonal to the basis) and its product."""
        nonlocal m, t, products
        wz = matvec(z[:, 0]).reshape(n)
        products += 1
        column = (q_buf[:m] @ wz).double().cpu().reshape(m, 1)
        corner = (z[:, 0] @ wz).double().cpu().reshape(1, 1)
        t = torch.cat([torch.cat([t, column], 1), torch.cat([column.T, corner], 1)], 0)
        q_buf[m], w_buf[m] = z[:, 0], wz
        m += 1

    if v0 is not None or m == 0:
        start = _start_block(v0, n, 1, dtype, device, generator).sum(1, keepdim=True)
        z = _orthonormalise(start, q_buf[:m].T)
        if z.shape[1] == 0:
            z = _orthonormalise(_start_block(None, n, 1, dtype, device, generator), q_buf[:m].T)
        if z.shape[1]:
            add(z)
    while True:
        q, w = q_buf[:m].T, w_buf[:m].T
        ritz = _rayleigh_ritz(q, w, which, 0.0, scale, t=t, cols=k)
        wanted = min(k, ritz.values.numel())
        res = ritz.residuals[:wanted]
        if (wanted == k and max(res) <= tol) or products >= max_products or m >= n:
            return _result(ritz, k, tol, products, "lanczos"), KrylovBasis(q, w, t)
        worst = max(range(wanted), key=lambda i: res[i]) if wanted == k else wanted - 1
        direction = (ritz.products[:, worst] - ritz.vectors[:, worst] * ritz.values[worst].item()).reshape(
            n, 1
        )
        if m >= cap:  # thick restart on the Ritz vectors worth keeping
            keep = min(ritz.values.numel(), max(k + 1, cap // 2))
            kept = _rayleigh_ritz(q, w, which, 0.0, scale, t=t, cols=keep)
            q_buf[:keep], w_buf[:keep] = kept.vectors.T, kept.products.T
            t = torch.diag(kept.values[:keep])  # H is diagonal in its own Ritz basis
            m = keep
        z = _orthonormalise(direction, q_buf[:m].T)
        if z.shape[1] == 0:  # invariant subspace found: continue with a fresh random direction
            z = _orthonormalise(_start_block(None, n, 1, dtype, device, generator), q_buf[:m].T)
            if z.shape[1] == 0:
                return _result(ritz, k, tol, products, "lanczos"), KrylovBasis(q, w, t)
        add(z)


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
    matvec, n, dtype, device = _operator_facts(matvec, n)
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
    tol: float = 1e-3,
    max_products: int = 100,
    scale: float | None = None,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """``lambda_min`` (negative curvature) from the shifted operator ``H - lambda_max I``.

    All eigenvalues of the shifted operator are ``<= 0`` (``lambda_max`` from a Ritz value may be
    slightly low, which only leaves a tiny positive one), so its dominant eigenvalue is
    ``lambda_min - lambda_max``. "power" iterates on it; "lanczos" builds the same Krylov space
    (shift-invariant) and reads off the smallest Ritz value, far fewer products when the bottom
    of the spectrum is crowded. The result is an upper bound on ``lambda_min`` even unconverged.
    """
    if solver == "power":
        return power_iteration(
            matvec, k=1, v0=v0, shift=float(lambda_max), tol=tol, max_products=max_products,
            scale=scale, n=n, generator=generator,
        )  # fmt: skip
    if solver != "lanczos":
        raise ValueError(f"`solver`: expected one of {SOLVERS}, got {solver!r}.")
    return lanczos(
        matvec, k=1, which="smallest", v0=v0, tol=tol, max_products=max_products, scale=scale, n=n,
        generator=generator,
    )  # fmt: skip
