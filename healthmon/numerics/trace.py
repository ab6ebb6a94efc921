"""Hutchinson's estimate of the trace of a symmetric operator (pure torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from healthmon._checks import positive_int
from healthmon.numerics.eigensolvers import MatVec, operator_facts


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson's estimate of ``tr(H)`` with its standard error (``nan`` for one sample)."""

    trace: float
    stderr: float
    num_products: int


def hutchinson_trace(
    matvec: MatVec | Tensor,
    *,
    num_samples: int = 10,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    """Hutchinson's unbiased estimate ``mean_i z_i^T H z_i`` of ``tr(H)``, Rademacher ``z_i``.

    Its variance is ``2 * (||H||_F^2 - sum_i H_ii^2)`` per sample: a coarse number (the mean
    curvature over all directions), logged beside ``lambda_max`` to see how dominant the top is.
    """
    positive_int(num_samples, "num_samples")
    matvec, n, dtype, device, _ = operator_facts(matvec, n)
    samples = []
    for _ in range(num_samples):
        z = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(dtype=dtype, device=device)
        samples.append(torch.dot(z, matvec(z)).double())
    values = torch.stack(samples).cpu()
    stderr = float(values.std() / math.sqrt(num_samples)) if num_samples > 1 else math.nan
    return TraceEstimate(float(values.mean()), stderr, num_samples)
