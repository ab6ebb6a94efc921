"""The kinds of non-finite values a tensor holds, told apart exactly."""

from __future__ import annotations

import torch

from healthmon.numerics.nonfinite import nonfinite_kinds


def test_nonfinite_kinds_are_exact() -> None:
    t = [torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")]), torch.ones(3), torch.empty(0)]
    assert nonfinite_kinds(t) == [frozenset({"NaN"}), frozenset({"-inf"}), frozenset(), frozenset()]
    c = torch.tensor([complex(1, float("inf"))])
    assert nonfinite_kinds([c]) == [frozenset({"+inf"})]
    mixed = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=torch.float16)
    assert nonfinite_kinds([mixed]) == [frozenset({"NaN", "+inf", "-inf"})]
    assert nonfinite_kinds([torch.tensor([1e300], dtype=torch.float64)]) == [frozenset()]
