"""One estimate of the Hessian spectrum's extremes: top-k, ``lambda_min`` and the trace (pure torch).

Why: gradient descent with learning rate ``lr`` diverges along an eigenvector whose eigenvalue is
above ``2/lr``, and a clearly negative eigenvalue means a saddle region (Goodfellow et al., *Deep
Learning*, ch. 4.3). Both need only the extremes of the spectrum, which Krylov methods find from
a few Hessian-vector products, warm-started from the previous estimate.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from healthmon.numerics.eigensolvers import (
    SOLVERS,
    EigenResult,
    MatVec,
    Solver,
    lanczos_with_basis,
    most_negative_eigenvalue,
    power_iteration,
)
from healthmon.numerics.trace import TraceEstimate, hutchinson_trace


@dataclass(frozen=True)
class SpectrumEstimate:
    """One estimate of the spectrum's extremes, as the monitor logs it.

    Attributes:
        top: the ``k`` largest eigenvalues (descending).
        bottom: the most negative eigenvalue (``k = 1``), or None when not asked for.
        trace: Hutchinson trace, or None.
        num_products: all Hessian-vector products of this estimate.
        seconds: wall time of this estimate.
    """

    top: EigenResult
    bottom: EigenResult | None
    trace: TraceEstimate | None
    num_products: int
    seconds: float

    @property
    def lambda_max(self) -> float:
        return self.top.eigenvalues[0]

    @property
    def lambda_min(self) -> float | None:
        return None if self.bottom is None else self.bottom.eigenvalues[0]

    @property
    def condition(self) -> float | None:
        """The condition proxy ``lambda_max / |lambda_min|`` (inf when ``lambda_min`` is 0)."""
        low = self.lambda_min
        if low is None:
            return None
        return math.inf if low == 0 else abs(self.lambda_max) / abs(low)


def _jitter(v: Tensor | None, noise: float, generator: torch.Generator | None) -> Tensor | None:
    """``v`` plus Gaussian noise of ``noise`` times each column's norm (None stays None)."""
    if v is None or noise <= 0:
        return v
    r = torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
    r = r * (
        torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=0)
        / torch.linalg.vector_norm(r.reshape(v.shape[0], -1), dim=0)
    ).reshape(v.shape[1:] if v.dim() > 1 else ())
    return v + noise * r


def estimate_spectrum(
    matvec: MatVec | Tensor,
    *,
    k: int = 1,
    solver: Solver = "lanczos",
    tol: float = 1e-3,
    max_products: int = 100,
    negative: bool = True,
    negative_scale: float = 0.0,
    trace_samples: int = 0,
    warm_top: Tensor | None = None,
    warm_bottom: Tensor | None = None,
    warm_noise: float = 0.05,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> SpectrumEstimate:
    """Top-``k`` eigenvalues, ``lambda_min`` and optionally the trace, warm-started.

    Args:
        matvec: ``v -> H v``.
        k: how many of the largest eigenvalues.
        solver: "lanczos" (default; fewest products) or "power" (block power iteration; the
            most negative eigenvalue then comes from the shifted operator).
        tol: relative residual to stop each solve at.
        max_products: cap per solve (top and bottom separately).
        negative: also estimate ``lambda_min``.
        negative_scale: ``lambda_min``'s residual is relative to
            ``max(|lambda_min|, negative_scale * |lambda_max|)``: accuracy relative to the decision
            it feeds (e.g. the negative-curvature ratio) instead of to a value that may be ~0.
        trace_samples: Hutchinson samples (0: no trace).
        warm_top: previous top eigenvectors ``(n, j)`` (warm start), or None.
        warm_bottom: previous ``lambda_min`` eigenvector, or None.
        warm_noise: relative size of a random component added to warm starts, so that the
            Krylov space sees every eigendirection and cannot settle on a nearby eigenvalue that
            is no longer the extreme one (a start vector that is almost an eigenvector of the
            new Hessian can miss the extreme one entirely).
        n: dimension, when ``matvec`` has no ``.n``.
        generator: random start vectors and probes.
    """
    if solver not in SOLVERS:
        raise ValueError(f"`solver`: expected one of {SOLVERS}, got {solver!r}.")
    started = time.perf_counter()
    warm_top = _jitter(warm_top, warm_noise, generator)
    warm_bottom = _jitter(warm_bottom, warm_noise, generator)
    basis = None
    if solver == "lanczos":
        top, basis = lanczos_with_basis(
            matvec, k=k, v0=warm_top, tol=tol, max_products=max_products, n=n, generator=generator
        )
    else:
        top = power_iteration(
            matvec, k=k, v0=warm_top, tol=tol, max_products=max_products, n=n, generator=generator
        )
        low = min(top.eigenvalues)
        if low < 0:  # negative curvature dominated: find the top k of H - low*I (all >~ 0) instead
            spent = top.num_products
            top = power_iteration(
                matvec, k=k, v0=None, shift=low, tol=tol, max_products=max_products, n=n, generator=generator
            )
            top = dataclasses.replace(top, num_products=top.num_products + spent)
    bottom = None
    if negative and basis is not None:  # the same Krylov space holds both ends of the spectrum
        bottom, _ = lanczos_with_basis(
            matvec,
            k=1,
            which="smallest",
            v0=warm_bottom,
            basis=basis,
            tol=tol,
            max_products=max_products,
            scale=abs(negative_scale * top.eigenvalues[0]) or None,
            n=n,
            generator=generator,
        )
    elif negative:
        bottom = most_negative_eigenvalue(
            matvec,
            lambda_max=top.eigenvalues[0],
            solver=solver,
            v0=warm_bottom,
            tol=tol,
            max_products=max_products,
            scale=abs(negative_scale * top.eigenvalues[0]) or None,
            n=n,
            generator=generator,
        )
    trace = (
        hutchinson_trace(matvec, num_samples=trace_samples, n=n, generator=generator)
        if trace_samples
        else None
    )
    products = (
        top.num_products + (bottom.num_products if bottom else 0) + (trace.num_products if trace else 0)
    )
    return SpectrumEstimate(top, bottom, trace, products, time.perf_counter() - started)
