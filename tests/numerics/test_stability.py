"""healthmon.numerics.stability: the optimizer's stability limit and Adam's preconditioned sharpness."""

from __future__ import annotations

import pytest
import torch
from numerics.hessian_cases import Case, double_case, exact_hessian, rel  # noqa: F401
from torch import nn

from healthmon.numerics.hessian import (
    adam_preconditioner,
    lanczos,
    preconditioned,
    stability_limit,
)
from healthmon.numerics.stability import ADAM_MIN_STEPS


def test_stability_limits_read_from_the_optimizer() -> None:
    p = [nn.Parameter(torch.zeros(3))]
    assert stability_limit(torch.optim.SGD(p, lr=0.1)).limit == pytest.approx(20.0)
    heavy = stability_limit(torch.optim.SGD(p, lr=0.1, momentum=0.9))
    assert heavy.limit == pytest.approx(38.0) and heavy.two_over_lr == pytest.approx(20.0)
    nesterov = stability_limit(torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True))
    assert nesterov.limit == pytest.approx(3.8 / (2.8 * 0.1))
    adam = stability_limit(torch.optim.Adam(p, lr=1e-3))
    assert adam.kind == "adam"
    assert adam.limit == pytest.approx((2 + 1.8) / (0.1 * 1e-3))
    assert stability_limit(torch.optim.Adagrad(p, lr=0.1)).kind == "unknown"
    opt = torch.optim.SGD(p, lr=0.1)
    opt.param_groups[0]["lr"] = 0.5  # a scheduler changed it: read it again
    assert stability_limit(opt).limit == pytest.approx(4.0)


def test_preconditioned_sharpness_matches_dense() -> None:
    case = Case("regression")
    opt = torch.optim.Adam(case.model.parameters(), lr=1e-2)
    assert adam_preconditioner(opt, list(case.model.parameters())) is None  # no second moment yet
    for step in range(ADAM_MIN_STEPS):
        opt.zero_grad()
        case.closure().backward()
        opt.step()
        if step + 1 < ADAM_MIN_STEPS:  # a second moment of so few gradients is noise, not a scale
            assert adam_preconditioner(opt, list(case.model.parameters())) is None
    op = case.operator()
    p = adam_preconditioner(opt, op.params)
    assert p is not None and p.shape == (op.n,)
    h = case.exact_hessian()
    dense = torch.linalg.eigvals(torch.diag(1 / p.double()) @ h).real.max().item()
    res = lanczos(preconditioned(op, p), k=1, max_products=200, generator=torch.Generator().manual_seed(0))
    assert res.all_converged and rel(res.eigenvalues[0], dense) < 1e-3


def test_entries_without_any_gradient_yet_do_not_count_in_the_preconditioned_sharpness() -> None:
    """A LoRA ``A`` while ``B = 0``: Adam's second moment is exactly 0, ``eps`` is no scale for it."""
    base = nn.Linear(4, 4)
    a = nn.Parameter(torch.randn(2, 4))
    b = torch.zeros(4, 2)  # B held at zero: A never gets a gradient
    opt = torch.optim.Adam([*base.parameters(), a], lr=1e-3)
    x = torch.randn(8, 4)
    for _ in range(ADAM_MIN_STEPS):
        opt.zero_grad()
        (base(x) + x @ a.T @ b.T).pow(2).mean().backward()
        opt.step()
    assert a.grad is not None and not a.grad.any()
    p = adam_preconditioner(opt, [base.weight, a])
    assert p is not None
    n_w = base.weight.numel()
    assert torch.isfinite(p[:n_w]).all() and torch.isinf(p[n_w:]).all()
