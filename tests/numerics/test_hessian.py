"""healthmon.numerics.hessian against exact Hessians (torch.func.hessian, float64) of small models."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from healthmon.numerics.hessian import (
    HessianOperator,
    adam_preconditioner,
    estimate_spectrum,
    hutchinson_trace,
    lanczos,
    most_negative_eigenvalue,
    power_iteration,
    preconditioned,
    split_batch,
    stability_limit,
    time_hvp_methods,
)
from tests.models import digits


# ---- cases: (name, model factory, data, loss) --------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x.view(-1, 1, 8, 8)))
        return self.fc(F.max_pool2d(h, 2).flatten(1))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def _regression() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _regression_data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g)
    y = torch.sin(x[:, :1] * 2) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


CASES: dict[
    str, tuple[Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, torch.Tensor]], Callable]
] = {
    "mlp_digits": (_mlp, lambda: (digits()[0][:256], digits()[1][:256]), F.cross_entropy),
    "cnn_digits": (SmallCNN, lambda: (digits()[0][:256], digits()[1][:256]), F.cross_entropy),
    # ((a - b)**2).mean() rather than F.mse_loss: torch.func.jvp over grad of F.mse_loss raises
    # "ZeroTensors are immutable" in torch 2.13 (see test_time_hvp_methods_falls_back).
    "regression": (_regression, _regression_data, lambda a, b: ((a - b) ** 2).mean()),
}


class Case:
    """A float32 model, its loss closure and the exact float64 Hessian spectrum at its weights."""

    def __init__(self, name: str, seed: int = 0) -> None:
        factory, data, loss = CASES[name]
        torch.manual_seed(seed)
        self.model = factory()
        self.x, self.y = data()
        self.loss = loss
        self._hessian: torch.Tensor | None = None

    def closure(self) -> torch.Tensor:
        return self.loss(self.model(self.x), self.y)

    def operator(self, **kwargs) -> HessianOperator:
        return HessianOperator(self.model, [(self.closure, 1.0)], **kwargs)

    def exact_hessian(self) -> torch.Tensor:
        if self._hessian is None:
            self._hessian = exact_hessian(self.model, lambda m: self.loss(m(self.x.double()), self.y_ref()))
        return self._hessian

    def y_ref(self) -> torch.Tensor:
        return self.y.double() if self.y.is_floating_point() else self.y

    def spectrum(self) -> torch.Tensor:
        return torch.linalg.eigvalsh(self.exact_hessian())


def exact_hessian(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
    """The dense float64 Hessian of ``loss(model)`` w.r.t. all parameters (flattened, in order)."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().double() for _, p in model.named_parameters()]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])
    double = _copy_double(model)

    def f(v: torch.Tensor) -> torch.Tensor:
        ps = {n: t.view(s) for n, t, s in zip(names, torch.split(v, sizes), shapes, strict=True)}
        return loss(_Bound(double, ps))

    return hessian(f)(flat)


class _Bound:
    """Calls a module with substituted parameters."""

    def __init__(self, module: nn.Module, params: dict) -> None:
        self.module, self.params = module, params

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.params, (x,))


def _copy_double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    return {name: Case(name) for name in CASES}


# ---- Hessian-vector products -----------------------------------------------------------------------
_DOUBLE: dict[str, Case] = {}


def double_case(name: str) -> Case:
    """A float64 case (shared between tests: its exact Hessian is the expensive part)."""
    if name not in _DOUBLE:
        case = Case(name)
        case.model.double()
        case.x, case.y = case.x.double(), case.y_ref()
        _DOUBLE[name] = case
    return _DOUBLE[name]


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


