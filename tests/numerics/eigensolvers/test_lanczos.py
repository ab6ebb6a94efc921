"""healthmon.numerics.eigensolvers.lanczos: thick-restart Lanczos against eigh of exact Hessians."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from numerics.hessian_cases import Case, double_case, exact_hessian, rel  # noqa: F401

from healthmon.numerics.hessian import (
    lanczos,
    most_negative_eigenvalue,
)


@pytest.mark.parametrize("name", ["mlp_digits", "cnn_digits", "regression"])
def test_lanczos_top1_top3_and_lambda_min(hessian_cases: dict[str, Case], name: str) -> None:
    case = hessian_cases[name]
    ev = case.spectrum()
    op = case.operator()
    g = torch.Generator().manual_seed(0)
    top1 = lanczos(op, k=1, generator=g)
    assert top1.all_converged and top1.num_products <= 60
    assert rel(top1.eigenvalues[0], ev[-1].item()) < 1e-3
    top3 = lanczos(op, k=3, generator=g, max_products=150)
    assert top3.all_converged
    for got, want in zip(top3.eigenvalues, ev.flip(0)[:3].tolist(), strict=True):
        assert rel(got, want) < 1e-3
    low = most_negative_eigenvalue(op, lambda_max=top1.eigenvalues[0], generator=g, max_products=200)
    assert low.all_converged
    assert rel(low.eigenvalues[0], ev[0].item()) < 1e-3


def test_converged_flag_never_lies(hessian_cases: dict[str, Case]) -> None:
    case = hessian_cases["cnn_digits"]
    op = case.operator()
    h = case.exact_hessian().float()
    for max_products in (5, 10, 20, 40):
        res = lanczos(op, k=2, max_products=max_products, generator=torch.Generator().manual_seed(0))
        for j, (lam, ok) in enumerate(zip(res.eigenvalues, res.converged, strict=True)):
            v = res.eigenvectors[:, j]
            true = (torch.linalg.vector_norm(h @ v - lam * v) / abs(lam)).item()
            assert true == pytest.approx(res.residuals[j], rel=1e-2, abs=1e-5)
            if ok:
                assert true <= 1e-3 * 1.01


def test_lanczos_on_a_known_matrix_and_exhausted_space() -> None:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    ev = torch.tensor([5.0, 4.7, 4.6, 1, 0.5, 0, 0, -0.1, -0.2, -1, -2, -3.0], dtype=torch.float64)
    h = q @ torch.diag(ev) @ q.T
    res = lanczos(h, k=3, max_products=50, max_memory_factor=40, generator=g)
    assert res.all_converged and res.num_products <= 12 + 3  # the whole space, then k verifications
    tight = lanczos(h, k=3, max_products=50, generator=g)  # default memory: a restarted basis of 5
    assert tight.all_converged
    torch.testing.assert_close(
        torch.tensor(tight.eigenvalues, dtype=torch.float64), ev[:3], rtol=1e-5, atol=0
    )
    torch.testing.assert_close(torch.tensor(res.eigenvalues, dtype=torch.float64), ev[:3])
    low = lanczos(lambda v: h.float() @ v, k=1, which="smallest", n=12, generator=g)  # plain callable
    assert low.eigenvalues[0] == pytest.approx(-3.0, rel=1e-6)


def _crossing(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A Hessian whose new top (2.0) is orthogonal to the previous top eigenvector (now 1.9)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, 60, generator=g, dtype=torch.float64))
    ev = torch.cat(
        [torch.tensor([2.0, 1.9], dtype=torch.float64), torch.linspace(-0.5, 1.0, 58, dtype=torch.float64)]
    )

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return q @ (ev * (q.T @ v))

    matvec.dtype = torch.float64  # type: ignore[attr-defined]
    return q, ev, matvec


@pytest.mark.parametrize("n", [200, 20_000])
def test_warm_start_finds_a_new_top_orthogonal_to_the_old_one(n: int) -> None:
    """The eigenvalue-crossing case: warm-started on the old top (1.9), every seed finds 2.0."""
    for seed in range(20):
        q, ev, matvec = _crossing(n, seed)
        g = torch.Generator().manual_seed(100 + seed)
        res = lanczos(matvec, v0=q[:, 1], n=n, generator=g)
        exact = torch.linalg.eigvalsh(q.T @ torch.stack([matvec(q[:, j]) for j in range(60)], 1)).max()
        assert res.converged[0], seed
        assert abs(res.eigenvalues[0] - exact.item()) <= 1e-3 * exact.item(), (seed, res.eigenvalues)
        true = torch.linalg.vector_norm(
            matvec(res.eigenvectors[:, 0]) - res.eigenvalues[0] * res.eigenvectors[:, 0]
        )
        assert true.item() <= 1e-3 * abs(res.eigenvalues[0])  # the residual it claims is the true one


def test_the_warm_start_vectors_are_read_not_written() -> None:
    """The start vector is combined in place, in buffers of its own.

    The caller's warm vectors (kept by the monitor for the next estimate) come back unchanged,
    one column or several.
    """
    q, _, matvec = _crossing(200, 0)
    for v0 in (q[:, 1].clone(), q[:, :2].clone()):
        kept = v0.clone()
        res = lanczos(matvec, v0=v0, n=200, tol=0.1, verify=False, generator=torch.Generator().manual_seed(0))
        assert res.converged[0]
        assert torch.equal(v0, kept)


@pytest.mark.parametrize("n", [200, 20_000])
def test_a_loose_unverified_early_estimate_is_a_lower_bound_within_its_tolerance(n: int) -> None:
    """The default schedule's early estimates (tol 0.1, the recurrence's residual trusted).

    On the crossing case (tops 2.0 and 1.9 a 5% gap apart, warm-started on the old one) such an
    estimate may stop short of 2.0: never above it (a Ritz value), never more than ~tol below it,
    and its claimed residual is the true one. The tight later estimates find 2.0 (above).
    """
    for seed in range(20):
        q, _, matvec = _crossing(n, seed)
        res = lanczos(
            matvec, v0=q[:, 1], n=n, tol=0.1, verify=False, generator=torch.Generator().manual_seed(seed)
        )
        assert res.converged[0] and res.num_products <= 5
        assert 2.0 * (1 - 0.1) <= res.eigenvalues[0] <= 2.0 + 1e-9, (seed, res.eigenvalues)
        y = res.eigenvectors[:, 0]
        true = torch.linalg.vector_norm(matvec(y) - res.eigenvalues[0] * y) / abs(res.eigenvalues[0])
        assert true.item() <= 0.1 and abs(true.item() - res.residuals[0]) <= 1e-6
