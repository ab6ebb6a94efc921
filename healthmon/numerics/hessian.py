"""Hessian-vector products and the extremes of the loss Hessian's spectrum (pure torch).

Why: gradient descent with learning rate ``lr`` diverges along an eigenvector whose eigenvalue is
above ``2/lr`` (``(2 + 2*beta)/lr`` with heavy-ball momentum), and a clearly negative eigenvalue
means a saddle region (Goodfellow et al., *Deep Learning*, ch. 4.3). Both need only the extremes
of the spectrum, which Krylov methods find from a few Hessian-vector products (HVPs), never
forming the Hessian.

Pieces, each usable alone:

* :class:`HessianOperator` - ``v -> H v`` for the Hessian of ``sum_c w_c * loss_c(params)`` (one
  closure per chunk of the probe batch), by double backward through a cached gradient graph or by
  forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``). Every loss evaluation replays
  the same RNG state, so dropout masks are identical across products: it is one fixed function.
  An optional ``reduce`` (e.g. :func:`mean_over_ranks`) averages products across DDP ranks.
* :func:`lanczos` - Krylov subspace (Lanczos with full reorthogonalisation) with Rayleigh-Ritz.
* :func:`power_iteration` - block power (subspace) iteration with Rayleigh-Ritz: top-k by
  deflation inside the block, and the most negative eigenvalue on the shifted operator
  ``H - sigma I``.
* :func:`hutchinson_trace` - ``tr(H)`` from Rademacher probes.
* :func:`estimate_spectrum` - top-k, ``lambda_min`` and the trace in one call, warm-started from a
  previous estimate.
* :func:`stability_limit` / :func:`adam_preconditioner` - the optimizer's sharpness threshold.

Every eigenvalue reported is a Rayleigh-Ritz value of an orthonormal basis, so it lies inside
``[lambda_min, lambda_max]`` whether or not it converged: an unconverged top value is a lower
bound on ``lambda_max`` and an unconverged bottom value an upper bound on ``lambda_min``. The
``converged`` flag is computed from the true residual ``||H y - theta y|| / |theta|`` of the
returned pair (products are stored, so no extra product is spent on it): it never claims more
than was measured.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

HVPMethod = Literal["double_backward", "forward_over_reverse"]
Which = Literal["largest", "smallest", "magnitude"]
Solver = Literal["lanczos", "power"]
LossFn = Callable[[], Tensor]
MatVec = Callable[[Tensor], Tensor]

HVP_METHODS: tuple[str, ...] = ("double_backward", "forward_over_reverse")
SOLVERS: tuple[str, ...] = ("lanczos", "power")


# ---- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EigenResult:
    """Ritz pairs from an iterative eigensolver.

    Attributes:
        eigenvalues: Ritz values, in the order asked for (``largest``: descending).
        eigenvectors: ``(n, k)`` orthonormal Ritz vectors, on the operator's device.
        converged: per value, whether its relative residual is at or below ``tol``.
        residuals: per value, ``||H y - theta y|| / max(|theta|, scale)``.
        num_products: Hessian-vector products spent.
        method: "lanczos" or "power".
    """

    eigenvalues: tuple[float, ...]
    eigenvectors: Tensor
    converged: tuple[bool, ...]
    residuals: tuple[float, ...]
    num_products: int
    method: str

    @property
    def all_converged(self) -> bool:
        return all(self.converged)


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson's estimate of ``tr(H)`` with its standard error (``nan`` for one sample)."""

    trace: float
    stderr: float
    num_products: int


@dataclass(frozen=True)
class SpectrumEstimate:
    """One estimate of the spectrum's extremes, as the monitor logs it.

    Attributes:
        top: the ``k`` largest eigenvalues (descending).
        bottom: the most negative eigenvalue (``k = 1``), or None when not asked for.
        trace: Hutchinson trace, or None.
        num_products: all Hessian-vector products of this estimate.
        seconds: wall time of this estimate.
    """

    top: EigenResult
    bottom: EigenResult | None
    trace: TraceEstimate | None
    num_products: int
    seconds: float

    @property
    def lambda_max(self) -> float:
        return self.top.eigenvalues[0]

    @property
    def lambda_min(self) -> float | None:
        return None if self.bottom is None else self.bottom.eigenvalues[0]

    @property
    def condition(self) -> float | None:
        """The condition proxy ``lambda_max / |lambda_min|`` (inf when ``lambda_min`` is 0)."""
        low = self.lambda_min
        if low is None:
            return None
        return math.inf if low == 0 else abs(self.lambda_max) / abs(low)


