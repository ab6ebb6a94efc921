"""Fused gradient statistics: per-tensor and global L2 norms, grouped norms, non-finite flags.

All functions keep their results on the device as tensors; the caller decides when (and whether)
to synchronise with the host.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

GroupKey = TypeVar("GroupKey", bound=Hashable)  # what per-group norms are keyed by (layer, group index)


def dense_values(grad: Tensor) -> Tensor:
    """The stored values of a gradient: coalesced values of a sparse one, real view of a complex one.

    The result has the same L2 norm as ``grad``. Rows absent from a sparse gradient (embedding
    rows not in the batch) are not part of it.

    >>> g = torch.tensor([3.0, 0.0, 4.0, 0.0]).to_sparse()
    >>> dense_values(g).tolist(), dense_values(torch.tensor([1 + 2j])).tolist()
    ([3.0, 4.0], [[1.0, 2.0]])
    """
    if grad.is_sparse:
        grad = grad.coalesce().values()
    elif grad.layout != torch.strided:  # sparse CSR and friends
        grad = grad.values()
    if grad.is_complex():
        grad = torch.view_as_real(grad)
    return grad


_NARROW_FLOATS = frozenset((torch.float32, torch.float16, torch.bfloat16))


def tensor_norms(tensors: Sequence[Tensor]) -> Tensor:
    """Per-tensor L2 norms as one vector, computed with one fused foreach kernel per device.

    Norms are accumulated in float32 (float64 when a tensor is float64) whatever the tensors'
    dtype, so a float16 gradient whose squared entries overflow float16 still gets a finite norm.
    A tensor holding NaN/Inf gets a NaN/Inf norm, which is what the non-finite checks rely on.

    >>> tensor_norms([torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])]).tolist()
    [5.0, 1.0]
    >>> tensor_norms([torch.full((2,), 60000.0, dtype=torch.float16)]).item()  # 60000**2 overflows fp16
    84852.8125
    """
    if not tensors:
        return torch.zeros(0)
    if all(t.dtype in _NARROW_FLOATS and t.layout is torch.strided for t in tensors):
        # the common case, checked in one pass: dense real tensors that float32 can accumulate
        norms = torch._foreach_norm(list(tensors), 2, dtype=torch.float32)
        try:
            return torch.stack(norms)
        except RuntimeError:  # tensors on several devices: gather the norms on the first one
            device = norms[0].device
            return torch.stack([n if n.device == device else n.to(device) for n in norms])
    dense = [dense_values(t) for t in tensors]
    wide = [i for i, t in enumerate(dense) if t.dtype == torch.float64]
    if not wide:
        norms = torch._foreach_norm(dense, 2, dtype=torch.float32)
    else:  # float64 cannot be narrowed: accumulate everything in float64
        narrow = [i for i, t in enumerate(dense) if t.dtype != torch.float64]
        by_index = dict(zip(wide, torch._foreach_norm([dense[i] for i in wide], 2), strict=True))
        if narrow:
            parts = torch._foreach_norm([dense[i] for i in narrow], 2, dtype=torch.float32)
            by_index.update((i, n.double()) for i, n in zip(narrow, parts, strict=True))
        norms = tuple(by_index[i] for i in range(len(dense)))
    device = norms[0].device
    return torch.stack([n if n.device == device else n.to(device) for n in norms])


def global_norm(per_tensor_norms: Tensor) -> Tensor:
    """Global L2 norm of the concatenated tensors from their per-tensor norms.

    This is sqrt(sum of squares), not the sum of the per-tensor norms.

    >>> global_norm(torch.tensor([3.0, 4.0])).item()
    5.0
    """
    return torch.linalg.vector_norm(per_tensor_norms)


def grouped_norms(per_tensor_norms: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """L2 norm of each group of tensors (layer, parameter group) from per-tensor norms.

    Args:
        per_tensor_norms: float vector, one norm per tensor.
        group_index: int64 vector of the same length; entry i is the group of tensor i.
        num_groups: number of groups.
    """
    squares = per_tensor_norms.square()
    sums = torch.zeros(num_groups, dtype=squares.dtype, device=squares.device)
    return sums.index_add_(0, group_index.to(squares.device), squares).sqrt()


def combined_norm(norms: Sequence[float]) -> float:
    """The L2 norm of concatenated tensors from their norms, on the host: sqrt(sum of squares).

    NaN and Inf propagate (a non-finite tensor makes the whole norm non-finite).

    >>> combined_norm([3.0, 4.0])
    5.0
    >>> combined_norm([1.0, float("nan")])
    nan
    """
    return math.sqrt(math.fsum(n * n for n in norms))


def combined_norms_by_group(norms: Sequence[float], groups: Sequence[GroupKey]) -> dict[GroupKey, float]:
    """Per-group L2 norms (layers, parameter groups) from per-tensor norms, on the host.

    >>> combined_norms_by_group([3.0, 4.0, 2.0], ["fc1", "fc1", "fc2"])
    {'fc1': 5.0, 'fc2': 2.0}
    """
    squares: dict[GroupKey, float] = {}
    for n, g in zip(norms, groups, strict=True):
        squares[g] = squares.get(g, 0.0) + n * n
    return {g: math.sqrt(v) for g, v in squares.items()}


def nonfinite_indices(per_tensor_norms: Sequence[float]) -> list[int]:
    """Indices of tensors whose norm (and hence some entry) is NaN or Inf, from host values.

    >>> nonfinite_indices([1.0, float("inf"), 2.0, float("nan")])
    [1, 3]
    """
    return [i for i, n in enumerate(per_tensor_norms) if n != n or n in (float("inf"), float("-inf"))]


def reduce_sharded_norms(local_norms: Tensor, group: object | None = None) -> Tensor:
    """Per-tensor norms of gradients that are sharded across ranks (FSDP, tensor parallel).

    Each rank holds a disjoint shard of every gradient, so the full norm of tensor i is
    ``sqrt(sum over ranks of local_norm_i ** 2)``: one all-reduce (sum) of the squared local norms.
    Replicated gradients (plain DDP) must NOT go through this: their squares would be counted once
    per rank.

    Args:
        local_norms: per-tensor norms of this rank's shards (:func:`tensor_norms` of the shards).
        group: the process group the shards are spread over (None: the default group).
    """
    import torch.distributed as dist

    squares = local_norms.square()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
    return squares.sqrt()
