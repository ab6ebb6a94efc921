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
    lanczos,
    most_negative_eigenvalue,
    power_iteration,
    vector_ratio,
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
        """The largest Hessian eigenvalue estimated."""
        return self.top.eigenvalues[0]

    @property
    def lambda_min(self) -> float | None:
        """The most negative Hessian eigenvalue estimated, or None when it was not asked for."""
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
    random_weight: float = 0.5,
    max_memory_factor: float = 10.0,
    verify: bool = True,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> SpectrumEstimate:
    """Top-``k`` eigenvalues, ``lambda_min`` and optionally the trace, warm-started.

    The top and the bottom are separate solves, one after the other, each within
    ``max_memory_factor`` x the parameter memory (the bottom solve's budget leaves room for the
    ``k`` top eigenvectors it keeps): the whole estimate's extra memory stays within the bound.

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
        random_weight: norm of a fresh random component mixed into every warm start, relative to
            the warm vector's: the Krylov space then sees every eigendirection about as well as a
            cold start does, and finds a new top direction orthogonal to the previous one (an
            eigenvalue crossing) instead of settling on the previous, no longer extreme, value.
        max_memory_factor: bound on the solvers' memory, in multiples of the parameter memory
            (see :func:`~healthmon.numerics.eigensolvers.basis_capacity`).
        verify: Lanczos confirms convergence with explicit products (False: the recurrence's
            residual decides, one product sooner; see :func:`lanczos`).
        n: dimension, when ``matvec`` has no ``.n``.
        generator: random start vectors and probes.
    """
    if solver not in SOLVERS:
        raise ValueError(f"`solver`: expected one of {SOLVERS}, got {solver!r}.")
    started = time.perf_counter()
    if solver == "lanczos":
        top = lanczos(
            matvec, k=k, v0=warm_top, random_weight=random_weight, tol=tol, max_products=max_products,
            max_memory_factor=max_memory_factor, verify=verify, n=n, generator=generator,
        )  # fmt: skip
    else:
        top = power_iteration(
            matvec, k=k, v0=_jitter(warm_top, random_weight, generator), tol=tol,
            max_products=max_products, n=n, generator=generator,
        )  # fmt: skip
        low = min(top.eigenvalues)
        if low < 0:  # negative curvature dominated: find the top k of H - low*I (all >~ 0) instead
            spent = top.num_products
            top = power_iteration(
                matvec, k=k, v0=None, shift=low, tol=tol, max_products=max_products, n=n, generator=generator
            )
            top = dataclasses.replace(top, num_products=top.num_products + spent)
    bottom = None
    if negative:
        held = k * vector_ratio(getattr(matvec, "dtype", torch.float32))  # the top eigenvectors
        bottom = most_negative_eigenvalue(
            matvec,
            lambda_max=top.eigenvalues[0],
            solver=solver,
            v0=warm_bottom if solver == "lanczos" else _jitter(warm_bottom, random_weight, generator),
            random_weight=random_weight,
            tol=tol,
            max_products=max_products,
            max_memory_factor=max(max_memory_factor - held, 0.0),
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
