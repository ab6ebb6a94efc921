"""healthmon.numerics.eigensolvers.operators: the operator in the working dtype, start vectors, checks."""

from __future__ import annotations

import pytest
import torch

from healthmon.numerics.eigensolvers.operators import (
    check_solver_args,
    operator_facts,
    start_block,
    vector_ratio,
    working_dtype,
)


def test_working_dtype_never_computes_below_float32() -> None:
    assert working_dtype(torch.bfloat16) == torch.float32
    assert working_dtype(torch.float16) == torch.float32
    assert working_dtype(torch.float32) == torch.float32
    assert working_dtype(torch.float64) == torch.float64
    assert vector_ratio(torch.bfloat16) == 2.0 and vector_ratio(torch.float64) == 1.0


def test_dense_bf16_matrix_is_multiplied_in_its_dtype_and_returned_in_float32() -> None:
    h = torch.diag(torch.tensor([2.0, 3.0])).bfloat16()
    product, n, work, device, op_dtype = operator_facts(h, None)
    out = product(torch.ones(2))
    assert (n, work, op_dtype, device.type) == (2, torch.float32, torch.bfloat16, "cpu")
    assert out.dtype == torch.float32 and out.tolist() == [2.0, 3.0]


def test_callable_operator_needs_its_dimension() -> None:
    with pytest.raises(ValueError, match=r"`n`: expected the operator's dimension"):
        operator_facts(lambda v: v, None)
    product, n, work, _, _ = operator_facts(lambda v: 2 * v, 3)
    assert n == 3 and work == torch.float32 and product(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]


def test_start_block_keeps_a_finite_warm_start_and_pads_it() -> None:
    g = torch.Generator().manual_seed(0)
    v0 = torch.tensor([1.0, 0.0, 0.0])
    block = start_block(v0, 3, 2, torch.float32, torch.device("cpu"), g)
    assert block.shape == (3, 2) and block[:, 0].tolist() == [1.0, 0.0, 0.0]
    nan_start = start_block(torch.full((3,), float("nan")), 3, 1, torch.float32, torch.device("cpu"), g)
    assert bool(torch.isfinite(nan_start).all())  # a non-finite warm start is dropped


@pytest.mark.parametrize(
    ("k", "tol", "max_products", "match"),
    [
        (0, 1e-3, 10, r"`k`: expected an integer >= 1, got 0\."),
        (True, 1e-3, 10, r"`k`: expected an integer >= 1, got True\."),
        (1, 1.0, 10, r"`tol`: expected a number in \(0, 1\), got 1\.0\."),
        (3, 1e-3, 2, r"`max_products`: expected an integer >= k = 3, got 2\."),
    ],
)
def test_solver_arguments_name_themselves(k, tol, max_products, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_solver_args(k, tol, max_products)
