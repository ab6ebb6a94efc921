"""healthmon.numerics.curvature_findings: the logged numbers and the verdicts of one estimate."""

from __future__ import annotations

import math

import pytest
import torch
from numerics.hessian_cases import exact_hessian

from healthmon.numerics.curvature_findings import (
    SKIPPED,
    judge_curvature,
    judge_negative_curvature,
    judge_sharpness,
    spectrum_values,
)
from healthmon.numerics.eigensolvers import EigenResult
from healthmon.numerics.hvp import HessianOperator
from healthmon.numerics.spectrum import SpectrumEstimate, estimate_spectrum
from healthmon.numerics.stability import StabilityLimit, clip_factor, stability_limit
from healthmon.numerics.trace import TraceEstimate


def _eig(*values: float, converged: bool = True, products: int = 10) -> EigenResult:
    return EigenResult(
        tuple(values),
        torch.zeros(3, len(values)),
        (converged,) * len(values),
        (1e-4,) * len(values),
        products,
        "lanczos",
    )


def _est(
    top: float, low: float | None = None, *, converged: bool = True, trace: float | None = None
) -> SpectrumEstimate:
    return SpectrumEstimate(
        _eig(top, top / 2, converged=converged),
        None if low is None else _eig(low),
        None if trace is None else TraceEstimate(trace, math.nan, 5),
        25,
        0.5,
    )


SGD = StabilityLimit("sgd", 20.0, 0.1, 20.0, "2/lr")
ADAM = StabilityLimit("adam", 38000.0, 1e-3, 2000.0, "(2 + 2*beta1)/((1 - beta1)*lr), beta1=0.9")
UNKNOWN = StabilityLimit("unknown", math.inf, 0.1, 20.0, "unknown optimizer")


def test_sgd_sharpness_above_the_limit_is_a_finding_with_the_learning_rate_that_would_fit() -> None:
    found = judge_sharpness(_est(40.0), SGD, None, preconditioned=True, probe_rows=64)
    assert found is not None and found.code == "hessian.sharpness" and found.value == 40.0
    assert found.message == (
        "The top Hessian eigenvalue lambda_max = 40 is above the stability limit 20 (2/lr, lr=0.1, "
        "2/lr = 20) on a probe of 64 samples: gradient descent oscillates and diverges along its eigenvector."
    )
    assert (
        found.hint == "Lower the learning rate below 0.05 (where the limit meets lambda_max), or add warm-up."
    )
    assert judge_sharpness(_est(20.0), SGD, None, preconditioned=True, probe_rows=64) is None
    # a Ritz value is a lower bound: unconverged estimates still judge
    assert judge_sharpness(_est(40.0, converged=False), SGD, None, preconditioned=True, probe_rows=1)


def test_adam_sharpness_is_judged_on_the_preconditioned_estimate() -> None:
    found = judge_sharpness(_est(1.0), ADAM, _eig(5e4), preconditioned=True, probe_rows=8)
    assert found is not None and found.code == "hessian.sharpness" and found.value == 5e4
    assert found.message.startswith("The preconditioned sharpness lambda_max(P^-1 H) = 5e+04 is above Adam's")
    assert found.hint == "Lower the learning rate, add warm-up, or raise Adam's eps."
    assert judge_sharpness(_est(1e9), ADAM, _eig(3e4), preconditioned=True, probe_rows=8) is None
    assert judge_sharpness(_est(1e9), ADAM, None, preconditioned=True, probe_rows=8) is None  # no moment yet


def test_sharpness_skips_say_why() -> None:
    for limit in (None, UNKNOWN):
        skip = judge_sharpness(_est(1e9), limit, None, preconditioned=True, probe_rows=8)
        assert skip is not None and skip.code == SKIPPED
        assert skip.message == "sharpness: no known stability limit for this optimizer"
    skip = judge_sharpness(_est(1e9), ADAM, None, preconditioned=False, probe_rows=8)
    assert skip is not None and skip.message == "sharpness: Adam-type optimizer and preconditioned=False"


def test_negative_curvature_needs_a_converged_top_and_a_significant_ratio() -> None:
    found = judge_negative_curvature(_est(10.0, -2.0), 0.1)
    assert found is not None and found.code == "hessian.negative_curvature" and found.value == -2.0
    assert found.message == (
        "The Hessian has a negative eigenvalue -2, 0.2 of lambda_max 10: the weights are near a saddle point."
    )
    assert judge_negative_curvature(_est(10.0, -1.0), 0.1) is not None  # at the ratio
    assert judge_negative_curvature(_est(10.0, -0.99), 0.1) is None
    assert judge_negative_curvature(_est(10.0, -2.0, converged=False), 0.1) is None
    assert judge_negative_curvature(_est(-1.0, -2.0), 0.1) is None  # lambda_max not positive
    assert judge_negative_curvature(_est(10.0), 0.1) is None  # not estimated


