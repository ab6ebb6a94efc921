"""healthmon.numerics.trace: Hutchinson's estimate against the exact trace."""

from __future__ import annotations

import torch
from numerics.hessian_cases import Case, double_case, exact_hessian, rel  # noqa: F401

from healthmon.numerics.hessian import (
    hutchinson_trace,
)


def test_hutchinson_trace_is_unbiased() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    h = a + a.T
    est = hutchinson_trace(h, num_samples=2000, generator=g)
    assert est.num_products == 2000
    assert abs(est.trace - torch.trace(h).item()) <= 4 * est.stderr
