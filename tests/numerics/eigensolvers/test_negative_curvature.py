"""lambda_min by Lanczos and by shifted power iteration, against ``eigvalsh`` of exact Hessians.

The exact Hessians are ``torch.func.hessian`` of the shared cases (tests/numerics/hessian_cases.py);
the power path on a Hessian operator is also in tests/numerics/eigensolvers/test_power.py.
"""

from __future__ import annotations

import pytest
import torch
from numerics.hessian_cases import Case, rel

from healthmon.numerics.eigensolvers.negative_curvature import most_negative_eigenvalue


def test_lanczos_finds_the_bottom_of_an_exact_hessian(hessian_cases: dict[str, Case]) -> None:
    h = hessian_cases["regression"].exact_hessian()  # the mlp's exact Hessian alone takes ~2 s
    ev = torch.linalg.eigvalsh(h)
    low = most_negative_eigenvalue(
        h,
        lambda_max=ev[-1].item(),
        tol=1e-8,
        max_products=h.shape[0],
        generator=torch.Generator().manual_seed(0),
    )
    assert low.method == "lanczos"
    assert low.all_converged
    assert rel(low.eigenvalues[0], ev[0].item()) < 1e-6


def test_power_on_the_shifted_matrix_finds_a_negative_eigenvalue() -> None:
    h = torch.diag(torch.tensor([3.0, 1.0, 0.5, -1.5], dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    rotated = q @ h @ q.T
    low = most_negative_eigenvalue(
        rotated, lambda_max=3.0, solver="power", tol=1e-10, max_products=5000,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert low.method == "power"
    assert low.eigenvalues[0] == pytest.approx(-1.5, rel=1e-6)


def test_an_unconverged_estimate_is_an_upper_bound(hessian_cases: dict[str, Case]) -> None:
    h = hessian_cases["regression"].exact_hessian()
    ev = torch.linalg.eigvalsh(h)
    for solver in ("lanczos", "power"):
        low = most_negative_eigenvalue(
            h, lambda_max=ev[-1].item(), solver=solver, max_products=4,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        assert not low.all_converged
        assert low.eigenvalues[0] >= ev[0].item() - 1e-9


def test_an_unknown_solver_is_refused() -> None:
    with pytest.raises(ValueError, match="`solver`: expected one of"):
        most_negative_eigenvalue(torch.eye(2, dtype=torch.float64), lambda_max=1.0, solver="qr")  # type: ignore[arg-type]
