"""Probe batches: sizes, row slices and weighted chunks of tensors, tuples, dicts and named tuples.

The chunked Hessian-vector products built on :func:`split_batch` are tests/numerics/test_hvp.py.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F

from healthmon.numerics.batches import batch_size, slice_batch, split_batch


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def test_batch_size_is_the_first_dimension_of_the_first_tensor() -> None:
    assert batch_size(torch.zeros(5, 3)) == 5
    assert batch_size(torch.tensor(1.0)) is None  # a scalar has no rows
    assert batch_size((torch.tensor(2.0), [torch.zeros(4, 2)], torch.zeros(9))) == 4
    assert batch_size({"mask": None, "ids": torch.zeros(6, 8)}) == 6
    assert batch_size(Pair(torch.zeros(3, 2), torch.zeros(3))) == 3
    assert batch_size(["text", 3]) is None
    assert batch_size(None) is None


def test_slice_batch_keeps_the_structure_and_non_tensor_leaves() -> None:
    x, y = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    scale = torch.tensor(0.5)
    batch = OrderedDict(x=x, meta=["a", "b"], pair=Pair(x, y), scale=scale)
    part = slice_batch(batch, 2, 5)
    assert type(part) is OrderedDict
    assert list(part) == ["x", "meta", "pair", "scale"]
    assert torch.equal(part["x"], x[2:5])
    assert part["meta"] == ["a", "b"]
    assert type(part["pair"]) is Pair
    assert torch.equal(part["pair"].y, y[2:5])
    assert part["scale"] is scale
    assert isinstance(slice_batch([x, y], 0, 1), list)


def test_split_batch_returns_the_whole_batch_when_it_fits_or_has_no_rows() -> None:
    x = torch.zeros(4, 2)
    for chunk_size in (None, 4, 10):
        ((whole, weight),) = split_batch((x,), chunk_size)
        assert whole[0] is x
        assert weight == 1.0
    ((leaf, _),) = split_batch("no tensors", 2)
    assert leaf == "no tensors"


def test_weighted_chunk_losses_add_up_to_the_whole_batch_loss() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    chunks = split_batch((x, y), 4)
    assert [batch_size(c) for c, _ in chunks] == [4, 4, 2]
    assert [w for _, w in chunks] == [0.4, 0.4, 0.2]
    whole = F.cross_entropy(x, y)
    parts = sum(w * F.cross_entropy(cx, cy) for (cx, cy), w in chunks)
    torch.testing.assert_close(parts, whole, rtol=1e-14, atol=0)
