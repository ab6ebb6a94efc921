"""One curvature estimate judged: the numbers to log and the findings (sharpness, saddle, skip).

Why: the sharpness test compares the estimate with the optimizer's stability limit (SGD:
``lambda_max`` against ``2/lr`` or its momentum form; Adam: the preconditioned sharpness against
``(2 + 2 beta1)/((1 - beta1) lr)``), and a clearly negative ``lambda_min`` next to a converged
``lambda_max`` marks a saddle. The decisions and their wording live here (pure Python over the
estimate's numbers); the monitor logs the values and turns the findings into alerts.
"""

from __future__ import annotations

import math

from healthmon.numerics.eigensolvers import EigenResult
from healthmon.numerics.findings import Finding
from healthmon.numerics.spectrum import SpectrumEstimate
from healthmon.numerics.stability import StabilityLimit

#: The code of a finding that says why a test could not run (the monitor's ``monitor.skipped``).
SKIPPED = "monitor.skipped"


def spectrum_values(
    est: SpectrumEstimate, limit: StabilityLimit | None, pre: EigenResult | None, products: int
) -> dict[str, float]:
    """The estimate's numbers by short name (``lambda_max``, ``lambda_1``..., ``stability_limit``...).

    ``condition`` only when finite; the finite limit is ``preconditioned_limit`` for Adam-type
    optimizers, ``stability_limit`` otherwise.
    """
    values: dict[str, float] = {"lambda_max": est.lambda_max, "products": products, "seconds": est.seconds}
    for i, v in enumerate(est.top.eigenvalues, start=1):
        values[f"lambda_{i}"] = v
    values["residual"] = max(est.top.residuals)
    values["converged"] = float(est.top.all_converged)
    low = est.lambda_min
    if low is not None:
        values["lambda_min"] = low
        if est.condition is not None and math.isfinite(est.condition):
            values["condition"] = est.condition
    if est.trace is not None:
        values["trace"] = est.trace.trace
    if limit is not None:
        values["two_over_lr"] = limit.two_over_lr
        if math.isfinite(limit.limit):
            values["preconditioned_limit" if limit.kind == "adam" else "stability_limit"] = limit.limit
    if pre is not None:
        values["preconditioned_sharpness"] = pre.eigenvalues[0]
    return values


def judge_sharpness(
    est: SpectrumEstimate,
    limit: StabilityLimit | None,
    pre: EigenResult | None,
    *,
    preconditioned: bool,
    probe_rows: int,
    clip: float = 1.0,
    left_out: int = 0,
) -> Finding | None:
    """The sharpness test: above the stability limit, a skip reason, or None (stable).

    A Ritz value is a lower bound on the true ``lambda_max``, so a finding is sound even when
    the estimate has not converged.

    Args:
        est: the estimate.
        limit: the optimizer's stability limit (None: no optimizer).
        pre: the preconditioned sharpness solve (Adam-type), or None.
        preconditioned: whether the preconditioned sharpness was asked for.
        probe_rows: samples in the probe (named in the message).
        clip: the factor gradient clipping scales a step on the probe by
            (:func:`~healthmon.numerics.stability.clip_factor`; 1 without clipping): the
            sharpness that counts is ``clip`` times the measured one.
        left_out: how many scale-invariant parameter tensors the Hessian left out (named in the
            message): those feeding a normalisation, whose step size does not decide stability.
    """
    lam = est.lambda_max
    restricted = (
        f" (Hessian on the parameters whose scale matters: {left_out} scale-invariant tensor(s) feeding "
        "a normalisation left out)"
        if left_out
        else ""
    )
    clipped = (
        f" Gradient clipping scales a step on the probe by {clip:.3g}, so the sharpness that counts "
        f"is {clip:.3g} x the measured one."
        if clip < 1.0
        else ""
    )
    if limit is None or limit.kind == "unknown":
        return Finding(SKIPPED, "sharpness: no known stability limit for this optimizer")
    if limit.kind == "sgd" and clip * lam > limit.limit:
        return Finding(
            "hessian.sharpness",
            f"The top Hessian eigenvalue lambda_max = {lam:.4g} is above the stability limit "
            f"{limit.limit:.4g} ({limit.formula}, lr={limit.lr:.3g}, 2/lr = {limit.two_over_lr:.4g}) "
            f"on a probe of {probe_rows} samples{restricted}: gradient descent oscillates and diverges "
            f"along its eigenvector.{clipped}",
            hint=f"Lower the learning rate below {limit.lr * limit.limit / (clip * lam):.3g} (where the "
            "limit meets lambda_max), or add warm-up.",
            value=lam,
        )
    if limit.kind == "adam" and pre is not None and clip * pre.eigenvalues[0] > limit.limit:
        ps = pre.eigenvalues[0]
        return Finding(
            "hessian.sharpness",
            f"The preconditioned sharpness lambda_max(P^-1 H) = {ps:.4g} is above Adam's stability "
            f"limit {limit.limit:.4g} ({limit.formula}, lr={limit.lr:.3g}){restricted}.{clipped}",
            hint="Lower the learning rate, add warm-up, or raise Adam's eps.",
            value=ps,
        )
    if limit.kind == "adam" and not preconditioned:
        return Finding(SKIPPED, "sharpness: Adam-type optimizer and preconditioned=False")
    return None


def judge_negative_curvature(est: SpectrumEstimate, negative_ratio: float) -> Finding | None:
    """A saddle: ``lambda_min < 0`` with ``|lambda_min| >= negative_ratio * lambda_max`` (converged top)."""
    lam, low = est.lambda_max, est.lambda_min
    if low is None or not (low < 0 and lam > 0 and est.top.all_converged and -low >= negative_ratio * lam):
        return None
    return Finding(
        "hessian.negative_curvature",
        f"The Hessian has a negative eigenvalue {low:.4g}, {-low / lam:.2g} of lambda_max "
        f"{lam:.4g}: the weights are near a saddle point.",
        value=low,
    )


def judge_curvature(
    est: SpectrumEstimate,
    limit: StabilityLimit | None,
    pre: EigenResult | None,
    *,
    preconditioned: bool,
    negative_ratio: float,
    probe_rows: int,
    clip: float = 1.0,
    left_out: int = 0,
) -> list[Finding]:
    """The sharpness finding (or skip), then the negative-curvature one, each when there is one."""
    found = [
        judge_sharpness(
            est,
            limit,
            pre,
            preconditioned=preconditioned,
            probe_rows=probe_rows,
            clip=clip,
            left_out=left_out,
        ),
        judge_negative_curvature(est, negative_ratio),
    ]
    return [f for f in found if f is not None]
