"""What the solvers return, and the Rayleigh-Ritz step that makes every value honest.

Every eigenvalue reported is a Rayleigh-Ritz value of an orthonormal basis, so it lies inside
``[lambda_min, lambda_max]`` whether or not it converged. Residuals are measured from stored
products (``w = H q``), never from a recurrence alone.

>>> import torch
>>> h = torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
>>> q = orthonormalise(torch.eye(3, 2, dtype=torch.float64), None)
>>> ritz = rayleigh_ritz(q, h @ q, "largest", 0.0, None)
>>> ritz.values.tolist(), ritz.residuals
([4.0, 2.0], [0.0, 0.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from healthmon.numerics.eigensolvers.operators import Which


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
        """Whether every Ritz pair met the tolerance."""
        return all(self.converged)


def orthonormalise(x: Tensor, basis: Tensor | None, *, drop: float = 1e-6) -> Tensor:
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
class Ritz:
    """Ritz pairs of one basis, all values ordered, vectors and products for the first few."""

    values: Tensor  # float64, cpu, chosen order
    vectors: Tensor  # (n, k)
    products: Tensor  # (n, k) = H @ vectors
    residuals: list[float]


def rayleigh_ritz(
    q: Tensor,
    w: Tensor,
    which: Which,
    shift: float,
    scale: float | None,
    *,
    t: Tensor | None = None,
    cols: int | None = None,
) -> Ritz:
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
    return Ritz(theta, y, hy, res)


def ritz_result(ritz: Ritz, k: int, tol: float, products: int, method: str) -> EigenResult:
    """The first ``k`` pairs of ``ritz`` as a result; converged where the residual is <= ``tol``."""
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
