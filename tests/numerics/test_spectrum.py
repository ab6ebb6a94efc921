"""healthmon.numerics.spectrum: one estimate (top-k, lambda_min), warm starts, arguments."""

from __future__ import annotations

import pytest
import torch
from numerics.hessian_cases import Case, double_case, exact_hessian, rel  # noqa: F401

from healthmon.numerics.hessian import (
    HessianOperator,
    estimate_spectrum,
    lanczos,
    power_iteration,
)


@pytest.mark.parametrize("solver", ["lanczos", "power"])
def test_unconverged_estimates_stay_inside_the_spectrum_and_say_so(
    hessian_cases: dict[str, Case], solver: str
) -> None:
    case = hessian_cases["mlp_digits"]
    ev = case.spectrum()
    lo, hi = ev[0].item(), ev[-1].item()
    est = estimate_spectrum(
        case.operator(), k=3, solver=solver, max_products=6, generator=torch.Generator().manual_seed(3)
    )
    values = [*est.top.eigenvalues, est.lambda_min]
    assert all(lo - 1e-5 <= v <= hi + 1e-5 for v in values)
    assert not est.top.all_converged


def test_warm_start_needs_fewer_products() -> None:
    case = Case("mlp_digits")
    opt = torch.optim.SGD(case.model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)

    def train(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            case.closure().backward()
            opt.step()

    train(50)
    first = estimate_spectrum(case.operator(), k=1, generator=g, negative=False)
    train(10)
    op = case.operator()
    colds = [estimate_spectrum(op, k=1, generator=g, negative=False) for _ in range(5)]
    warms = [
        estimate_spectrum(op, k=1, generator=g, negative=False, warm_top=first.top.eigenvectors)
        for _ in range(5)
    ]
    assert all(e.top.all_converged for e in colds + warms)
    # the warm start carries a random component (eigenvalue crossings), so it saves a little
    assert sum(w.num_products for w in warms) < sum(c.num_products for c in colds)
    assert all(rel(w.lambda_max, c.lambda_max) < 1e-5 for c in colds for w in warms)


def test_bad_arguments_name_the_argument() -> None:
    case = Case("regression")
    op = case.operator()
    with pytest.raises(ValueError, match="`k`"):
        lanczos(op, k=0)
    with pytest.raises(ValueError, match="`tol`"):
        lanczos(op, tol=2.0)
    with pytest.raises(ValueError, match="`max_products`"):
        power_iteration(op, k=3, max_products=2)
    with pytest.raises(ValueError, match="`method`"):
        HessianOperator(case.model, [(case.closure, 1.0)], method="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`params`"):
        HessianOperator(case.model, [(case.closure, 1.0)], params=["nope"])
    with pytest.raises(ValueError, match="`solver`"):
        estimate_spectrum(op, solver="arnoldi")  # type: ignore[arg-type]


def test_warm_started_estimates_follow_a_crossing_during_a_run() -> None:
    """Estimates every few steps, each warm-started: the top direction changes mid-run.

    Two directions trade places (one sharpens 1.5 -> 2.5, the other flattens 2.0 -> 1.0 over 20
    estimates); every estimate reports the current top, also right after the crossing, when the
    warm start is the previous (now second) eigenvector.
    """
    n = 3000
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, 40, generator=g, dtype=torch.float64))
    bulk = torch.linspace(-0.2, 0.8, 38, dtype=torch.float64)
    warm = None
    for step in range(21):
        sharpening, flattening = 1.5 + step / 20, 2.0 - step / 20
        ev = torch.cat([torch.tensor([sharpening, flattening], dtype=torch.float64), bulk])

        def matvec(v: torch.Tensor, ev: torch.Tensor = ev) -> torch.Tensor:
            return q @ (ev * (q.T @ v))

        matvec.n = n  # type: ignore[attr-defined]
        matvec.dtype = torch.float64  # type: ignore[attr-defined]
        est = estimate_spectrum(matvec, k=1, negative=False, warm_top=warm, generator=g)
        top = max(sharpening, flattening)
        assert est.top.all_converged and rel(est.lambda_max, top) <= 1e-4, (step, est.lambda_max, top)
        warm = est.top.eigenvectors
