"""Bounded memory (measured allocations) and low-precision operators (bf16 against float64 eigh)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import digits
from numerics.hessian_cases import exact_hessian
from numerics.live_bytes import LiveBytes
from torch import nn

from healthmon.numerics.hessian import (
    HessianOperator,
    basis_capacity,
    estimate_spectrum,
    lanczos,
    minimum_memory_factor,
)


def _low_rank_plus_diagonal(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    d = torch.rand(n, generator=g) * 0.5 - 0.1
    u = torch.randn(n, generator=g)
    return d, u / u.norm()


def _top_of_rank_one_update(d: torch.Tensor, u: torch.Tensor, rho: float) -> float:
    """The largest eigenvalue of ``diag(d) + rho u u^T``: the root of ``1 = rho sum u_i^2 / (lam - d_i)``."""
    d64, u2 = d.double(), (u.double() ** 2)
    lo, hi = float(d64.max()), float(d64.max()) + rho
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rho * float((u2 / (mid - d64)).sum()) > 1 else (lo, mid)
    return (lo + hi) / 2


def test_live_bytes_counts_what_is_alive() -> None:
    with LiveBytes() as mem:
        a = torch.zeros(1000)  # 4000 bytes
        b = a[:10]  # a view: no new storage
        c = a + 1  # 4000 more
        del c
        d = torch.ones(250)  # 1000 bytes, after c was freed
        del b, d
    assert mem.peak == 8000 and mem.current == 4000


@pytest.mark.parametrize("factor", [10.0, 8.0, 20.0])
def test_an_estimate_stays_within_its_memory_bound(factor: float) -> None:
    """Top and bottom solves with restarts: peak live memory <= factor x parameter memory."""
    n = 50_000
    d, u = _low_rank_plus_diagonal(n)

    def matvec(v: torch.Tensor) -> torch.Tensor:  # H = diag(d) + 3 u u^T: top ~3, bottom -0.1
        out = d * v  # one vector: the product's result
        return out.add_(u, alpha=3.0 * float(u @ v))

    matvec.n = n  # type: ignore[attr-defined]
    with LiveBytes() as mem:
        est = estimate_spectrum(
            matvec, k=1, tol=1e-4, max_products=80, max_memory_factor=factor,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        result = (est.lambda_max, est.lambda_min)
        del est
    param_bytes = n * 4
    small = 16_384  # the projected matrix and scalars: O(basis^2) numbers, not vectors
    assert mem.peak <= factor * param_bytes + small, mem.peak / param_bytes
    assert result[0] == pytest.approx(_top_of_rank_one_update(d, u, 3.0), rel=1e-6)
    # the bottom of a dense spectrum in a small restarted basis: an upper bound, close to it
    assert float(d.min()) - 1e-6 <= result[1] <= float(d.min()) + 0.01


def test_memory_bound_too_small_names_the_argument() -> None:
    assert basis_capacity(torch.float32, k=1, max_memory_factor=10.0) == 6
    assert basis_capacity(torch.float64, k=3, max_memory_factor=10.0) == 4
    assert minimum_memory_factor(torch.bfloat16, 1) == 12  # its basis is float32
    with pytest.raises(ValueError, match="`max_memory_factor`: expected at least 12"):
        basis_capacity(torch.bfloat16, k=1, max_memory_factor=10.0)


def test_a_bf16_model_gets_ritz_values_inside_the_float64_spectrum() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(torch.bfloat16)
    x, y = digits()[0][:256], digits()[1][:256]
    op = HessianOperator(model, [(lambda: F.cross_entropy(model(x.bfloat16()).float(), y), 1.0)])
    assert op.dtype == torch.bfloat16
    exact = torch.linalg.eigvalsh(exact_hessian(model, lambda m: F.cross_entropy(m(x.double()), y)))
    g = torch.Generator().manual_seed(0)
    top = lanczos(op, k=1, tol=1e-2, max_products=60, max_memory_factor=12, generator=g)
    low = lanczos(op, k=1, which="smallest", max_products=60, max_memory_factor=12, generator=g)
    assert top.eigenvectors.dtype == torch.float32
    lam_max, lam_min = exact[-1].item(), exact[0].item()
    width = lam_max - lam_min
    assert abs(top.eigenvalues[0] - lam_max) <= 0.05 * lam_max  # bf16 products: ~1% noise
    assert lam_min - 0.05 * width <= low.eigenvalues[0] <= lam_max
