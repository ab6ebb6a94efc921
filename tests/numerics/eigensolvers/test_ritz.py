"""healthmon.numerics.eigensolvers.ritz: orthonormal bases and honest Ritz values."""

from __future__ import annotations

import pytest
import torch

from healthmon.numerics.eigensolvers.ritz import orthonormalise, rayleigh_ritz, ritz_result


def test_orthonormalise_drops_dependent_and_zero_columns() -> None:
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 0.0]], dtype=torch.float64)
    q = orthonormalise(x, None)
    assert q.shape == (3, 1)
    torch.testing.assert_close(q.T @ q, torch.eye(1, dtype=torch.float64))
    basis = torch.eye(3, 1, dtype=torch.float64)
    rest = orthonormalise(torch.eye(3, dtype=torch.float64), basis)
    assert rest.shape == (3, 2) and float((basis.T @ rest).abs().max()) == 0.0


def test_ritz_values_stay_inside_the_spectrum_before_convergence() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.diag(torch.linspace(-2.0, 5.0, 20, dtype=torch.float64))
    q = orthonormalise(torch.randn(20, 3, generator=g, dtype=torch.float64), None)
    ritz = rayleigh_ritz(q, h @ q, "largest", 0.0, None)
    assert all(-2.0 <= v <= 5.0 for v in ritz.values.tolist())
    assert ritz.values.tolist() == sorted(ritz.values.tolist(), reverse=True)
    result = ritz_result(ritz, 2, 1e-3, products=3, method="power")
    assert len(result.eigenvalues) == 2 and result.num_products == 3 and result.method == "power"
    assert result.converged == tuple(r <= 1e-3 for r in result.residuals)


def test_non_finite_products_are_refused() -> None:
    q = torch.eye(2, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="non-finite Hessian-vector products"):
        rayleigh_ritz(q, torch.full((2, 2), float("nan"), dtype=torch.float64), "largest", 0.0, None)
