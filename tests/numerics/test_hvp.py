"""healthmon.numerics.hvp: Hessian-vector products against exact Hessians (torch.func.hessian, float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics.hessian_cases import Case, double_case, exact_hessian, rel  # noqa: F401
from torch import nn
from torch.func import functional_call

from healthmon.numerics.hessian import (
    HessianOperator,
    choose_hvp_method,
    split_batch,
    time_hvp_methods,
)


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
@pytest.mark.parametrize("name", ["mlp_digits", "cnn_digits", "regression"])
def test_hvp_matches_exact_hessian(name: str, method: str) -> None:
    case = double_case(name)
    h = case.exact_hessian()
    op = case.operator(method=method)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(op.n, generator=g, dtype=torch.float64)
        torch.testing.assert_close(op(v), h @ v, rtol=1e-10, atol=1e-12)
    assert op.num_products == 3


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_chunked_products_sum_to_whole_batch(method: str) -> None:
    case = Case("mlp_digits")
    case.model.double()
    x, y = case.x.double(), case.y
    whole = HessianOperator(case.model, [(lambda: F.cross_entropy(case.model(x), y), 1.0)], method=method)
    chunks = split_batch((x, y), 100)
    assert [round(w, 4) for _, w in chunks] == [round(100 / 256, 4), round(100 / 256, 4), round(56 / 256, 4)]

    def closure(b):
        return lambda: F.cross_entropy(case.model(b[0]), b[1])

    for cache in (True, False):
        part = HessianOperator(
            case.model, [(closure(b), w) for b, w in chunks], method=method, cache_graph=cache
        )
        v = torch.randn(whole.n, dtype=torch.float64)
        torch.testing.assert_close(part(v), whole(v), rtol=1e-10, atol=1e-12)


def test_time_hvp_methods_falls_back() -> None:
    case = Case("regression")
    case.loss = F.mse_loss
    timings = time_hvp_methods(lambda m: case.operator(method=m))
    assert timings["forward_over_reverse"] == float("inf")  # torch.func cannot differentiate it twice
    assert 0 < timings["double_backward"] < float("inf")
    case = Case("mlp_digits")
    timings = time_hvp_methods(lambda m: case.operator(method=m))
    assert all(0 < t < float("inf") for t in timings.values())


def test_dropout_masks_fixed_across_products_and_rng_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1)).double()
    x, y = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return ((model(x) - y) ** 2).mean()

    op = HessianOperator(model, [(loss, 1.0)])
    op_fr = HessianOperator(model, [(loss, 1.0)], method="forward_over_reverse")
    before = torch.get_rng_state()
    basis = torch.eye(op.n, dtype=torch.float64)
    h = torch.stack([op(basis[i]) for i in range(op.n)])  # column by column: one fixed function?
    assert torch.equal(torch.get_rng_state(), before)
    torch.testing.assert_close(h, h.T, rtol=1e-10, atol=1e-12)  # symmetric only if masks are equal
    torch.testing.assert_close(op_fr(basis[3]), h[3], rtol=1e-10, atol=1e-12)
    # the same masks as the reference: the exact Hessian of the loss under the captured RNG state
    state = op._rng_cpu
    params = dict(model.named_parameters())

    def f(v: torch.Tensor) -> torch.Tensor:
        torch.set_rng_state(state)
        out, i = {}, 0
        for name, p in params.items():
            out[name] = v[i : i + p.numel()].view(p.shape)
            i += p.numel()
        return ((functional_call(model, out, (x,)) - y) ** 2).mean()

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    ref = torch.autograd.functional.hessian(f, flat)  # no vmap: dropout allowed
    torch.testing.assert_close(h, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp_digits", "regression"])
def test_finite_differences_match_exact_hessian_on_smooth_losses(name: str) -> None:
    """Central differences in float32: ~1e-4 relative on smooth (tanh) models, weights untouched."""
    case = Case(name)
    h = case.exact_hessian()
    before = [p.detach().clone() for p in case.model.parameters()]
    op = case.operator(method="finite_differences")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(op.n, generator=g)
        exact = h @ v.double()
        assert (torch.linalg.vector_norm(op(v).double() - exact) / torch.linalg.vector_norm(exact)) < 1e-3
    assert all(torch.equal(a, p) for a, p in zip(before, case.model.parameters(), strict=True))


def test_auto_keeps_finite_differences_only_where_they_agree() -> None:
    """Smooth tanh MLP: finite differences; max-pooling CNN (kinks): the exact double backward."""
    g = torch.Generator().manual_seed(0)
    smooth = Case("mlp_digits")
    v = torch.randn(smooth.operator().n, generator=g)
    fd = smooth.operator(method="finite_differences")(v)
    exact = smooth.operator()(v)
    assert torch.linalg.vector_norm(fd - exact) / torch.linalg.vector_norm(exact) < 1e-3  # smooth: agree
    kinked = Case("cnn_digits")
    w = torch.randn(kinked.operator().n, generator=g)
    fd, exact = kinked.operator(method="finite_differences")(w), kinked.operator()(w)
    assert torch.linalg.vector_norm(fd - exact) / torch.linalg.vector_norm(exact) > 1e-3  # kinks: they don't
    assert choose_hvp_method(lambda m: kinked.operator(method=m), generator=g) == "double_backward"
    low = Case("regression")
    low.model.to(torch.bfloat16)
    low.x = low.x.bfloat16()
    low.y = low.y.bfloat16()
    assert choose_hvp_method(lambda m: low.operator(method=m), generator=g) == "double_backward"