# ---- Hessian-vector products ----------------------------------------------------------------------
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
        method: "double_backward" (grad of ``<grad, v>``) or "forward_over_reverse"
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
        """Run ``fn`` from the RNG state captured at construction; restore the caller's RNG."""
        with torch.random.fork_rng(devices=self._cuda):
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
            elif self._grads is not None:
                part = self._flat(self._double_backward(self._grads[c], vs, retain=True))
            else:
                part = self._flat(self._double_backward(self._gradient_graph(fn, w), vs, retain=False))
            total = part if total is None else total + part
        assert total is not None
        self.num_products += 1
        return total.detach() if self.reduce is None else self.reduce(total.detach())

    __call__ = matvec

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
            op = make_operator(method)  # type: ignore[arg-type]
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


# ---- Rayleigh-Ritz machinery ----------------------------------------------------------------------
def _orthonormalise(x: Tensor, basis: Tensor | None, *, drop: float = 1e-6) -> Tensor:
    """Columns of ``x`` orthonormalised against ``basis`` and each other.

    Classical Gram-Schmidt with a second pass only where the first one cancelled most of the
    vector (Daniel-Gragg-Kaufman-Stewart: "twice is enough"). Columns that lose more than
    ``1 - drop`` of their norm are dropped.
    """
    cols: list[Tensor] = []
    for j in range(x.shape[1]):
        z = x[:, j].clone()
        norm0 = float(torch.linalg.vector_norm(z))
        if norm0 == 0 or not math.isfinite(norm0):
            continue
        before = norm0
        for _ in range(2):
            for b in (basis, torch.stack(cols, 1) if cols else None):
                if b is not None and b.shape[1]:
                    z -= b @ (b.T @ z)
            norm = float(torch.linalg.vector_norm(z))
            if norm > 0.7 * before:
                break
            before = norm
        if norm > drop * norm0:
            cols.append(z / norm)
    if not cols:
        return x.new_zeros(x.shape[0], 0)
    return torch.stack(cols, 1)


@dataclass(frozen=True)
class _Ritz:
    values: Tensor  # float64, cpu, chosen order
    vectors: Tensor  # (n, k)
    products: Tensor  # (n, k) = H @ vectors
    residuals: list[float]


def _rayleigh_ritz(
    q: Tensor,
    w: Tensor,
    which: Which,
    shift: float,
    scale: float | None,
    *,
    t: Tensor | None = None,
    cols: int | None = None,
) -> _Ritz:
    """Ritz pairs of the symmetric ``H`` on ``span(q)`` given ``w = H q``, ordered.

    ``t`` is the projected matrix ``q^T H q`` when the caller maintains it (Lanczos grows it one
    row at a time: O(n m) per product instead of O(n m^2)); ``cols`` limits the Ritz vectors built
    (and their residuals) to the first ``cols`` in order. ``values`` always holds all of them.
    """
    if t is None:
        t = (q.T @ w).double().cpu()
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(
            "non-finite Hessian-vector products: the loss or its curvature is NaN/Inf here"
        )
    t = (t + t.T) / 2
    theta, s = torch.linalg.eigh(t)
    if which == "largest":
        order = torch.argsort(theta, descending=True)
    elif which == "smallest":
        order = torch.argsort(theta)
    else:
        order = torch.argsort((theta - shift).abs(), descending=True)
    theta, s = theta[order], s[:, order]
    if cols is not None:
        s = s[:, :cols]
    s = s.to(dtype=q.dtype, device=q.device)
    built = theta[: s.shape[1]]
    y, hy = q @ s, w @ s
    r = torch.linalg.vector_norm(hy - y * built.to(dtype=q.dtype, device=q.device), dim=0)
    r = r.double().cpu() / torch.linalg.vector_norm(y, dim=0).double().cpu()
    denom = built.abs()
    if scale is not None:
        denom = denom.clamp_min(abs(scale))
    res = (r / denom).tolist()
    res = [x if math.isfinite(x) else math.inf for x in res]
    return _Ritz(theta, y, hy, res)


