"""Fused zero / subnormal / flushed counts against brute force, their exact transport, grad.underflow."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from healthmon.numerics.precision import dtype_facts, floating_dtypes
from healthmon.numerics.underflow import (
    FLUSHED,
    SUBNORMAL,
    TOTAL,
    ZEROS,
    Shares,
    fractions,
    from_float32_exact,
    gradient_counts,
    group_shares,
    grouped_counts,
    log10_magnitudes,
    sample_indices,
    to_float32_exact,
    underflow_finding,
)


def brute_counts(t: torch.Tensor, structural: bool = False) -> list[float]:
    """Reference: element by element in float64 on the host."""
    if t.is_sparse:
        t = t.coalesce().values()
    normal = dtype_facts(t.dtype).smallest_normal
    vals = t.double().reshape(-1).tolist()
    zeros = sum(v == 0 for v in vals)
    sub = sum(0 < abs(v) < normal for v in vals)
    total = len(vals)
    if structural:
        total, zeros = total - zeros, 0
    return [total, zeros, sub, zeros if sub > 0 else 0]


def hand_built(dtype: torch.dtype, n_zero: int, n_sub: int, n_normal: int, n_tiny: int = 0) -> torch.Tensor:
    """A tensor with exactly known counts: zeros, subnormals of several binades, normals, sub-tiny."""
    f = dtype_facts(dtype)
    subs = [f.smallest_subnormal, f.largest_subnormal, f.smallest_normal / 2, 3 * f.smallest_subnormal]
    values = [0.0] * n_zero
    values += [(-1) ** i * subs[i % len(subs)] for i in range(n_sub)]
    values += [(-1) ** i * f.smallest_normal * (1 + i) for i in range(n_normal)]
    values += [f.smallest_subnormal / 4] * n_tiny  # flushes to zero when cast: extra zeros
    return torch.tensor(values, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", floating_dtypes())
def test_counts_exact_per_dtype(dtype):
    t = hand_built(dtype, n_zero=5, n_sub=7, n_normal=11, n_tiny=3)
    counts = gradient_counts([t])
    assert counts.dtype == torch.float64
    assert counts[0].tolist() == [26.0, 8.0, 7.0, 8.0]
    assert counts[0].tolist() == brute_counts(t)


def test_counts_mixed_dtypes_keep_order_and_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    grads = []
    for i, dtype in enumerate([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float16]):
        x = (
            torch.randn(40 + i, generator=gen, dtype=torch.float64)
            * 10.0 ** torch.randint(-330, 0, (40 + i,), generator=gen).double()
        )
        x[:i] = 0
        grads.append(x.to(dtype).reshape(-1, 1) if i == 2 else x.to(dtype))
    grads.append(torch.zeros(3, 3))  # all zero, no subnormals: zeros but nothing flushed
    counts = gradient_counts(grads)
    assert counts.tolist() == [brute_counts(g) for g in grads]
    assert counts[-1].tolist() == [9.0, 9.0, 0.0, 0.0]


def test_sparse_gradient_counts_only_stored_values():
    emb = nn.Embedding(100, 4, sparse=True)
    emb(torch.tensor([1, 5, 5])).sum().backward()
    g = emb.weight.grad
    assert g.is_sparse
    counts = gradient_counts([g])
    assert counts[0].tolist() == [8.0, 0.0, 0.0, 0.0]  # 2 distinct rows x 4, the 98 absent rows unseen
    assert counts[0].tolist() == brute_counts(g)


def test_structural_zeros_are_not_counted():
    emb = nn.Embedding(10, 3)
    emb(torch.tensor([2])).sum().backward()
    tiny = hand_built(torch.float16, n_zero=2, n_sub=2, n_normal=0)
    counts = gradient_counts([emb.weight.grad, tiny], structural_zeros=[True, False])
    assert counts[0].tolist() == [3.0, 0.0, 0.0, 0.0] == brute_counts(emb.weight.grad, structural=True)
    assert counts[1].tolist() == [4.0, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="`structural_zeros`"):
        gradient_counts([tiny], structural_zeros=[True, False])


def test_counts_exact_for_a_million_elements_and_nan_poisons():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1_000_003, generator=gen)
    x[torch.randperm(x.numel(), generator=gen)[:123_457]] = 0.0
    x[:1001] = 1e-39  # float32 subnormals
    ref = [float(x.numel()), float((x == 0).sum()), 1001.0, float((x == 0).sum())]
    assert gradient_counts([x])[0].tolist() == ref
    poisoned = gradient_counts([torch.tensor([1.0, math.nan]), torch.tensor([0.0, math.inf])])
    assert all(math.isnan(v) for v in poisoned[:, ZEROS:].reshape(-1).tolist())


def test_complex_and_empty_and_integer():
    z = torch.tensor([0 + 0j, 1 + 0j])
    assert gradient_counts([z])[0].tolist() == [4.0, 3.0, 0.0, 0.0]
    assert gradient_counts([]).shape == (0, 4)
    with pytest.raises(TypeError, match="grads\\[0\\]"):
        gradient_counts([torch.zeros(2, dtype=torch.int64)])


def test_grouped_fractions_brute_force():
    grads = [
        hand_built(torch.float16, 4, 4, 8),
        hand_built(torch.float16, 0, 0, 5),
        hand_built(torch.bfloat16, 10, 0, 10),
        torch.zeros(0),
    ]
    counts = gradient_counts(grads)
    by_layer = grouped_counts(counts, [0, 0, 1, 2], 3)
    ref = [[a + b for a, b in zip(brute_counts(grads[0]), brute_counts(grads[1]), strict=True)]]
    ref += [brute_counts(grads[2]), [0.0, 0.0, 0.0, 0.0]]
    assert by_layer.tolist() == ref
    fr = fractions(by_layer)
    total, zeros, sub, flushed = ref[0]
    assert fr[0].tolist() == pytest.approx([zeros / total, sub / (total - zeros), flushed / total])
    assert fr[1].tolist()[0] == 0.5 and fr[1].tolist()[1:] == [0.0, 0.0]  # zeros without subnormals
    assert all(math.isnan(v) for v in fr[2].tolist())


def test_counts_columns_named():
    assert (TOTAL, ZEROS, SUBNORMAL, FLUSHED) == (0, 1, 2, 3)


def test_float16_cast_of_tiny_float32_gradient_flushes_and_is_estimated():
    """A float32 gradient cast to float16: the part below the flush threshold becomes 0.

    The estimate (zeros of a tensor that holds subnormals) recovers exactly those zeros.
    """
    f = dtype_facts(torch.float16)
    g32 = torch.logspace(-12, -3, 1000, dtype=torch.float32)  # no zeros in float32
    g16 = g32.half()
    truly_flushed = int((g32.double() <= f.flush_threshold).sum())
    counts = gradient_counts([g16])[0].tolist()
    assert counts[ZEROS] == truly_flushed > 0
    assert counts[FLUSHED] == truly_flushed
    assert counts[SUBNORMAL] == int(
        ((g32.double() > f.flush_threshold) & (g16.double() < f.smallest_normal)).sum()
    )


def test_sample_indices_private_generator_and_rng_untouched():
    state = torch.get_rng_state()
    a = sample_indices(1000, 16, torch.Generator().manual_seed(3))
    b = sample_indices(1000, 16, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and 12 <= len(set(a.tolist())) == a.numel() <= 16 and int(a.max()) < 1000
    assert torch.equal(sample_indices(5, 16, torch.Generator()), torch.arange(5))
    assert torch.equal(torch.get_rng_state(), state)


def test_log10_magnitudes_skips_zeros():
    v = log10_magnitudes(torch.tensor([0.0, 10.0, -0.01]))
    assert v.tolist() == pytest.approx([1.0, -2.0])


def test_counts_travel_exactly_through_float32():
    """Deferred values are fetched as float32: a count above 2**24 would be rounded, its parts are not."""
    counts = torch.tensor(
        [[2.0**40 + 3, 2.0**24 + 1, 5.0, 0.0], [7.0, 0.0, math.nan, 1.0]], dtype=torch.float64
    )
    parts = to_float32_exact(counts)
    assert parts.shape == (2, 4, 2)
    carried = parts.reshape(-1).float().tolist()  # what Hub.defer hands back
    back = from_float32_exact(carried)
    assert back[0].tolist() == counts[0].tolist()
    assert back[1, :2].tolist() == [7.0, 0.0] and math.isnan(back[1, 2]) and back[1, 3] == 1.0
    assert float(torch.tensor(2.0**24 + 1).float()) != 2.0**24 + 1  # the rounding the split avoids
    assert from_float32_exact([]).shape == (0, 4)


def test_group_shares_per_present_group_in_order():
    f = dtype_facts(torch.float16)
    a = torch.tensor([0.0, f.smallest_subnormal, f.smallest_normal, 1.0], dtype=torch.float16)
    b = torch.tensor([1.0, 2.0], dtype=torch.float16)
    counts = gradient_counts([a, b, b])
    shares = group_shares(counts, [2, 0, 2], ["l0", "l1", "l2"])
    assert list(shares) == ["l0", "l2"]  # l1 holds no tensor
    assert shares["l0"] == Shares(0.0, 0.0, 0.0)
    assert shares["l2"] == Shares(1 / 6, 1 / 5, 1 / 6)  # a's zero is counted as flushed (a holds a subnormal)


def test_underflow_finding_names_the_worst_layer_exactly():
    f = dtype_facts(torch.float16)
    tiny, normal = f.smallest_subnormal, f.smallest_normal
    grads = [
        torch.tensor([tiny, tiny, normal, 1.0, 0.0], dtype=torch.float16),  # l0: 2 of 4 nonzero subnormal
        torch.tensor([tiny, 1.0, 1.0, 1.0], dtype=torch.float16),  # l1: 1 of 4
        torch.tensor([1.0, 1.0], dtype=torch.bfloat16),  # l1 too
    ]
    shares = group_shares(gradient_counts(grads), [0, 1, 1], ["net.0", "net.2"])
    found = underflow_finding(shares, ["net.0", "net.2", "net.2"], ["float16", "float16", "bfloat16"], 0.1)
    assert found is not None and (found.code, found.where, found.value) == ("grad.underflow", "net.0", 0.5)
    assert found.message == (
        "50% of the nonzero float16 gradient entries of net.0 are subnormal (an estimated 20% of its "
        "entries flushed to zero); 2 layer(s) affected."
    )
    worst_mixed = underflow_finding(
        shares, ["net.0", "net.2", "net.2"], ["float16", "float16", "bfloat16"], 0.6
    )
    assert worst_mixed is None
    only_second = group_shares(gradient_counts(grads[1:]), [0, 0], ["net.2"])
    found = underflow_finding(only_second, ["net.2", "net.2"], ["float16", "bfloat16"], 1 / 6)
    assert found is not None and "bfloat16/float16 gradient entries of net.2" in found.message
    assert found.value == pytest.approx(1 / 6)
    nan_only = {"empty": Shares(math.nan, math.nan, math.nan)}
    assert underflow_finding(nan_only, [], [], 0.0) is None
