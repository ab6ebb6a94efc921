"""Hessian-vector products of a loss, never forming the Hessian (pure torch).

:class:`HessianOperator` is ``v -> H v`` for the Hessian of ``sum_c w_c * loss_c(params)`` (one
closure per chunk of the probe batch), by double backward through a cached gradient graph or by
forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``). Every loss evaluation replays
the same RNG state, so dropout masks are identical across products: it is one fixed function.
An optional ``reduce`` (e.g. :func:`mean_over_ranks`) averages products across DDP ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

HVPMethod = Literal["double_backward", "forward_over_reverse", "finite_differences"]
LossFn = Callable[[], Tensor]

HVP_METHODS: tuple[HVPMethod, ...] = ("double_backward", "forward_over_reverse", "finite_differences")

# Central differences: truncation error ~ h^2, rounding error ~ eps / h; this relative step
# (times the weights' norm) balances them for float32 gradients (eps^(1/3) ~ 5e-3, scaled down
# because the third derivative of a network's loss grows with the weights' scale).
FD_RELATIVE_STEP = 1e-3
# Largest relative difference from the exact product at which "auto" keeps finite differences.
FD_AGREEMENT = 1e-3


def mean_over_ranks(t: Tensor) -> Tensor:
    """Average a tensor over the ranks of the default process group (identity when not distributed).

    Used as ``HessianOperator(reduce=...)``: each rank computes the product on its own shard of
    the probe batch, and the mean over ranks is the product for the global batch (mean-reduced
    losses, equal shards).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


class _Closure(torch.nn.Module):
    """Lets ``torch.func.functional_call`` swap a module's parameters while a closure runs."""

    def __init__(self, module: torch.nn.Module, fn: LossFn) -> None:
        super().__init__()
        self.m = module
        self._fn = fn

    def forward(self) -> Tensor:
        return self._fn()


