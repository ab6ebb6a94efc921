"""Gradients rounded to zero: exact zeros, subnormals and flushed values, counted and judged.

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

When: the counts are made on a monitored optimizer step, in ``on_before_optimizer_step`` (after
gradient accumulation and AMP unscaling, before clipping), and fetched with the driver's next host
synchronisation (split by :func:`to_float32_exact` so that float32 carries them exactly); then
:func:`group_shares` and :func:`underflow_finding` decide on the host. This module is pure torch:
no Lightning, no logging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from healthmon.numerics.findings import Finding
from healthmon.numerics.gradients import dense_values
from healthmon.numerics.precision import dtype_facts

TOTAL, ZEROS, SUBNORMAL, FLUSHED = 0, 1, 2, 3

_NATIVE_FOREACH = (torch.float16, torch.bfloat16, torch.float32)


def _count(indicators: list[Tensor] | tuple[Tensor, ...], acc: torch.dtype | None) -> Tensor:
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
    # One gradient-sized temporary (|g|), worked in place: a second one costs more than the
    # arithmetic on a CPU (each fresh buffer is paged in again). The nonzero entries are counted
    # by the L0 "norm", which needs no temporary.
    shifted = torch._foreach_abs(work)
    # poison the counts of a non-finite tensor with 0 * its norm (NaN), so that a NaN gradient
    # is never mistaken for a zero one (nor counted as normal: sign(NaN) is 0)
    poison = torch.stack(torch._foreach_norm(shifted, 2, dtype=acc)).double() * 0
    nonzero = torch.stack(torch._foreach_norm(work, 0, dtype=acc)).double().round() + poison
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


# ---- fetching counts exactly through a float32 channel --------------------------------------------
_SPLIT = float(2**24)


def to_float32_exact(counts: Tensor) -> Tensor:
    """Integer counts (float64, below 2**48) as ``[high, low]`` pairs that float32 holds exactly.

    Deferred values are fetched as float32, which rounds counts above 2**24 (a large embedding
    table); ``count == high * 2**24 + low`` with both parts below 2**24. NaN stays NaN.
    """
    high = torch.floor(counts / _SPLIT)
    return torch.stack([high, counts - high * _SPLIT], dim=-1)


def from_float32_exact(values: Sequence[float], columns: int = 4) -> Tensor:
    """The float64 ``(n, columns)`` counts that :func:`to_float32_exact` split into ``values``."""
    pairs = torch.tensor(values, dtype=torch.float64).reshape(-1, columns, 2)
    return pairs[..., 0] * _SPLIT + pairs[..., 1]


# ---- shares per group, and the decision ----------------------------------------------------------
@dataclass(frozen=True)
class Shares:
    """Zero, subnormal and flushed shares of a group of gradients (see :func:`fractions`)."""

    zero: float
    subnormal: float
    flushed: float


def group_shares(counts: Tensor, group_index: Sequence[int], names: Sequence[str]) -> dict[str, Shares]:
    """:class:`Shares` of each group that holds a tensor, by name, in group order.

    Args:
        counts: fetched ``(n, 4)`` per-tensor counts (host).
        group_index: the group (layer, dtype) of each tensor, indexing ``names``.
        names: group names.
    """
    rows = fractions(grouped_counts(counts, group_index, len(names))).tolist()
    return {names[g]: Shares(*rows[g]) for g in sorted(set(group_index))}


def underflow_finding(
    layers: Mapping[str, Shares], tensor_layers: Sequence[str], tensor_dtypes: Sequence[str], fraction: float
) -> Finding | None:
    """``grad.underflow`` when some layer's share of subnormal nonzero entries reaches ``fraction``.

    The decision uses the exact share of nonzero entries in the subnormal range; the flushed-to-zero
    figure is an upper-bound estimate (structural zeros such as ReLU-masked columns count too), so
    it is reported but never decides on its own. A gradient flushed entirely to zero is the
    whole-tensor ``grad.zero`` case.

    Args:
        layers: shares per layer (see :func:`group_shares`), measured on a monitored step.
        tensor_layers: the layer of each gradient tensor.
        tensor_dtypes: the dtype name of each gradient tensor.
        fraction: the subnormal share that is reported (the worst layer is named).
    """
    subnormal = {name: s.subnormal for name, s in layers.items() if not math.isnan(s.subnormal)}
    flagged = [name for name, share in subnormal.items() if share >= fraction]
    if not flagged:
        return None
    worst = max(flagged, key=lambda name: subnormal[name])
    sub, flushed = layers[worst].subnormal, layers[worst].flushed
    kinds = "/".join(
        sorted({d for layer, d in zip(tensor_layers, tensor_dtypes, strict=True) if layer == worst})
    )
    return Finding(
        "grad.underflow",
        f"{sub:.0%} of the nonzero {kinds} gradient entries of {worst} are "
        f"subnormal (an estimated {flushed:.0%} of its entries flushed to zero); "
        f"{len(flagged)} layer(s) affected.",
        where=worst,
        value=sub,
    )


# ---- sampling ----------------------------------------------------------------------------------
def sample_indices(numel: int, k: int, generator: torch.Generator) -> Tensor:
    """Fixed sample of flat element indices of a tensor: all of them when ``numel <= k``.

    Drawn with the caller's private generator, so the global RNG (and the run) is untouched.
    """
    if numel <= k:
        return torch.arange(numel)
    # O(k) draws (a randperm of a large tensor would cost O(numel)); duplicates are dropped.
    return torch.randint(numel, (k,), generator=generator).unique()


def log10_magnitudes(grad: Tensor) -> Tensor:
    """log10|g| of the nonzero stored values of a gradient (for histograms), as float32."""
    v = dense_values(grad.detach()).float().reshape(-1)
    v = v[v != 0]
    return v.abs().log10()