def test_judge_curvature_orders_sharpness_then_saddle() -> None:
    found = judge_curvature(
        _est(40.0, -10.0), SGD, None, preconditioned=True, negative_ratio=0.1, probe_rows=4
    )
    assert [f.code for f in found] == ["hessian.sharpness", "hessian.negative_curvature"]
    assert judge_curvature(_est(1.0), SGD, None, preconditioned=True, negative_ratio=0.1, probe_rows=4) == []


def test_spectrum_values_names_and_conditions() -> None:
    values = spectrum_values(_est(40.0, -4.0, trace=7.0), SGD, None, 31)
    assert values == {
        "lambda_max": 40.0,
        "products": 31,
        "seconds": 0.5,
        "lambda_1": 40.0,
        "lambda_2": 20.0,
        "residual": 1e-4,
        "converged": 1.0,
        "lambda_min": -4.0,
        "condition": 10.0,
        "trace": 7.0,
        "two_over_lr": 20.0,
        "stability_limit": 20.0,
    }
    adam = spectrum_values(_est(40.0, 0.0), ADAM, _eig(123.0), 31)
    assert "condition" not in adam  # lambda_min = 0: infinite condition is not logged
    assert adam["preconditioned_limit"] == ADAM.limit and adam["preconditioned_sharpness"] == 123.0
    assert "stability_limit" not in adam
    assert "stability_limit" not in spectrum_values(_est(1.0), UNKNOWN, None, 1)  # infinite limit
    assert "two_over_lr" not in spectrum_values(_est(1.0), None, None, 1)


def test_a_real_estimate_is_judged_by_its_exact_curvature() -> None:
    """A least-squares problem whose exact Hessian (torch.func.hessian) has lambda_max above 2/lr."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    x = torch.randn(64, 4, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    y = torch.randn(64, 1, dtype=torch.float64)

    def loss(m):
        return ((m(x) - y) ** 2).mean()

    exact = torch.linalg.eigvalsh(exact_hessian(model, loss))
    op = HessianOperator(model, [(lambda: loss(model), 1.0)], method="double_backward")
    est = estimate_spectrum(op, k=1, tol=1e-8, max_products=50, generator=torch.Generator().manual_seed(0))
    lr = 1.5 / exact[-1].item()  # 2/lr = 1.33 lambda_max: stable
    assert judge_sharpness(est, stability_limit(torch.optim.SGD(model.parameters(), lr=lr)), None,
                           preconditioned=True, probe_rows=64) is None  # fmt: skip
    lr = 2.5 / exact[-1].item()  # 2/lr = 0.8 lambda_max: unstable
    found = judge_sharpness(est, stability_limit(torch.optim.SGD(model.parameters(), lr=lr)), None,
                            preconditioned=True, probe_rows=64)  # fmt: skip
    assert found is not None and found.value == pytest.approx(exact[-1].item(), rel=1e-10)


def test_clipping_scales_the_sharpness_that_counts() -> None:
    """A clipped step moves lr * c * g: lambda_max above 2/lr but below 2/(c lr) is stable."""
    clip = clip_factor(grad_norm=4.0, max_norm=2.0)  # c = 0.5
    assert clip == 0.5
    assert judge_sharpness(_est(30.0), SGD, None, preconditioned=True, probe_rows=8) is not None
    assert judge_sharpness(_est(30.0), SGD, None, preconditioned=True, probe_rows=8, clip=clip) is None
    found = judge_sharpness(_est(30.0), SGD, None, preconditioned=True, probe_rows=8, clip=0.9)
    assert found is not None and "clipping scales a step on the probe by 0.9" in found.message
    assert found.hint is not None and "below 0.0741" in found.hint  # lr * 20 / (0.9 * 30)
    # Adam: v of clipped gradients makes lambda_max(P^-1 H) read 1/c too high
    pre = _eig(50000.0)
    assert judge_sharpness(_est(1.0), ADAM, pre, preconditioned=True, probe_rows=8) is not None
    assert judge_sharpness(_est(1.0), ADAM, pre, preconditioned=True, probe_rows=8, clip=0.5) is None


def test_the_probe_gradient_norm_is_the_norm_of_the_concatenated_gradient() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(6, 3)

    def loss() -> torch.Tensor:
        return model(x).pow(2).mean()

    op = HessianOperator(model, [(loss, 1.0)])
    grads = torch.autograd.grad(loss(), list(model.parameters()))
    exact = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]).double())
    assert op.gradient_norm() == pytest.approx(float(exact), rel=1e-6)
