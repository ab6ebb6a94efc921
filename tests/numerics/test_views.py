"""The shared list of value-keeping tensor methods, checked against what torch's methods do."""

from __future__ import annotations

import pytest
import torch

from healthmon.numerics.views import CASTS_AND_VIEWS

ARGS: dict[str, tuple] = {
    "to": (torch.float64,),
    "view": (-1,),
    "reshape": (-1,),
    "squeeze": (),
    "unsqueeze": (0,),
    "permute": (1, 0),
    "transpose": (0, 1),
}


def test_names_are_distinct_tensor_methods() -> None:
    assert len(set(CASTS_AND_VIEWS)) == len(CASTS_AND_VIEWS)
    assert all(callable(getattr(torch.Tensor, name, None)) for name in CASTS_AND_VIEWS)
    assert "exp" not in CASTS_AND_VIEWS
    assert "softmax" not in CASTS_AND_VIEWS


@pytest.mark.parametrize("name", CASTS_AND_VIEWS)
def test_each_method_keeps_the_values_of_its_input(name: str) -> None:
    x = torch.tensor([[0.25, -1.5, 3.0], [2.0, 0.0, -0.125]])
    out = getattr(x, name)(*ARGS.get(name, ()))
    assert sorted(out.double().flatten().tolist()) == sorted(x.double().flatten().tolist())
