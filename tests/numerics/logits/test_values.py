"""healthmon.numerics.logits.values: does a tensor look like softmax or sigmoid output?"""

from __future__ import annotations

import pytest
import torch

from healthmon.numerics.logits.values import (
    looks_like_sigmoid,
    looks_like_softmax,
    row_tolerance,
    saturated_fraction,
)


def _data() -> tuple[torch.Tensor, None, None]:
    return torch.randn(16, 5, generator=torch.Generator().manual_seed(0)) * 2, None, None


def test_value_rules_against_brute_force() -> None:
    x, _, _ = _data()
    p = torch.softmax(x, -1)
    assert looks_like_softmax(p, 1).item() == 1.0
    assert looks_like_softmax(p, 0).item() == 0.0
    assert looks_like_softmax(x, 1).item() == 0.0
    assert looks_like_softmax(p.half(), 1).item() == 1.0
    assert looks_like_sigmoid(torch.sigmoid(x)).item() == 1.0
    assert looks_like_sigmoid(torch.tensor([0.0, 0.5])).item() == 0.0
    q = torch.tensor([[0.0, 1.0], [0.3, 0.7], [1.0, 0.0]])
    assert saturated_fraction(q).item() == pytest.approx(4 / 6)


def test_degenerate_inputs_are_never_probabilities() -> None:
    assert looks_like_softmax(torch.tensor(0.5), 0).item() == 0.0  # a scalar
    assert looks_like_softmax(torch.tensor([[1.0], [1.0]]), 1).item() == 0.0  # one class
    assert looks_like_sigmoid(torch.tensor([0.5])).item() == 0.0  # a single entry
    assert saturated_fraction(torch.zeros(0)).item() == 0.0


def test_row_tolerance_follows_the_dtype() -> None:
    assert row_tolerance(torch.zeros(1)) == 1e-3
    assert row_tolerance(torch.zeros(1, dtype=torch.bfloat16)) == 2e-2
