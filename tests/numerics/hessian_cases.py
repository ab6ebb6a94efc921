"""Shared cases for the Hessian numerics tests: small models with exact float64 Hessians."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from models import digits
from torch import nn
from torch.func import functional_call, hessian

from healthmon.numerics.hessian import (
    HessianOperator,
)


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
