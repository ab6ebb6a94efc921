"""Gradients rounded to zero: exact zeros, subnormals, flushed values, dead units, lost updates, depth.

Counting is fused: per (device, dtype) group of gradients a handful of ``torch._foreach_*``
kernels give, per tensor, the number of nonzero and of normal elements; everything else (zeros,
subnormals, the flushed-to-zero estimate, per-layer and per-dtype fractions) is arithmetic on one
small ``(n, 4)`` matrix that stays on the device until the caller synchronises once.

Columns of the count matrix (see :data:`TOTAL`, :data:`ZEROS`, :data:`SUBNORMAL`, :data:`FLUSHED`):

* ``total``: elements counted (for a sparse gradient, its coalesced stored values only).
* ``zeros``: elements exactly 0.
* ``subnormal``: nonzero elements with ``|g| < finfo.smallest_normal`` (the subnormal range,
  where precision is lost bit by bit until the value flushes to zero).
* ``flushed``: the estimate of elements that underflowed to exactly zero, defined as **the zeros
  of a tensor that also holds subnormal values**. A zero cannot tell whether it was flushed, but a
  gradient whose magnitudes already reach into the subnormal range is a continuum running off the
  bottom of the dtype: its zeros sit just below its smallest stored values. Tensors without any
  subnormal value contribute no flushed zeros (their zeros are structural: dead units, masks, or a
  whole tensor flushed at once, which the whole-tensor ``grad.zero`` check reports). The estimate
  is an upper bound for such a tensor (structural zeros in it are counted too) and costs nothing
  beyond the counts already made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from healthmon.numerics.precision import dtype_facts

TOTAL, ZEROS, SUBNORMAL, FLUSHED = 0, 1, 2, 3

#: Activations whose derivative is exactly zero on part of their domain (dying-unit candidates).
#: ``nn.ReLU6`` is a subclass of ``nn.Hardtanh``.
RELU_FAMILY: tuple[type[nn.Module], ...] = (nn.ReLU, nn.Hardtanh)

_NATIVE_FOREACH = (torch.float16, torch.bfloat16, torch.float32)


def dense_values(grad: Tensor) -> Tensor:
    """The stored values of a gradient: coalesced values of a sparse one, real view of a complex one.

    Rows absent from a sparse gradient (embedding rows not in the batch) are never counted.
    """
    if grad.is_sparse:
        grad = grad.coalesce().values()
    elif grad.layout != torch.strided:
        grad = grad.values()
    if grad.is_complex():
        grad = torch.view_as_real(grad)
    return grad


def _count(indicators: list[Tensor], acc: torch.dtype | None) -> Tensor:
    """Number of ones in each 0/1 tensor: round(||t||_2 ** 2) (NaN when the tensor holds NaN)."""
    return torch.stack(torch._foreach_norm(indicators, 2, dtype=acc)).double().square().round()


def _group_counts(tensors: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(nonzero, normal) per tensor for tensors of one dtype and device, with fused kernels."""
    facts = dtype_facts(dtype)
    if dtype in _NATIVE_FOREACH:
        work, acc = tensors, torch.float32
    elif dtype == torch.float64:
        work, acc = tensors, None
    else:  # float8: no arithmetic kernels; float32 holds every float8 value exactly
        work, acc = [t.float() for t in tensors], torch.float32
    # Counting with sign() and the L2 norm: ||sign(x)||^2 is the number of nonzero entries. It is
    # several times faster on CPU than the L0 "norm" (a slow path) and rounds back to the integer.
    shifted = torch._foreach_abs(work)
    # sign(NaN) is 0: poison the counts of a non-finite tensor with 0 * its norm (NaN) instead,
    # so a NaN gradient is never mistaken for a zero one.
    poison = torch.stack(torch._foreach_norm(shifted, 2, dtype=acc)).double() * 0
    signs = torch._foreach_sign(shifted)
    nonzero = _count(signs, acc) + poison
    if not facts.has_subnormals:
        return nonzero, nonzero
    # |g| - largest_subnormal > 0  <=>  |g| >= smallest_normal (exact: Sterbenz + gradual underflow)
    torch._foreach_sub_(shifted, facts.largest_subnormal)
    torch._foreach_clamp_min_(shifted, 0.0)
    torch._foreach_sign_(shifted)
    normal = _count(shifted, acc) + poison
    return nonzero, normal