# ---- eigenvalues against the exact spectrum -----------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp_digits", "cnn_digits", "regression"])
def test_lanczos_top1_top3_and_lambda_min(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
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


@pytest.mark.parametrize("name", ["mlp_digits", "regression"])
def test_power_iteration_top_and_shifted_minimum(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
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


def test_block_power_top3_inside_spectrum(cases: dict[str, Case]) -> None:
    case = cases["regression"]
    ev = case.spectrum()
    est = estimate_spectrum(
        case.operator(), k=3, solver="power", max_products=3000, negative=False,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert est.top.all_converged
    for got, want in zip(est.top.eigenvalues, ev.flip(0)[:3].tolist(), strict=True):
        assert rel(got, want) < 1e-3


@pytest.mark.parametrize("solver", ["lanczos", "power"])
def test_unconverged_estimates_stay_inside_the_spectrum_and_say_so(
    cases: dict[str, Case], solver: str
) -> None:
    case = cases["mlp_digits"]
    ev = case.spectrum()
    lo, hi = ev[0].item(), ev[-1].item()
    est = estimate_spectrum(
        case.operator(), k=3, solver=solver, max_products=6, generator=torch.Generator().manual_seed(3)
    )
    values = [*est.top.eigenvalues, est.lambda_min]
    assert all(lo - 1e-5 <= v <= hi + 1e-5 for v in values)
    assert not est.top.all_converged


def test_converged_flag_never_lies(cases: dict[str, Case]) -> None:
    case = cases["cnn_digits"]
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
    colds = [estimate_spectrum(op, k=1, generator=g, negative=False) for _ in range(3)]
    warm = estimate_spectrum(op, k=1, generator=g, negative=False, warm_top=first.top.eigenvectors)
    assert warm.top.all_converged and all(c.top.all_converged for c in colds)
    assert warm.num_products < min(c.num_products for c in colds)
    assert all(rel(warm.lambda_max, c.lambda_max) < 1e-5 for c in colds)


def test_hutchinson_trace_is_unbiased() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    h = a + a.T
    est = hutchinson_trace(h, num_samples=2000, generator=g)
    assert est.num_products == 2000
    assert abs(est.trace - torch.trace(h).item()) <= 4 * est.stderr


def test_lanczos_on_a_known_matrix_and_exhausted_space() -> None:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    ev = torch.tensor([5.0, 4.7, 4.6, 1, 0.5, 0, 0, -0.1, -0.2, -1, -2, -3.0], dtype=torch.float64)
    h = q @ torch.diag(ev) @ q.T
    res = lanczos(h, k=3, max_products=50, generator=g)
    assert res.all_converged and res.num_products <= 12
    torch.testing.assert_close(torch.tensor(res.eigenvalues, dtype=torch.float64), ev[:3])
    low = lanczos(lambda v: h.float() @ v, k=1, which="smallest", n=12, generator=g)  # plain callable
    assert low.eigenvalues[0] == pytest.approx(-3.0, rel=1e-6)


# ---- stability limits and Adam's preconditioner ---------------------------------------------------------
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
    for _ in range(3):
        opt.zero_grad()
        case.closure().backward()
        opt.step()
    op = case.operator()
    p = adam_preconditioner(opt, op.params)
    assert p is not None and p.shape == (op.n,)
    h = case.exact_hessian()
    dense = torch.linalg.eigvals(torch.diag(1 / p.double()) @ h).real.max().item()
    res = lanczos(preconditioned(op, p), k=1, max_products=200, generator=torch.Generator().manual_seed(0))
    assert res.all_converged and rel(res.eigenvalues[0], dense) < 1e-3


# ---- arguments and purity ---------------------------------------------------------------------------------
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
        HessianOperator(case.model, [(case.closure, 1.0)], method="finite_differences")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`params`"):
        HessianOperator(case.model, [(case.closure, 1.0)], params=["nope"])
    with pytest.raises(ValueError, match="`solver`"):
        estimate_spectrum(op, solver="arnoldi")  # type: ignore[arg-type]


def test_numerics_do_not_import_lightning() -> None:
    code = (
        "import sys, healthmon.numerics.hessian; "
        "heavy = ('pytorch_lightning', 'lightning', 'tensorboard'); "
        "bad = [m for m in sys.modules if m.split('.')[0] in heavy]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