class HessianOperator:
    """``v -> H v`` for ``H`` the Hessian of ``sum_c w_c * loss_c`` with respect to ``params``.

    Args:
        module: the module whose parameters the losses read.
        chunks: ``(loss_fn, weight)`` pairs; ``loss_fn()`` evaluates one chunk's loss with the
            module's current parameters. For a mean-reduced loss split into chunks, the weight is
            the chunk's share of the batch (the products are then summed over chunks).
        params: names of the parameters to differentiate (default: all with ``requires_grad``).
        method: "double_backward" (grad of ``<grad, v>``), "finite_differences" (central
            differences of two gradients, ``(g(w + h v) - g(w - h v)) / 2h`` with the step ``h``
            :data:`FD_RELATIVE_STEP` times the weights' norm: no second-order graph, two plain
            backward passes per product) or "forward_over_reverse"
            (``torch.func.jvp`` of ``torch.func.grad``).
        reduce: applied to every flat product, e.g. :func:`mean_over_ranks` under DDP.
        cache_graph: double backward only: build each chunk's gradient graph once and reuse it
            (one backward-of-backward per product; memory of one retained graph per chunk).
            When False, each product recomputes the loss (for big probe batches in chunks).

    The RNG state at construction is replayed before every loss evaluation (and the caller's
    RNG state restored after it), so random layers draw the same masks for every product.
    Vectors are flat, in the order of ``params``, with the parameters' dtype and device.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        chunks: Sequence[tuple[LossFn, float]],
        *,
        params: Sequence[str] | None = None,
        method: HVPMethod = "double_backward",
        reduce: Callable[[Tensor], Tensor] | None = None,
        cache_graph: bool = True,
    ) -> None:
        if method not in HVP_METHODS:
            raise ValueError(f"`method`: expected one of {HVP_METHODS}, got {method!r}.")
        if not chunks:
            raise ValueError("`chunks`: expected at least one (loss_fn, weight) pair, got none.")
        named = dict(module.named_parameters())
        if params is None:
            params = [name for name, p in named.items() if p.requires_grad]
        unknown = [name for name in params if name not in named]
        if unknown or not params:
            raise ValueError(f"`params`: expected names of parameters of the module, got {list(params)!r}.")
        self.module = module
        self.names = list(params)
        self.params = [named[name] for name in self.names]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.n = sum(self.sizes)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.chunks = [(fn, float(w)) for fn, w in chunks]
        self.method = method
        self.reduce = reduce
        self.cache_graph = cache_graph
        self.num_products = 0
        self.fd_step = FD_RELATIVE_STEP  # finite differences: step relative to the weights' norm
        self._grads: list[list[Tensor | None]] | None = None
        self._cuda = (
            list(range(torch.cuda.device_count()))
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else []
        )
        self._rng_cpu = torch.get_rng_state()
        self._rng_cuda = torch.cuda.get_rng_state_all() if self._cuda else None

    # -- helpers --
    def _split(self, v: Tensor) -> list[Tensor]:
        return [t.view(s) for t, s in zip(torch.split(v, self.sizes), self.shapes, strict=True)]

    def _flat(self, parts: Sequence[Tensor | None]) -> Tensor:
        return torch.cat(
            [
                torch.zeros(n, dtype=self.dtype, device=self.device)
                if t is None
                else (t.to_dense() if t.is_sparse else t).reshape(-1)
                for t, n in zip(parts, self.sizes, strict=True)
            ]
        )

    def _evaluate(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` from the RNG state captured at construction; restore the caller's RNG.

        Scaled dot-product attention runs its plain (math) kernel here: the fused flash and
        memory-efficient kernels have no second derivative, the math one computes the same
        function with ordinary, twice-differentiable operations.
        """
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with torch.random.fork_rng(devices=self._cuda), sdpa_kernel([SDPBackend.MATH]):
            torch.set_rng_state(self._rng_cpu)
            if self._rng_cuda is not None:
                torch.cuda.set_rng_state_all(self._rng_cuda)
            with torch.enable_grad():
                return fn()

    def _gradient_graph(self, fn: LossFn, weight: float) -> list[Tensor | None]:
        def run() -> list[Tensor | None]:
            loss = fn() * weight
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            return list(grads)

        return self._evaluate(run)

    def _double_backward(
        self, grads: list[Tensor | None], vs: list[Tensor], retain: bool
    ) -> list[Tensor | None]:
        pairs = [
            (g, v, i)
            for i, (g, v) in enumerate(zip(grads, vs, strict=True))
            if g is not None and g.requires_grad
        ]
        out: list[Tensor | None] = [None] * len(self.params)
        if not pairs:
            return out
        hv = torch.autograd.grad(
            [g for g, _, _ in pairs],
            self.params,
            grad_outputs=[v for _, v, _ in pairs],
            retain_graph=retain,
            allow_unused=True,
        )
        return list(hv)

    def _forward_over_reverse(self, fn: LossFn, weight: float, vs: list[Tensor]) -> list[Tensor]:
        from torch.func import functional_call, grad, jvp

        wrapper = _Closure(self.module, fn)
        keys = ["m." + name for name in self.names]

        def loss(*ps: Tensor) -> Tensor:
            return functional_call(wrapper, dict(zip(keys, ps, strict=True)), ()) * weight

        argnums = tuple(range(len(self.params)))
        primals = tuple(p.detach() for p in self.params)
        _, hv = self._evaluate(lambda: jvp(grad(loss, argnums=argnums), primals, tuple(vs)))
        return list(hv)

    def _finite_differences(self, fn: LossFn, weight: float, v: Tensor) -> Tensor:
        """``(g(w + h v) - g(w - h v)) / 2h``: the weights are perturbed in a functional call only."""
        from torch.func import functional_call

        wrapper = _Closure(self.module, fn)
        keys = ["m." + name for name in self.names]
        with torch.no_grad():
            weights = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p) for p in self.params])
            )
            h = self.fd_step * max(float(weights), 1.0) / max(float(torch.linalg.vector_norm(v)), 1e-30)

        def gradient(sign: float) -> Tensor:
            def run() -> Tensor:
                moved = [
                    (p.detach() + (sign * h) * t).requires_grad_(True)
                    for p, t in zip(self.params, self._split(v), strict=True)
                ]
                loss = functional_call(wrapper, dict(zip(keys, moved, strict=True)), ()) * weight
                return self._flat(list(torch.autograd.grad(loss, moved, allow_unused=True)))

            return self._evaluate(run)

        out = gradient(1.0)
        out.sub_(gradient(-1.0))
        return out.div_(2 * h)

    # -- public --
    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` of length :attr:`n` (one Hessian-vector product)."""
        vs = self._split(v.to(dtype=self.dtype, device=self.device))
        total: Tensor | None = None
        if self.method == "double_backward" and self.cache_graph and self._grads is None:
            self._grads = [self._gradient_graph(fn, w) for fn, w in self.chunks]
        for c, (fn, w) in enumerate(self.chunks):
            if self.method == "forward_over_reverse":
                part = self._flat(self._forward_over_reverse(fn, w, vs))
            elif self.method == "finite_differences":
                part = self._finite_differences(fn, w, v.to(dtype=self.dtype, device=self.device))
            elif self._grads is not None:
                part = self._flat(self._double_backward(self._grads[c], vs, retain=True))
            else:
                part = self._flat(self._double_backward(self._gradient_graph(fn, w), vs, retain=False))
            total = part if total is None else total + part
        assert total is not None
        self.num_products += 1
        return total.detach() if self.reduce is None else self.reduce(total.detach())

    __call__ = matvec

    def gradient_norm(self) -> float:
        """The L2 norm of the probe loss's gradient at the current weights (one more gradient).

        With gradient clipping it says how much a step on the probe would be scaled down, which
        the stability test must take into account (:func:`~healthmon.numerics.stability.clip_factor`).
        """

        def run() -> Tensor:
            total: Tensor | None = None
            for fn, w in self.chunks:
                grads = torch.autograd.grad(fn() * w, self.params, allow_unused=True)
                part = self._flat([None if g is None else g.detach() for g in grads])
                total = part if total is None else total + part
            assert total is not None
            return total

        flat = self._evaluate(run)
        flat = flat if self.reduce is None else self.reduce(flat)
        return float(torch.linalg.vector_norm(flat.double()))

    def flatten(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """Concatenate per-parameter tensors (None as zeros) into one flat vector."""
        return self._flat(tensors)

    def release(self) -> None:
        """Drop the cached gradient graph (frees its memory)."""
        self._grads = None


def time_hvp_methods(
    make_operator: Callable[[HVPMethod], HessianOperator], *, repeats: int = 2, seed: int = 0
) -> dict[str, float]:
    """Seconds per product of each HVP method (after one warm-up product); inf where it fails.

    Used to pick the faster method for a model once: the warm-up product also builds the cached
    gradient graph, so the timing is the marginal cost of one more product.
    """
    g = torch.Generator().manual_seed(seed)
    timings: dict[str, float] = {}
    for method in HVP_METHODS:
        try:
            op = make_operator(method)
            v = torch.randn(op.n, generator=g).to(dtype=op.dtype, device=op.device)
            op.matvec(v)
            start = time.perf_counter()
            for _ in range(repeats):
                out = op.matvec(v)
            float(out[0])  # synchronise an asynchronous device
            timings[method] = (time.perf_counter() - start) / repeats
            op.release()
        except (RuntimeError, NotImplementedError, TypeError):
            timings[method] = math.inf
    return timings


def choose_hvp_method(
    make_operator: Callable[[HVPMethod], HessianOperator],
    *,
    rtol: float = FD_AGREEMENT,
    generator: torch.Generator | None = None,
) -> HVPMethod:
    """Pick "finite_differences" if it agrees with the exact product on this model, else "double_backward".

    Central differences cost two plain gradients per product instead of a double backward, and
    are accurate to ~1e-4 on smooth losses; across kinks (ReLU, max-pooling) a perturbation that
    flips a unit makes them wrong. One random product by both methods decides, once per run:
    agreement within ``rtol`` (relative) keeps finite differences. Low-precision parameters
    (bf16, fp16) always get the exact product.
    """
    exact = make_operator("double_backward")
    if exact.dtype not in (torch.float32, torch.float64):
        return "double_backward"
    v = torch.randn(exact.n, generator=generator).to(dtype=exact.dtype, device=exact.device)
    try:
        approx_op = make_operator("finite_differences")
        started = time.perf_counter()
        approx = approx_op.matvec(v)
        float(approx[0])  # synchronise an asynchronous device
        fd_seconds = time.perf_counter() - started
    except (RuntimeError, NotImplementedError, TypeError):
        return "double_backward"
    try:
        reference = exact.matvec(v)  # builds the cached gradient graph
        started = time.perf_counter()
        float(exact.matvec(v)[0])  # the marginal cost of one more product
        exact_seconds = time.perf_counter() - started
        exact.release()
    except (RuntimeError, NotImplementedError):
        return "double_backward"  # estimate() reports why no product is possible
    error = torch.linalg.vector_norm(approx - reference) / torch.linalg.vector_norm(reference).clamp_min(
        1e-30
    )
    accurate = float(error) <= rtol
    return "finite_differences" if accurate and fd_seconds < exact_seconds else "double_backward"
