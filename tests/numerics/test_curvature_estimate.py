"""healthmon.numerics.curvature_estimate: one estimate against exact (torch.func.hessian) spectra."""

from __future__ import annotations

import pytest
import torch
from numerics.hessian_cases import exact_hessian
from torch import nn

from healthmon.numerics.curvature_estimate import (
    ESTIMATE_ERRORS,
    WarmStart,
    estimate_curvature,
    failure_reason,
)
from healthmon.numerics.estimate_plan import EstimatePlan
from healthmon.numerics.hvp import HessianOperator
from healthmon.numerics.stability import ADAM_MIN_STEPS, stability_limit

SETTINGS = {
    "top_k": 2,
    "solver": "lanczos",
    "max_products": 200,
    "negative_ratio": 0.1,
    "trace_samples": 0,
    "max_memory_factor": 200.0,
    "preconditioned_sharpness": True,
}


def _case() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    return model, x, torch.sin(2 * x[:, :1])


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def _operator(model, x, y) -> HessianOperator:
    return HessianOperator(model, [(lambda: _loss(model, x, y), 1.0)], method="double_backward")


def test_sgd_estimate_matches_the_exact_spectrum_and_reads_the_limit() -> None:
    model, x, y = _case()
    exact = torch.linalg.eigvalsh(exact_hessian(model, lambda m: _loss(m, x, y)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    op = _operator(model, x, y)
    result = estimate_curvature(
        op, opt, EstimatePlan(1e-6, True), warm=None, generator=torch.Generator().manual_seed(0), **SETTINGS
    )
    top = result.spectrum.top.eigenvalues
    assert top[0] == pytest.approx(exact[-1].item(), rel=1e-8)
    assert top[1] == pytest.approx(exact[-2].item(), rel=1e-8)
    assert result.spectrum.lambda_min == pytest.approx(exact[0].item(), rel=1e-6, abs=1e-8)
    assert result.limit == stability_limit(opt) and result.pre is None
    assert result.products == result.spectrum.num_products
    no_optimizer = estimate_curvature(
        op, None, EstimatePlan(1e-6, False), warm=None, generator=torch.Generator().manual_seed(0), **SETTINGS
    )
    assert no_optimizer.limit is None and no_optimizer.spectrum.bottom is None


def test_adam_estimate_adds_the_preconditioned_sharpness() -> None:
    model, x, y = _case()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(ADAM_MIN_STEPS):  # a second moment of fewer gradients is not a preconditioner
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    h = exact_hessian(model, lambda m: _loss(m, x, y))
    op = _operator(model, x, y)
    state = [opt.state[p] for p in model.parameters()]
    v_hat = torch.cat([s["exp_avg_sq"].reshape(-1) / (1 - 0.999 ** float(s["step"])) for s in state])
    p = v_hat.sqrt() + 1e-8
    dense = torch.linalg.eigvals(torch.diag(1 / p) @ h).real.max().item()
    result = estimate_curvature(
        op, opt, EstimatePlan(1e-8, False), warm=None, generator=torch.Generator().manual_seed(0), **SETTINGS
    )
    assert result.limit is not None and result.limit.kind == "adam"
    assert result.pre is not None and result.pre.eigenvalues[0] == pytest.approx(dense, rel=1e-6)
    assert result.products == result.spectrum.num_products + result.pre.num_products
    off = estimate_curvature(
        op,
        opt,
        EstimatePlan(1e-8, False),
        warm=None,
        generator=torch.Generator().manual_seed(0),
        **{**SETTINGS, "preconditioned_sharpness": False},
    )
    assert off.pre is None


def test_warm_start_keeps_the_vectors_and_round_trips_through_a_checkpoint() -> None:
    model, x, y = _case()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    op = _operator(model, x, y)
    gen = torch.Generator().manual_seed(0)
    warm = WarmStart()
    cold = estimate_curvature(op, opt, EstimatePlan(1e-6, True), warm=warm, generator=gen, **SETTINGS)
    warm.keep(cold.spectrum, cold.pre)
    assert warm.top is not None and warm.top.shape == (op.n, 2) and warm.bottom is not None
    assert warm.precond is None
    again = estimate_curvature(op, opt, EstimatePlan(1e-6, True), warm=warm, generator=gen, **SETTINGS)
    assert again.spectrum.lambda_max == pytest.approx(cold.spectrum.lambda_max, rel=1e-8)
    assert again.spectrum.top.num_products <= cold.spectrum.top.num_products
    other = WarmStart()
    other.load(warm.state())
    assert torch.equal(other.top, warm.top) and torch.equal(other.bottom, warm.bottom)
    assert other.precond is None and list(warm.state()) == ["warm_top", "warm_bottom", "warm_precond"]
    other.load({})
    assert other.top is None and other.bottom is None


def test_failure_reasons_by_error() -> None:
    assert failure_reason(TypeError("no loss")) == "no loss"
    assert failure_reason(FloatingPointError("nan")) == "no estimate: nan"
    assert failure_reason(torch.linalg.LinAlgError("singular")) == "no estimate: singular"
    assert failure_reason(RuntimeError("kernel")) == (
        "no estimate, the loss cannot be differentiated twice (kernel)"
    )
    assert all(isinstance(e, ESTIMATE_ERRORS) for e in (torch.linalg.LinAlgError("x"), FloatingPointError()))