def _result(ritz: _Ritz, k: int, tol: float, products: int, method: str) -> EigenResult:
    k = min(k, ritz.values.numel())
    res = tuple(ritz.residuals[:k])
    return EigenResult(
        eigenvalues=tuple(ritz.values[:k].tolist()),
        eigenvectors=ritz.vectors[:, :k],
        converged=tuple(r <= tol for r in res),
        residuals=res,
        num_products=products,
        method=method,
    )


def _start_block(
    v0: Tensor | None,
    n: int,
    cols: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    """The start vectors: ``v0`` (``(n,)`` or ``(n, j)``) padded with Gaussian columns to ``cols``."""
    parts = []
    if v0 is not None:
        v0 = v0.reshape(n, -1).to(dtype=dtype, device=device)
        if torch.isfinite(v0).all():
            parts.append(v0)
    have = sum(p.shape[1] for p in parts)
    if have < cols:
        parts.append(torch.randn(n, cols - have, generator=generator, dtype=dtype).to(device))
    return torch.cat(parts, 1)


def _check_solver_args(k: int, tol: float, max_products: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k`: expected an integer >= 1, got {k!r}.")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"`tol`: expected a number in (0, 1), got {tol!r}.")
    if isinstance(max_products, bool) or not isinstance(max_products, int) or max_products < k:
        raise ValueError(f"`max_products`: expected an integer >= k = {k}, got {max_products!r}.")


def _operator_facts(matvec: MatVec | Tensor, n: int | None) -> tuple[MatVec, int, torch.dtype, torch.device]:
    """The product, dimension, dtype and device of an operator (a dense symmetric matrix works too)."""
    if isinstance(matvec, Tensor):
        dense = matvec
        return (lambda v: dense @ v), dense.shape[0], dense.dtype, dense.device
    n = getattr(matvec, "n", n)
    if n is None:
        raise ValueError("`n`: expected the operator's dimension (the operator has no `.n`), got None.")
    return (
        matvec,
        int(n),
        getattr(matvec, "dtype", torch.float32),
        getattr(matvec, "device", torch.device("cpu")),
    )


# ---- solvers -----------------------------------------------------------------------------------------
@dataclass
class KrylovBasis:
    """An orthonormal basis ``q``, its products ``w = H q`` and the projection ``t = q^T H q``.

    What a Lanczos run leaves behind: a second run on the same operator (``lambda_min`` after
    ``lambda_max``) continues from it and pays only for the products it adds.
    """

    q: Tensor
    w: Tensor
    t: Tensor


def lanczos(
    matvec: MatVec | Tensor,
    *,
    k: int = 1,
    which: Literal["largest", "smallest"] = "largest",
    v0: Tensor | None = None,
    tol: float = 1e-3,
    max_products: int = 100,
    max_basis: int = 60,
    scale: float | None = None,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The ``k`` largest (or smallest) eigenpairs by Lanczos with full reorthogonalisation.

    The basis grows one product at a time from ``v0`` (a warm start: the previous estimate's
    eigenvectors, ``(n,)`` or ``(n, j)``; their sum starts a single Krylov sequence) or a random
    vector. Each new direction is the residual of the least-converged wanted Ritz pair,
    orthogonalised twice against the basis: from one start vector this is exactly the Lanczos
    sequence, and it stays right after a restart. When the basis reaches ``max_basis`` vectors it
    is restarted from the wanted Ritz vectors and their stored products (a thick restart: no
    product is recomputed). Stops when every wanted pair has ``residual <= tol`` or after
    ``max_products`` products.

    Args:
        matvec: ``v -> H v`` on flat vectors (a :class:`HessianOperator`, any callable with
            ``n``, or a dense symmetric matrix).
        k: how many eigenvalues.
        which: "largest" (descending) or "smallest" (ascending) algebraic eigenvalues.
        v0: warm start vectors, or None for a random start.
        tol: relative residual ``||H y - theta y|| / max(|theta|, scale)`` to stop at.
        max_products: cap on Hessian-vector products.
        max_basis: largest basis kept in memory (two ``n x max_basis`` blocks: vectors and products).
        scale: floor of the residual's denominator (for eigenvalues near 0, e.g. ``lambda_min``).
        n: dimension, when ``matvec`` has no ``.n``.
        generator: for the random start vector (pass a seeded one for reproducibility; the global
            RNG is not touched).
    """
    result, _ = lanczos_with_basis(
        matvec, k=k, which=which, v0=v0, tol=tol, max_products=max_products, max_basis=max_basis,
        scale=scale, n=n, generator=generator,
    )  # fmt: skip
    return result


def lanczos_with_basis(
    matvec: MatVec | Tensor,
    *,
    k: int = 1,
    which: Literal["largest", "smallest"] = "largest",
    v0: Tensor | None = None,
    basis: KrylovBasis | None = None,
    tol: float = 1e-3,
    max_products: int = 100,
    max_basis: int = 60,
    scale: float | None = None,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[EigenResult, KrylovBasis]:
    """:func:`lanczos`, continuing from ``basis`` (its products are free) and returning the basis.

    ``v0`` is added to ``basis`` as a further start direction. ``num_products`` counts only the
    products this call computed. Buffers are allocated once (``n x max_basis``) and the projected
    matrix grows by one row per product, so a product costs O(n m) on top of ``H v``.
    """
    _check_solver_args(k, tol, max_products)
    if which not in ("largest", "smallest"):
        raise ValueError(f"`which`: expected 'largest' or 'smallest', got {which!r}.")
    matvec, n, dtype, device = _operator_facts(matvec, n)
    cap = max(int(max_basis), k + 2)
    # one basis vector per row (contiguous): q_buf[:m].T is the n x m basis without a copy
    q_buf = torch.empty(cap, n, dtype=dtype, device=device)
    w_buf = torch.empty(cap, n, dtype=dtype, device=device)
    t = torch.zeros(0, 0, dtype=torch.float64)
    m = 0
    products = 0
    if basis is not None and basis.q.shape[1]:
        m = min(basis.q.shape[1], cap - 1)
        q_buf[:m], w_buf[:m], t = basis.q[:, :m].T, basis.w[:, :m].T, basis.t[:m, :m]

    def add(z: Tensor) -> None:
        """Append the unit vector ``z`` (orthogonal to the basis) and its product."""
        nonlocal m, t, products
        wz = matvec(z[:, 0]).reshape(n)
        products += 1
        column = (q_buf[:m] @ wz).double().cpu().reshape(m, 1)
        corner = (z[:, 0] @ wz).double().cpu().reshape(1, 1)
        t = torch.cat([torch.cat([t, column], 1), torch.cat([column.T, corner], 1)], 0)
        q_buf[m], w_buf[m] = z[:, 0], wz
        m += 1

    if v0 is not None or m == 0:
        start = _start_block(v0, n, 1, dtype, device, generator).sum(1, keepdim=True)
        z = _orthonormalise(start, q_buf[:m].T)
        if z.shape[1] == 0:
            z = _orthonormalise(_start_block(None, n, 1, dtype, device, generator), q_buf[:m].T)
        if z.shape[1]:
            add(z)
    while True:
        q, w = q_buf[:m].T, w_buf[:m].T
        ritz = _rayleigh_ritz(q, w, which, 0.0, scale, t=t, cols=k)
        wanted = min(k, ritz.values.numel())
        res = ritz.residuals[:wanted]
        if (wanted == k and max(res) <= tol) or products >= max_products or m >= n:
            return _result(ritz, k, tol, products, "lanczos"), KrylovBasis(q, w, t)
        worst = max(range(wanted), key=lambda i: res[i]) if wanted == k else wanted - 1
        direction = (ritz.products[:, worst] - ritz.vectors[:, worst] * ritz.values[worst].item()).reshape(
            n, 1
        )
        if m >= cap:  # thick restart on the Ritz vectors worth keeping
            keep = min(ritz.values.numel(), max(k + 1, cap // 2))
            kept = _rayleigh_ritz(q, w, which, 0.0, scale, t=t, cols=keep)
            q_buf[:keep], w_buf[:keep] = kept.vectors.T, kept.products.T
            t = torch.diag(kept.values[:keep])  # H is diagonal in its own Ritz basis
            m = keep
        z = _orthonormalise(direction, q_buf[:m].T)
        if z.shape[1] == 0:  # invariant subspace found: continue with a fresh random direction
            z = _orthonormalise(_start_block(None, n, 1, dtype, device, generator), q_buf[:m].T)
            if z.shape[1] == 0:
                return _result(ritz, k, tol, products, "lanczos"), KrylovBasis(q, w, t)
        add(z)


def power_iteration(
    matvec: MatVec | Tensor,
    *,
    k: int = 1,
    v0: Tensor | None = None,
    shift: float = 0.0,
    tol: float = 1e-3,
    max_products: int = 200,
    scale: float | None = None,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The ``k`` eigenpairs of ``H`` farthest from ``shift`` by block power iteration.

    Each iteration multiplies a block of ``k`` orthonormal vectors by ``H - shift * I`` and
    orthonormalises it: vector ``j`` is deflated against vectors ``< j`` inside the block, and a
    Rayleigh-Ritz step on the block returns values inside the spectrum even before convergence
    (plain sequential deflation with unconverged vectors does not). With ``shift = 0`` this finds
    the eigenvalues of largest magnitude; with ``shift >= lambda_max`` every eigenvalue of the
    shifted operator is ``<= 0`` and the one of largest magnitude is ``lambda_min`` (the most
    negative curvature). Convergence is geometric with ratio ``|lambda_{k+1} - s| / |lambda_k - s|``;
    warm starts (``v0`` = previous eigenvectors) make it a few iterations during training.

    Args:
        matvec: ``v -> H v`` on flat vectors.
        k: block size (number of eigenvalues), ordered by distance from ``shift``.
        v0: warm start ``(n,)`` or ``(n, j)``; missing columns are random.
        shift: ``sigma`` of ``H - sigma I``; reported eigenvalues are those of ``H``.
        tol: relative residual to stop at (see :func:`lanczos`).
        max_products: cap on Hessian-vector products (``k`` per iteration).
        scale: floor of the residual's denominator.
        n: dimension, when ``matvec`` has no ``.n``.
        generator: for random start columns.
    """
    _check_solver_args(k, tol, max_products)
    matvec, n, dtype, device = _operator_facts(matvec, n)
    x = _orthonormalise(_start_block(v0, n, k, dtype, device, generator)[:, : max(k, 1)], None)
    while x.shape[1] < k:
        x = torch.cat([x, _orthonormalise(_start_block(None, n, 1, dtype, device, generator), x)], 1)
    products = 0
    while True:
        w = torch.stack([matvec(x[:, j]) for j in range(x.shape[1])], 1)
        products += x.shape[1]
        ritz = _rayleigh_ritz(x, w, "magnitude", shift, scale)
        if max(ritz.residuals[:k]) <= tol or products + k > max_products:
            return _result(ritz, k, tol, products, "power")
        nxt = _orthonormalise(ritz.products - shift * ritz.vectors, None)
        while nxt.shape[1] < k:  # H annihilated a direction: refill at random
            nxt = torch.cat(
                [nxt, _orthonormalise(_start_block(None, n, 1, dtype, device, generator), nxt)], 1
            )
        x = nxt


def most_negative_eigenvalue(
    matvec: MatVec | Tensor,
    *,
    lambda_max: float,
    solver: Solver = "lanczos",
    v0: Tensor | None = None,
    tol: float = 1e-3,
    max_products: int = 100,
    scale: float | None = None,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """``lambda_min`` (negative curvature) from the shifted operator ``H - lambda_max I``.

    All eigenvalues of the shifted operator are ``<= 0`` (``lambda_max`` from a Ritz value may be
    slightly low, which only leaves a tiny positive one), so its dominant eigenvalue is
    ``lambda_min - lambda_max``. "power" iterates on it; "lanczos" builds the same Krylov space
    (shift-invariant) and reads off the smallest Ritz value, far fewer products when the bottom
    of the spectrum is crowded. The result is an upper bound on ``lambda_min`` even unconverged.
    """
    if solver == "power":
        return power_iteration(
            matvec, k=1, v0=v0, shift=float(lambda_max), tol=tol, max_products=max_products,
            scale=scale, n=n, generator=generator,
        )  # fmt: skip
    if solver != "lanczos":
        raise ValueError(f"`solver`: expected one of {SOLVERS}, got {solver!r}.")
    return lanczos(
        matvec, k=1, which="smallest", v0=v0, tol=tol, max_products=max_products, scale=scale, n=n,
        generator=generator,
    )  # fmt: skip


def hutchinson_trace(
    matvec: MatVec, *, num_samples: int = 10, n: int | None = None, generator: torch.Generator | None = None
) -> TraceEstimate:
    """Hutchinson's unbiased estimate ``mean_i z_i^T H z_i`` of ``tr(H)``, Rademacher ``z_i``.

    Its variance is ``2 * (||H||_F^2 - sum_i H_ii^2)`` per sample: a coarse number (the mean
    curvature over all directions), logged beside ``lambda_max`` to see how dominant the top is.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples`: expected an integer >= 1, got {num_samples!r}.")
    matvec, n, dtype, device = _operator_facts(matvec, n)
    samples = []
    for _ in range(num_samples):
        z = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(dtype=dtype, device=device)
        samples.append(torch.dot(z, matvec(z)).double())
    values = torch.stack(samples).cpu()
    stderr = float(values.std() / math.sqrt(num_samples)) if num_samples > 1 else math.nan
    return TraceEstimate(float(values.mean()), stderr, num_samples)


def _jitter(v: Tensor | None, noise: float, generator: torch.Generator | None) -> Tensor | None:
    """``v`` plus Gaussian noise of ``noise`` times each column's norm (None stays None)."""
    if v is None or noise <= 0:
        return v
    r = torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
    r = r * (
        torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=0)
        / torch.linalg.vector_norm(r.reshape(v.shape[0], -1), dim=0)
    ).reshape(v.shape[1:] if v.dim() > 1 else ())
    return v + noise * r


def estimate_spectrum(
    matvec: MatVec | Tensor,
    *,
    k: int = 1,
    solver: Solver = "lanczos",
    tol: float = 1e-3,
    max_products: int = 100,
    negative: bool = True,
    negative_scale: float = 0.0,
    trace_samples: int = 0,
    warm_top: Tensor | None = None,
    warm_bottom: Tensor | None = None,
    warm_noise: float = 0.05,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> SpectrumEstimate:
    """Top-``k`` eigenvalues, ``lambda_min`` and optionally the trace, warm-started.

    Args:
        matvec: ``v -> H v``.
        k: how many of the largest eigenvalues.
        solver: "lanczos" (default; fewest products) or "power" (block power iteration; the
            most negative eigenvalue then comes from the shifted operator).
        tol: relative residual to stop each solve at.
        max_products: cap per solve (top and bottom separately).
        negative: also estimate ``lambda_min``.
        negative_scale: ``lambda_min``'s residual is relative to
            ``max(|lambda_min|, negative_scale * |lambda_max|)``: accuracy relative to the decision
            it feeds (e.g. the negative-curvature ratio) instead of to a value that may be ~0.
        trace_samples: Hutchinson samples (0: no trace).
        warm_top: previous top eigenvectors ``(n, j)`` (warm start), or None.
        warm_bottom: previous ``lambda_min`` eigenvector, or None.
        warm_noise: relative size of a random component added to warm starts, so that the
            Krylov space sees every eigendirection and cannot settle on a nearby eigenvalue that
            is no longer the extreme one (a start vector that is almost an eigenvector of the
            new Hessian can miss the extreme one entirely).
        n: dimension, when ``matvec`` has no ``.n``.
        generator: random start vectors and probes.
    """
    if solver not in SOLVERS:
        raise ValueError(f"`solver`: expected one of {SOLVERS}, got {solver!r}.")
    started = time.perf_counter()
    warm_top = _jitter(warm_top, warm_noise, generator)
    warm_bottom = _jitter(warm_bottom, warm_noise, generator)
    basis = None
    if solver == "lanczos":
        top, basis = lanczos_with_basis(
            matvec, k=k, v0=warm_top, tol=tol, max_products=max_products, n=n, generator=generator
        )
    else:
        top = power_iteration(
            matvec, k=k, v0=warm_top, tol=tol, max_products=max_products, n=n, generator=generator
        )
        low = min(top.eigenvalues)
        if low < 0:  # negative curvature dominated: find the top k of H - low*I (all >~ 0) instead
            spent = top.num_products
            top = power_iteration(
                matvec, k=k, v0=None, shift=low, tol=tol, max_products=max_products, n=n, generator=generator
            )
            top = dataclasses.replace(top, num_products=top.num_products + spent)
    bottom = None
    if negative and basis is not None:  # the same Krylov space holds both ends of the spectrum
        bottom, _ = lanczos_with_basis(
            matvec,
            k=1,
            which="smallest",
            v0=warm_bottom,
            basis=basis,
            tol=tol,
            max_products=max_products,
            scale=abs(negative_scale * top.eigenvalues[0]) or None,
            n=n,
            generator=generator,
        )
    elif negative:
        bottom = most_negative_eigenvalue(
            matvec,
            lambda_max=top.eigenvalues[0],
            solver=solver,
            v0=warm_bottom,
            tol=tol,
            max_products=max_products,
            scale=abs(negative_scale * top.eigenvalues[0]) or None,
            n=n,
            generator=generator,
        )
    trace = (
        hutchinson_trace(matvec, num_samples=trace_samples, n=n, generator=generator)
        if trace_samples
        else None
    )
    products = (
        top.num_products + (bottom.num_products if bottom else 0) + (trace.num_products if trace else 0)
    )
    return SpectrumEstimate(top, bottom, trace, products, time.perf_counter() - started)


# ---- the optimizer's stability limit ---------------------------------------------------------------
@dataclass(frozen=True)
class StabilityLimit:
    """The sharpness above which the optimizer's iteration is unstable on a quadratic.

    Attributes:
        kind: "sgd" (plain or momentum), "adam" (preconditioned sharpness) or "unknown".
        limit: the threshold on ``lambda_max`` (SGD) or on ``lambda_max(P^-1 H)`` (Adam);
            ``inf`` when unknown.
        lr: the largest learning rate over the parameter groups (the most restrictive one).
        two_over_lr: ``2 / lr``.
        formula: the formula used, for messages.
    """

    kind: str
    limit: float
    lr: float
    two_over_lr: float
    formula: str


def stability_limit(optimizer: torch.optim.Optimizer) -> StabilityLimit:
    """Read the learning rate and momentum from the optimizer now and give its stability limit.

    * SGD: ``2/lr``. Heavy-ball momentum ``beta`` (dampening ``d``): ``(2 + 2 beta) / ((1 - d) lr)``;
      Nesterov: ``(2 + 2 beta) / ((1 + 2 beta)(1 - d) lr)`` (Cohen et al. 2021, *Gradient
      descent on neural networks typically occurs at the edge of stability*, App. A).
    * Adam-type (a ``betas`` hyper-parameter): the preconditioned sharpness
      ``lambda_max(P^-1 H)`` against ``(2 + 2 beta1) / ((1 - beta1) lr)`` (Cohen et al. 2022,
      *Adaptive gradient methods at the edge of stability*), ``P`` from :func:`adam_preconditioner`.
    * Anything else: "unknown" (the sharpness alert is skipped).

    With several parameter groups the largest learning rate is used (the lowest limit).
    """
    groups = optimizer.param_groups
    lr = max(float(g.get("lr", math.nan)) for g in groups)
    two = 2.0 / lr if lr > 0 else math.inf
    first = groups[0]
    if "betas" in first:
        beta1 = float(first["betas"][0])
        limit = (2 + 2 * beta1) / ((1 - beta1) * lr) if lr > 0 and beta1 < 1 else math.inf
        return StabilityLimit("adam", limit, lr, two, f"(2 + 2*beta1)/((1 - beta1)*lr), beta1={beta1:g}")
    if isinstance(optimizer, torch.optim.SGD) or "momentum" in first and "dampening" in first:
        beta = float(first.get("momentum", 0.0))
        damp = float(first.get("dampening", 0.0)) if beta > 0 else 0.0
        if lr <= 0 or damp >= 1:
            return StabilityLimit("sgd", math.inf, lr, two, "2/lr")
        if beta == 0:
            return StabilityLimit("sgd", two, lr, two, "2/lr")
        if first.get("nesterov", False):
            limit = (2 + 2 * beta) / ((1 + 2 * beta) * (1 - damp) * lr)
            return StabilityLimit(
                "sgd", limit, lr, two, f"(2 + 2*beta)/((1 + 2*beta)*lr), Nesterov beta={beta:g}"
            )
        limit = (2 + 2 * beta) / ((1 - damp) * lr)
        return StabilityLimit("sgd", limit, lr, two, f"(2 + 2*beta)/lr, heavy-ball beta={beta:g}")
    return StabilityLimit("unknown", math.inf, lr, two, "unknown optimizer")


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Tensor | None:
    """Adam's current diagonal preconditioner ``P = sqrt(v_hat) + eps`` as one flat vector.

    ``v_hat`` is the bias-corrected second moment (``max_exp_avg_sq`` under AMSGrad). Parameters
    the optimizer does not update get ``inf`` (``P^-1 = 0``: they cannot destabilise it). None
    before the first step (no second moment yet). The preconditioned sharpness is the top
    eigenvalue of ``P^-1/2 H P^-1/2``, similar to ``P^-1 H`` (see :func:`preconditioned`).
    """
    hyper: dict[int, Mapping[str, Any]] = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    seen = False
    for p in params:
        group, state = hyper.get(id(p)), optimizer.state.get(p, {})
        v = state.get("max_exp_avg_sq", state.get("exp_avg_sq")) if group is not None else None
        if v is None or "step" not in state:
            parts.append(torch.full((p.numel(),), math.inf, dtype=p.dtype, device=p.device))
            continue
        seen = True
        step = float(state["step"])
        beta2 = float(group["betas"][1])
        v_hat = v.reshape(-1).to(p.dtype) / (1 - beta2**step)
        parts.append(v_hat.sqrt() + float(group.get("eps", 1e-8)))
    return torch.cat(parts) if seen else None


def preconditioned(matvec: MatVec, precond: Tensor) -> MatVec:
    """``v -> P^-1/2 H P^-1/2 v``: symmetric, with the eigenvalues of ``P^-1 H``."""
    d = precond.rsqrt()

    def op(v: Tensor) -> Tensor:
        return d * matvec(d * v)

    op.n = precond.numel()  # type: ignore[attr-defined]
    op.dtype = precond.dtype  # type: ignore[attr-defined]
    op.device = precond.device  # type: ignore[attr-defined]
    return op


# ---- probe batches -----------------------------------------------------------------------------------
def batch_size(batch: Any) -> int | None:
    """Length of the first dimension of the first tensor in a batch (tensor, tuple/list, dict)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = batch_size(item)
            if size is not None:
                return size
    return None


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """The rows ``start:stop`` of every tensor of a batch; other leaves unchanged."""
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.dim() else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: slice_batch(v, start, stop) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(slice_batch(v, start, stop) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, start, stop) for v in batch)
    return batch


def split_batch(batch: Any, chunk_size: int | None) -> list[tuple[Any, float]]:
    """``(chunk, weight)`` pairs: rows in chunks of at most ``chunk_size``, weight = share of rows.

    For a mean-reduced loss, ``sum_c weight_c * loss(chunk_c)`` equals the loss of the whole
    batch, so the products of the chunks add up to the whole batch's product.
    """
    size = batch_size(batch)
    if chunk_size is None or size is None or size <= chunk_size:
        return [(batch, 1.0)]
    return [(slice_batch(batch, s, min(s + chunk_size, size)), (min(s + chunk_size, size) - s) / size)
            for s in range(0, size, chunk_size)]  # fmt: skip
