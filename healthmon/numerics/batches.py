"""Probe batches: size, row slices and chunks of any batch structure (pure torch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


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
        # the batch's own mapping type (dict, BatchEncoding...): mypy sees only the abstract Mapping
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
