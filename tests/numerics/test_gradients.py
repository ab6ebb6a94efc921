"""Fused gradient norms against the norm of the concatenated gradient."""

from __future__ import annotations

import pytest
import torch

from healthmon.numerics.gradients import global_norm, grouped_norms, nonfinite_indices, tensor_norms


def _reference(tensors: list[torch.Tensor]) -> torch.Tensor:
    flat = [t.to_dense() if t.is_sparse else t for t in tensors]
    flat = [torch.view_as_real(t) if t.is_complex() else t for t in flat]
    return torch.linalg.vector_norm(torch.cat([t.double().reshape(-1) for t in flat]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_global_norm_is_the_norm_of_the_concatenation(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(shape, generator=g).to(dtype) for shape in [(5, 3), (7,), (2, 2, 2), (1,)]]
    norms = tensor_norms(tensors)
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and norms.shape == (4,)
    for n, t in zip(norms, tensors, strict=True):
        torch.testing.assert_close(n.double(), torch.linalg.vector_norm(t.double()), rtol=1e-6, atol=0)
    torch.testing.assert_close(global_norm(norms).double(), _reference(tensors), rtol=1e-6, atol=0)
    # the bug this guards against: summing per-layer norms is not the global norm
    assert float(norms.sum()) > float(global_norm(norms)) * 1.1


def test_float16_norm_does_not_overflow() -> None:
    big = torch.full((100,), 6e4, dtype=torch.float16)  # squares overflow float16 (max 65504)
    torch.testing.assert_close(tensor_norms([big])[0], torch.tensor(6e5), rtol=1e-3, atol=0)


def test_mixed_dtypes_sparse_and_complex() -> None:
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 3, 3]]), torch.tensor([1.0, 2.0, 2.0]), (5,))
    tensors = [
        torch.randn(4, dtype=torch.bfloat16),
        sparse,
        torch.randn(3, dtype=torch.complex64),
        torch.randn(2),
    ]
    torch.testing.assert_close(
        global_norm(tensor_norms(tensors)).double(), _reference(tensors), rtol=1e-5, atol=0
    )
    # duplicate indices are summed on coalescing: values (1, 4), norm sqrt(17)
    assert float(tensor_norms([sparse])[0]) == pytest.approx(17**0.5)


def test_grouped_norms_match_per_group_concatenation() -> None:
    tensors = [torch.randn(3), torch.randn(4), torch.randn(5), torch.randn(2)]
    index = torch.tensor([0, 1, 0, 2])
    grouped = grouped_norms(tensor_norms(tensors), index, 3)
    expect = [_reference([tensors[0], tensors[2]]), _reference([tensors[1]]), _reference([tensors[3]])]
    torch.testing.assert_close(grouped.double(), torch.stack(expect), rtol=1e-6, atol=0)


def test_nonfinite_tensors_are_found() -> None:
    tensors = [torch.ones(3), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")]), torch.zeros(2)]
    norms = tensor_norms(tensors).tolist()
    assert nonfinite_indices(norms) == [1, 2]
    assert not torch.isfinite(global_norm(torch.tensor(norms)))


def test_host_side_combinations_match_the_concatenation() -> None:
    from healthmon.numerics.gradients import combined_norm, combined_norms_by_group

    tensors = [torch.randn(3), torch.randn(4), torch.randn(5), torch.randn(2)]
    norms = tensor_norms(tensors).tolist()
    assert combined_norm(norms) == pytest.approx(float(_reference(tensors)), rel=1e-6)
    groups = combined_norms_by_group(norms, ["a", "b", "a", "c"])
    assert groups["a"] == pytest.approx(float(_reference([tensors[0], tensors[2]])), rel=1e-6)
    assert set(groups) == {"a", "b", "c"}
    assert combined_norm([1.0, float("nan")]) != combined_norm([1.0, float("nan")])  # NaN propagates
    assert combined_norm([1.0, float("inf")]) == float("inf")
