"""Hessian eigenvalue benchmark: healthmon.numerics.hessian against the exact spectrum (and PyHessian).

``python benchmarks/hessian.py --overhead-models`` instead prints, for the two models of
``benchmarks/overhead.py``, the cost of one product in gradients for each method and the
products per estimate of the default schedule.

Prints, per model (float32, CPU, 512 samples): relative error of lambda_max, top-3 and lambda_min
against the exact float64 spectrum, Hessian-vector products used, wall time, one product's time
over one gradient's time for both HVP methods, and products per warm-started estimate during
SGD training. PyHessian (GPL-3.0, optional: ``pip install pyhessian``; none of its code is in
healthmon) gets a column when importable. Not a test: run ``python benchmarks/hessian.py``.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from healthmon.numerics.hessian import (
    HVP_METHODS,
    HessianOperator,
    choose_hvp_method,
    estimate_spectrum,
    lanczos,
    most_negative_eigenvalue,
)

torch.set_num_threads(max(torch.get_num_threads(), 1))


def digits512() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x[:512], torch.tensor(d.target[:512])


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc = nn.Linear(8 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x.view(-1, 1, 8, 8)))
        return self.fc(F.max_pool2d(h, 2).flatten(1))


def cases() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor, Callable]]:
    torch.manual_seed(0)
    x, y = digits512()
    g = torch.Generator().manual_seed(1)
    xr = torch.randn(512, 16, generator=g)
    yr = torch.sin(2 * xr[:, :1]) + 0.1 * torch.randn(512, 1, generator=g)
    mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    return {
        "mlp 64-32-10 tanh": (nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)), x, y, F.cross_entropy),  # noqa: E501
        "cnn conv8-fc10": (SmallCNN(), x, y, F.cross_entropy),
        "mlp 16-64-64-1": (
            nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)),
            xr, yr, mse,
        ),
    }  # fmt: skip


def exact_spectrum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Callable) -> torch.Tensor:
    m = copy.deepcopy(model).double()
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    sizes = [p.numel() for _, p in m.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in m.named_parameters()])
    yd = y.double() if y.is_floating_point() else y

    def f(v: torch.Tensor) -> torch.Tensor:
        ps = {n: t.view(s) for n, t, s in zip(names, torch.split(v, sizes), shapes, strict=True)}
        return loss(functional_call(m, ps, (x.double(),)), yd)

    return torch.linalg.eigvalsh(hessian(f)(flat))


def per_product_ratio(model: nn.Module, closure: Callable, method: str, reps: int = 10) -> float:
    op = HessianOperator(model, [(closure, 1.0)], method=method)  # type: ignore[arg-type]
    v = torch.randn(op.n)
    op(v)
    t = time.perf_counter()
    for _ in range(reps):
        op(v)
    hvp = (time.perf_counter() - t) / reps
    params = list(model.parameters())
    t = time.perf_counter()
    for _ in range(reps):
        torch.autograd.grad(closure(), params)
    grad = (time.perf_counter() - t) / reps
    return hvp / grad


def pyhessian_column(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Callable, ev: torch.Tensor
) -> str:
    try:
        import pyhessian  # noqa: F401

        ph = sys.modules["pyhessian.hessian"]
    except ImportError:
        return "PyHessian not importable: column skipped"
    count = {"n": 0}
    original = ph.hessian_vector_product

    def counted(*args, **kwargs):
        count["n"] += 1
        return original(*args, **kwargs)

    ph.hessian_vector_product = counted
    out = []
    try:
        for top_n in (1, 3):
            count["n"] = 0
            torch.manual_seed(0)
            t = time.perf_counter()
            h = ph.hessian(model, loss, data=(x, y), cuda=False)
            vals, _ = h.eigenvalues(top_n=top_n)
            secs = time.perf_counter() - t
            errs = [abs(v - w) / abs(w) for v, w in zip(vals, ev.flip(0)[:top_n].tolist(), strict=True)]
            out.append(f"top{top_n}: max rel err {max(errs):.1e}, {count['n']} products, {secs:.3f}s")
    finally:
        ph.hessian_vector_product = original
    return "PyHessian " + "; ".join(out)


def warm_products(
    model: nn.Module, closure: Callable, steps: int = 200, every: int = 20
) -> tuple[list[int], list[int]]:
    model = copy.deepcopy(model)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    g = torch.Generator().manual_seed(0)
    warm = None
    top, bottom = [], []

    def loss() -> torch.Tensor:
        return closure_on(model)

    closure_on = closure
    for step in range(steps + 1):
        if step % every == 0:
            op = HessianOperator(model, [(loss, 1.0)])
            est = estimate_spectrum(
                op,
                k=1,
                generator=g,
                warm_top=warm and warm[0],
                warm_bottom=warm and warm[1],
                negative_scale=0.1,
            )
            warm = (est.top.eigenvectors, est.bottom.eigenvectors)  # type: ignore[union-attr]
            if step:
                top.append(est.top.num_products)
                bottom.append(est.bottom.num_products)  # type: ignore[union-attr]
        opt.zero_grad()
        loss().backward()
        opt.step()
    return top, bottom


def main() -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 CPU, 512 samples, tol 1e-3\n"
    )
    for name, (model, x, y, lossf) in cases().items():
        n = sum(p.numel() for p in model.parameters())
        t = time.perf_counter()
        ev = exact_spectrum(model, x, y, lossf)
        print(
            f"== {name}: {n} parameters; exact spectrum [{ev[0]:.4g}, {ev[-1]:.4g}] ({time.perf_counter() - t:.1f}s)"  # noqa: E501
        )

        def closure(m: nn.Module = model) -> torch.Tensor:
            return lossf(m(x), y)  # noqa: B023

        auto = choose_hvp_method(
            lambda m: HessianOperator(model, [(closure, 1.0)], method=m),  # noqa: B023
            generator=torch.Generator().manual_seed(0),
        )
        print(f"  hvp='auto' picks {auto}")
        for method in ("finite_differences", "double_backward"):
            fd = HessianOperator(model, [(closure, 1.0)], method=method)  # type: ignore[arg-type]
            res = lanczos(fd, k=1, generator=torch.Generator().manual_seed(0))
            err = abs(res.eigenvalues[0] - ev[-1].item()) / abs(ev[-1].item())
            print(
                f"  {method}: lambda_max rel err {err:.1e}, {res.num_products} products, "
                f"converged {res.all_converged}"
            )
        op = HessianOperator(model, [(closure, 1.0)], method=auto)
        for k in (1, 3):
            g = torch.Generator().manual_seed(0)
            t = time.perf_counter()
            res = lanczos(op, k=k, max_memory_factor=2 * k + 8, generator=g)
            secs = time.perf_counter() - t
            errs = [
                abs(v - w) / abs(w) for v, w in zip(res.eigenvalues, ev.flip(0)[:k].tolist(), strict=True)
            ]
            inside = all(ev[0] - 1e-5 <= v <= ev[-1] + 1e-5 for v in res.eigenvalues)
            print(
                f"  healthmon top{k}: max rel err {max(errs):.1e}, {res.num_products} products, {secs:.3f}s, "
                f"converged {res.all_converged}, inside spectrum {inside}"
            )
        g = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        low = most_negative_eigenvalue(op, lambda_max=float(ev[-1]), generator=g, max_products=200)
        print(
            f"  healthmon lambda_min: rel err {abs(low.eigenvalues[0] - ev[0].item()) / abs(ev[0].item()):.1e}, "  # noqa: E501
            f"{low.num_products} products, {time.perf_counter() - t:.3f}s, converged {low.all_converged}"
        )
        for method in HVP_METHODS:
            try:
                print(
                    f"  one {method} product / one gradient: {per_product_ratio(model, closure, method):.2f}"
                )
            except RuntimeError as err:
                print(f"  {method}: fails in this torch ({str(err)[:60]}...)")
        top, bottom = warm_products(model, lambda m: lossf(m(x), y))  # noqa: B023
        print(
            f"  warm-started every 20 SGD steps (lr 0.1): top products mean {sum(top) / len(top):.1f} max {max(top)}; "  # noqa: E501
            f"lambda_min products mean {sum(bottom) / len(bottom):.1f} max {max(bottom)}"
        )
        print("  " + pyhessian_column(copy.deepcopy(model), x, y, lossf, ev))
        if not math.isfinite(float(ev[-1])):
            print("  (non-finite spectrum)")
        print()


def overhead_models() -> None:
    """Products per estimate and the cost of a product, on the two models of benchmarks/overhead.py."""
    import overhead

    from healthmon.numerics.hessian import estimate_spectrum as estimate

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the batches (shuffled loaders) and the models' init: one run is the next
    mlp_data = next(iter(overhead.digits_loader()))
    lm_data = next(iter(overhead.token_loader()))
    for name, make, batch in (
        ("MLP 64-512-512-10, batch 64", overhead.MLP, mlp_data),
        ("transformer LM 4x256, seq 128, batch 16", overhead.TinyLM, lm_data),
    ):
        torch.manual_seed(0)
        model = make(False)
        model.log = lambda *a, **k: None  # type: ignore[method-assign]
        n = sum(p.numel() for p in model.parameters())

        def closure(m: nn.Module = model, b: object = batch) -> torch.Tensor:
            return m.training_step(b, 0)

        print(f"== {name}: {n} parameters (1 thread)")
        for method in HVP_METHODS:
            try:
                ratio = per_product_ratio(model, closure, method, reps=5)
                print(f"  one {method} product / one gradient: {ratio:.2f}")
            except RuntimeError as err:
                print(f"  {method}: fails ({str(err)[:60]}...)")
        auto = choose_hvp_method(
            lambda m: HessianOperator(model, [(closure, 1.0)], method=m),  # noqa: B023
            generator=torch.Generator().manual_seed(0),
        )
        op = HessianOperator(model, [(closure, 1.0)], method=auto)
        g = torch.Generator().manual_seed(0)
        early = {"tol": 0.1, "verify": False, "negative": False}  # the default schedule's early ones
        t = time.perf_counter()
        cold = estimate(op, k=1, generator=g, **early)  # type: ignore[arg-type]
        secs = time.perf_counter() - t
        warm = estimate(op, k=1, warm_top=cold.top.eigenvectors, generator=g, **early)  # type: ignore[arg-type]
        late = estimate(op, k=1, tol=1e-3, negative=False, warm_top=cold.top.eigenvectors, generator=g)
        low = estimate(op, k=1, tol=1e-3, negative=True, warm_top=cold.top.eigenvectors, generator=g)
        print(
            f"  auto picks {auto}; early estimates (tol 0.1, unverified): step 0 {cold.num_products} "
            f"products ({secs:.2f}s, lambda_max {cold.lambda_max:.4g}), warm {warm.num_products}; "
            f"later (tol 1e-3, verified): warm {late.num_products}, with lambda_min {low.num_products}"
        )


if __name__ == "__main__":
    if "--overhead-models" in sys.argv:
        overhead_models()
    else:
        main()