def gradient_counts(grads: Sequence[Tensor], *, structural_zeros: Sequence[bool] | None = None) -> Tensor:
    """Per-tensor ``[total, zeros, subnormal, flushed]`` counts as a float64 ``(n, 4)`` device tensor.

    A few fused kernels per (device, dtype) group, no host synchronisation. Counts are exact up
    to 2**22 elements per tensor (float32 accumulation of a norm, squared and rounded) and within
    a relative 1e-6 beyond. A tensor holding NaN gets NaN counts (the non-finite check reports it).

    Args:
        grads: gradients (dense, sparse COO/CSR, or complex) of any floating dtype.
        structural_zeros: per tensor, True when its zeros are legitimate and must not be counted
            (a dense ``nn.Embedding`` gradient: rows not in the batch are zero by construction).
            Such a tensor counts only its nonzero elements.

    Caveat: with ``torch.set_flush_denormal(True)`` the CPU itself treats subnormals as zero.
    """
    if structural_zeros is not None and len(structural_zeros) != len(grads):
        raise ValueError(
            f"`structural_zeros`: expected {len(grads)} flags (one per gradient), "
            f"got {len(structural_zeros)}."
        )
    if not grads:
        return torch.zeros(0, 4, dtype=torch.float64)
    values = [dense_values(g.detach()) for g in grads]
    device = values[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, v in enumerate(values):
        if not v.dtype.is_floating_point:
            raise TypeError(f"`grads[{i}]`: expected a floating-point gradient, got dtype {v.dtype}.")
        groups.setdefault((v.device, v.dtype), []).append(i)
    order: list[int] = []
    nonzero_parts, normal_parts = [], []
    for (_, dtype), idx in groups.items():
        nonzero, normal = _group_counts([values[i] for i in idx], dtype)
        nonzero_parts.append(nonzero.to(device=device, dtype=torch.float64))
        normal_parts.append(normal.to(device=device, dtype=torch.float64))
        order.extend(idx)
    perm = torch.empty(len(order), dtype=torch.long)
    perm[torch.tensor(order)] = torch.arange(len(order))
    perm = perm.to(device)
    nonzero = torch.cat(nonzero_parts)[perm]
    normal = torch.cat(normal_parts)[perm]
    total = torch.tensor([float(v.numel()) for v in values], dtype=torch.float64).to(device)
    zeros = total - nonzero
    if structural_zeros is not None and any(structural_zeros):
        keep = torch.tensor([not s for s in structural_zeros], dtype=torch.float64).to(device)
        total = total - zeros * (1 - keep)
        zeros = zeros * keep
    subnormal = nonzero - normal
    flushed = torch.where(subnormal > 0, zeros, zeros * 0)  # zeros * 0 keeps a NaN
    return torch.stack([total, zeros, subnormal, flushed], dim=1)


def grouped_counts(counts: Tensor, group_index: Sequence[int] | Tensor, num_groups: int) -> Tensor:
    """Sum per-tensor count rows into groups (layers, dtypes): ``(num_groups, 4)``."""
    index = torch.as_tensor(group_index, dtype=torch.long).to(counts.device)
    out = torch.zeros(num_groups, counts.shape[1], dtype=counts.dtype, device=counts.device)
    return out.index_add_(0, index, counts)


def fractions(counts: Tensor) -> Tensor:
    """``[zero, subnormal, flushed]`` fractions per row of a count matrix; NaN where undefined.

    * zero fraction: zeros / total.
    * subnormal fraction: subnormal / nonzero (of the values that survived, how many are losing
      precision).
    * flushed fraction: flushed / total.
    """
    total = counts[:, TOTAL]
    nonzero = total - counts[:, ZEROS]
    nan = torch.full_like(total, math.nan)
    zero = torch.where(total > 0, counts[:, ZEROS] / total.clamp_min(1), nan)
    sub = torch.where(nonzero > 0, counts[:, SUBNORMAL] / nonzero.clamp_min(1), nan)
    flushed = torch.where(total > 0, counts[:, FLUSHED] / total.clamp_min(1), nan)
    return torch.stack([zero, sub, flushed], dim=1)


# ---- dead units -------------------------------------------------------------------------------
def unit_axis(output: Tensor) -> int:
    """The axis that indexes units: features for ``(N, F)`` and ``(N, T, F)``, channels for conv maps.

    Outputs of rank 4 or more (``(N, C, H, W)``...) are treated as convolution feature maps;
    rank 1, 2 and 3 outputs as feature vectors along the last axis.
    """
    return 1 if output.dim() >= 4 else output.dim() - 1


def active_units(module: nn.Module, output: Tensor) -> Tensor:
    """Per unit, True when the activation's derivative was nonzero for at least one input of the batch.

    A unit whose derivative is zero for every sample and position passes no gradient back: for
    ``nn.ReLU`` the output was ``<= 0`` everywhere (a dying ReLU); for ``nn.Hardtanh`` / ``nn.ReLU6``
    the input sat on a flat side. Measured from the forward output only (no backward hook), so it
    works with ``inplace=True`` activations.
    """
    out = output.detach()
    if isinstance(module, nn.Hardtanh):
        live = (out > module.min_val) & (out < module.max_val)
    elif isinstance(module, nn.ReLU):
        live = out > 0
    else:
        raise TypeError(f"`module`: expected one of {[c.__name__ for c in RELU_FAMILY]}, got {module!r}.")
    axis = unit_axis(out)
    units = live.shape[axis] if live.dim() else 1
    return live.movedim(axis, -1).reshape(-1, units).any(dim=0)


def dead_fraction(active: Tensor) -> Tensor:
    """Fraction of units that were not active (device scalar, float32)."""
    return (~active).float().mean() if active.numel() else torch.zeros((), device=active.device)


# ---- stale updates ----------------------------------------------------------------------------
def sample_indices(numel: int, k: int, generator: torch.Generator) -> Tensor:
    """Fixed sample of flat element indices of a tensor: all of them when ``numel <= k``.

    Drawn with the caller's private generator, so the global RNG (and the run) is untouched.
    """
    if numel <= k:
        return torch.arange(numel)
    # O(k) draws (a randperm of a large tensor would cost O(numel)); duplicates are dropped.
    return torch.randint(numel, (k,), generator=generator).unique()


# ---- depth profile ----------------------------------------------------------------------------
def layer_rms(per_tensor_norms: Tensor, numel: Sequence[int], layer_index: Sequence[int], n: int) -> Tensor:
    """Root-mean-square gradient entry per layer from per-tensor L2 norms (size-independent).

    RMS rather than the norm, so that a wide layer is not "larger" than a narrow one just by size.
    Layers with no tensor get NaN.
    """
    device = per_tensor_norms.device
    index = torch.as_tensor(layer_index, dtype=torch.long).to(device)
    sq = torch.zeros(n, dtype=torch.float64, device=device).index_add_(
        0, index, per_tensor_norms.to(torch.float64).square()
    )
    cnt = torch.zeros(n, dtype=torch.float64, device=device).index_add_(
        0, index, torch.tensor([float(c) for c in numel], dtype=torch.float64).to(device)
    )
    return torch.where(cnt > 0, (sq / cnt.clamp_min(1)).sqrt(), torch.full_like(sq, math.nan))


def depth_decay_orders(rms_by_depth: Sequence[float]) -> float | None:
    """Orders of magnitude the gradient loses from the last layer back to the first: log10(last/first).

    ``rms_by_depth`` is ordered input -> output; layers without a gradient (NaN) are skipped.
    Returns None with fewer than two layers, or when the last layer's gradient is zero (nothing
    to compare against); ``inf`` when the first layer's gradient is exactly zero.
    """
    values = [v for v in rms_by_depth if not math.isnan(v)]
    if len(values) < 2 or values[-1] <= 0 or math.isinf(values[-1]):
        return None
    first, last = values[0], values[-1]
    if first <= 0:
        return math.inf
    return math.log10(last / first)


def depth_profile_judged(loss_level: float, start_loss: float | None, fraction: float = 0.5) -> bool:
    """Whether a decay along depth still says something: the loss is above ``fraction`` of its start.

    A stack whose first layers get no gradient cannot learn: its loss stays near where it started,
    and the profile is judged from the first checked step on (step 0 with the default cadence).
    Once the loss has fallen below ``fraction`` of its start, the run has learned through those
    layers; a profile that decays then (a post-LN BERT at 4% of its initial loss: the classifier's
    gradient rms 0.03, the embeddings' LayerNorm 1e-5, under AdamW, whose update does not scale
    with the gradient) is the head's leftover error, not a vanishing gradient. ``start_loss`` is
    None (not known yet) or not positive: judged.
    """
    if start_loss is None or start_loss <= 0.0 or not math.isfinite(loss_level):
        return True
    return loss_level > fraction * start_loss


# ---- zero gradients at a stationary point ---------------------------------------------------------
STATIONARY_ORDERS = 3.0


def at_stationary_point(norm: float, peak: float, orders: float = STATIONARY_ORDERS) -> bool:
    """Whether the whole model's gradient has collapsed: ``norm`` is ``orders`` decades below ``peak``.

    ``norm`` is the global gradient norm of this step, ``peak`` the largest the run has had. At a
    stationary point of the whole model (full-batch least squares at its float32 optimum: the
    bias gradient, the mean residual, is exactly 0 while the weights' is roundoff) an exactly zero
    tensor is the optimum, not a cut gradient path; whether that point is a good one is for the
    loss to say (``grad.vanishing``). A run that never had a gradient (``peak`` 0) is not at one.
    """
    if not (math.isfinite(norm) and math.isfinite(peak)) or peak <= 0.0:
        return False
    return norm <= peak * 10.0 ** (-orders)


def log10_magnitudes(grad: Tensor) -> Tensor:
    """log10|g| of the nonzero stored values of a gradient (for histograms), as float32."""
    v = dense_values(grad.detach()).float().reshape(-1)
    v = v[v != 0]
    return v.abs().log10()
