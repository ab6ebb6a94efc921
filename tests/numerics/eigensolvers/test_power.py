"""healthmon.numerics.eigensolvers.power: block power iteration against eigh of exact Hessians."""

from __future__ import annotations

import pytest
import torch
from numerics.hessian_cases import Case, double_case, exact_hessian, rel  # noqa: F401

from healthmon.numerics.hessian import estimate_spectrum, most_negative_eigenvalue


@pytest.mark.parametrize("name", ["mlp_digits", "regression"])
def test_power_iteration_top_and_shifted_minimum(hessian_cases: dict[str, Case], name: str) -> None:
    case = hessian_cases[name]
    ev = case.spectrum()
    op = case.operator()
    g = torch.Generator().manual_seed(0)
    est = estimate_spectrum(op, k=1, solver="power", max_products=2000, generator=g, negative=False)
    assert est.top.all_converged
    assert rel(est.lambda_max, ev[-1].item()) < 1e-3
    low = most_negative_eigenvalue(
        op, lambda_max=est.lambda_max, solver="power", max_products=4000, generator=g
    )
    assert low.method == "power"
    assert ev[0].item() - 1e-6 <= low.eigenvalues[0]  # never below the spectrum
    if low.all_converged:
        assert rel(low.eigenvalues[0], ev[0].item()) < 1e-3


def test_block_power_top3_inside_spectrum(hessian_cases: dict[str, Case]) -> None:
    case = hessian_cases["regression"]
    ev = case.spectrum()
    est = estimate_spectrum(
        case.operator(), k=3, solver="power", max_products=3000, negative=False,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert est.top.all_converged
    for got, want in zip(est.top.eigenvalues, ev.flip(0)[:3].tolist(), strict=True):
        assert rel(got, want) < 1e-3
