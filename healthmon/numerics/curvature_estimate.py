"""One curvature estimate on a Hessian operator: the spectrum, the stability limit, Adam's sharpness.

Why: an estimate is the spectrum's extremes (:func:`~healthmon.numerics.spectrum.estimate_spectrum`),
the optimizer's stability limit read now (:func:`~healthmon.numerics.stability.stability_limit`)
and, for Adam-type optimizers, the top eigenvalue of the preconditioned Hessian; each solve is
warm-started from the previous estimate's eigenvectors (:class:`WarmStart`). Pure torch: the
monitor builds the operator, runs this, and judges the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from healthmon.numerics.eigensolvers import EigenResult, Solver, lanczos
from healthmon.numerics.estimate_plan import EstimatePlan
from healthmon.numerics.hvp import HessianOperator
from healthmon.numerics.spectrum import SpectrumEstimate, estimate_spectrum
from healthmon.numerics.stability import StabilityLimit, adam_preconditioner, preconditioned, stability_limit


@dataclass
class WarmStart:
    """The previous estimate's eigenvectors: top-k, ``lambda_min`` and the preconditioned top."""

    top: Tensor | None = None
    bottom: Tensor | None = None
    precond: Tensor | None = None

    def keep(self, est: SpectrumEstimate, pre: EigenResult | None) -> None:
        """Remember the eigenvectors of an estimate (detached) for the next one."""
        self.top = est.top.eigenvectors.detach()
        self.bottom = None if est.bottom is None else est.bottom.eigenvectors.detach()
        self.precond = None if pre is None else pre.eigenvectors.detach()

    def state(self) -> dict[str, Tensor | None]:
        """The vectors on the CPU, for a checkpoint."""

        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu()

        return {"warm_top": cpu(self.top), "warm_bottom": cpu(self.bottom), "warm_precond": cpu(self.precond)}

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (missing vectors become None)."""
        self.top, self.bottom = state.get("warm_top"), state.get("warm_bottom")
        self.precond = state.get("warm_precond")


#: The errors an estimate may end with; :func:`failure_reason` words them.
ESTIMATE_ERRORS = (TypeError, FloatingPointError, RuntimeError)


def failure_reason(err: BaseException) -> str:
    """Why an estimate could not run, from its error (one of :data:`ESTIMATE_ERRORS`).

    ``TypeError``: no differentiable loss (its own message); NaN/Inf weights or probe batch
    (``FloatingPointError``, ``LinAlgError``): no estimate, the non-finite checks report the cause;
    any other ``RuntimeError``: a model autograd cannot differentiate twice (custom kernels...).
    """
    if isinstance(err, TypeError):
        return str(err)
    if isinstance(err, (FloatingPointError, torch.linalg.LinAlgError)):
        return f"no estimate: {err}"
    return f"no estimate, the loss cannot be differentiated twice ({err})"


@dataclass(frozen=True)
class CurvatureEstimate:
    """An estimate with what it is judged against.

    Attributes:
        spectrum: the extremes of the Hessian's spectrum.
        limit: the optimizer's stability limit (None without an optimizer).
        pre: the preconditioned sharpness solve (Adam-type optimizers), or None.
    """

    spectrum: SpectrumEstimate
    limit: StabilityLimit | None
    pre: EigenResult | None

    @property
    def products(self) -> int:
        """All Hessian-vector products of the estimate."""
        return self.spectrum.num_products + (self.pre.num_products if self.pre is not None else 0)


def estimate_curvature(
    op: HessianOperator,
    optimizer: torch.optim.Optimizer | None,
    plan: EstimatePlan,
    *,
    top_k: int,
    solver: Solver,
    max_products: int,
    negative_ratio: float,
    trace_samples: int,
    max_memory_factor: float,
    preconditioned_sharpness: bool,
    warm: WarmStart | None,
    generator: torch.Generator | None,
) -> CurvatureEstimate:
    """Estimate the spectrum of ``op`` and, for Adam-type optimizers, the preconditioned sharpness.

    Args:
        op: the Hessian operator of the probe loss.
        optimizer: the optimizer whose stability limit applies (read now: schedules included).
        plan: the tolerance and ``lambda_min`` switch, from
            :func:`~healthmon.numerics.estimate_plan.plan_estimate`.
        top_k: how many of the largest eigenvalues.
        solver: "lanczos" or "power".
        max_products: cap on products per solve.
        negative_ratio: the scale ``lambda_min``'s residual is measured against.
        trace_samples: Hutchinson samples (0: no trace).
        max_memory_factor: the solvers' memory cap, in multiples of the parameters.
        preconditioned_sharpness: solve ``P^-1/2 H P^-1/2`` for Adam-type optimizers.
        warm: the previous eigenvectors, or None for cold starts.
        generator: the random start vectors' generator.
    """
    est = estimate_spectrum(
        op,
        k=top_k,
        solver=solver,
        tol=plan.tol,
        max_products=max_products,
        negative=plan.negative,
        negative_scale=negative_ratio,
        trace_samples=trace_samples,
        warm_top=warm.top if warm is not None else None,
        warm_bottom=warm.bottom if warm is not None else None,
        max_memory_factor=max_memory_factor,
        verify=plan.verify,
        generator=generator,
    )
    limit = stability_limit(optimizer) if optimizer is not None else None
    pre = None
    if optimizer is not None and limit is not None and limit.kind == "adam" and preconditioned_sharpness:
        p = adam_preconditioner(optimizer, op.params)
        if p is not None:
            pre = lanczos(
                preconditioned(op, p),
                k=1,
                v0=warm.precond if warm is not None else None,
                tol=plan.tol,
                max_products=max_products,
                max_memory_factor=max_memory_factor,
                verify=plan.verify,
                generator=generator,
            )
    return CurvatureEstimate(est, limit, pre)
