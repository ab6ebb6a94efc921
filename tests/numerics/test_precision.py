"""Dtype facts, ulp and the stale-update test against constructions and brute force."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from healthmon.numerics.precision import (
    below_half_ulp,
    dtype_facts,
    dtype_name,
    floating_dtypes,
    is_stale_update,
    same_bits,
    stale_counts,
    stale_fraction,
    ulp,
)

IEEE = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# significand bits after the leading one: the subnormal range spans this many binades
MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


def test_seed_example_float32_one_plus_1e8_is_one():
    a = np.array([0.0, 1e-8]).astype("float32")
    assert (a + 1).argmax() == 0  # the seed: the 1e-8 is gone
    one = torch.ones(1, dtype=torch.float32)
    assert bool(is_stale_update(one, torch.full((1,), 1e-8))[0])
    assert bool(below_half_ulp(one, torch.full((1,), 1e-8))[0])
    assert not bool(is_stale_update(one.double(), torch.full((1,), 1e-8))[0])  # float64 keeps it


@pytest.mark.parametrize("dtype", IEEE)
def test_facts_match_ieee_layout(dtype):
    f = dtype_facts(dtype)
    assert f.eps == 2.0 ** -MANTISSA[dtype]
    assert f.smallest_normal == torch.finfo(dtype).smallest_normal
    assert f.smallest_subnormal == f.smallest_normal * 2.0 ** -MANTISSA[dtype]
    assert f.smallest_subnormal == torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    assert f.largest_subnormal == f.smallest_normal - f.smallest_subnormal
    assert f.has_subnormals


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_smallest_subnormal_is_nextafter_zero(dtype):
    nxt = torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)).item()
    assert dtype_facts(dtype).smallest_subnormal == nxt


@pytest.mark.parametrize("dtype", floating_dtypes())
def test_subnormal_range_by_construction(dtype):
    f = dtype_facts(dtype)

    def cast(x: float) -> float:
        return torch.tensor(x, dtype=torch.float64).to(dtype).double().item()

    assert cast(f.smallest_subnormal) == f.smallest_subnormal > 0
    assert cast(f.smallest_subnormal / 2) == 0.0  # the tie rounds to even: zero
    assert cast(f.smallest_subnormal * 0.75) == f.smallest_subnormal
    assert cast(f.largest_subnormal) == f.largest_subnormal
    assert cast(f.smallest_normal) == f.smallest_normal
    # nothing representable strictly between 0 and the smallest subnormal
    assert all(cast(f.smallest_subnormal * k / 16) in (0.0, f.smallest_subnormal) for k in range(1, 16))


def test_float8_e5m2fnuz_subnormal_not_taken_from_finfo_eps():
    if not hasattr(torch, "float8_e5m2fnuz"):
        pytest.skip("no float8_e5m2fnuz in this torch")
    f = dtype_facts(torch.float8_e5m2fnuz)
    assert f.smallest_subnormal == 2.0**-17  # 2-bit mantissa below 2**-15


def test_dtype_facts_rejects_integers():
    with pytest.raises(TypeError, match="`dtype`"):
        dtype_facts(torch.int32)
    assert dtype_name(torch.bfloat16) == "bfloat16"


def _next_up_float32(x: float) -> float:
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    return struct.unpack("<f", struct.pack("<I", bits + 1))[0]


def test_ulp_float32_brute_force():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(200, generator=gen) * 10.0 ** torch.randint(-30, 30, (200,), generator=gen),
            torch.tensor([0.0, 1.0, 2.0, 0.5, 1e-40, -3.0, torch.finfo(torch.float32).smallest_normal]),
        ]
    ).float()
    got = ulp(x).tolist()
    for xi, u in zip(x.tolist(), got, strict=True):
        a = abs(xi)
        assert u == _next_up_float32(a) - a


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_ulp_matches_nextafter(dtype):
    x = torch.tensor([1.0, 3.0, 1e-3, 7e-5, 2.0**-20, 0.0, 1000.0], dtype=torch.float64).to(dtype)
    for xi, u in zip(x.tolist(), ulp(x).tolist(), strict=True):
        a = abs(xi)
        # brute force: grow a step until |x| + step rounds to a new value: the next float up
        step = dtype_facts(dtype).smallest_subnormal
        while (nxt := torch.tensor(a + step, dtype=torch.float64).to(dtype).double().item()) == a:
            step *= 2
        assert u == nxt - a, (xi, u, nxt)


def test_is_stale_update_brute_force_bfloat16():
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(500, generator=gen) * 0.1).bfloat16()
    u = torch.randn(500, generator=gen) * 10.0 ** torch.randint(-7, 0, (500,), generator=gen).float()
    u[:10] = 0.0
    stale = is_stale_update(w, u)
    # brute force in float64 then cast (what the optimizer does: w + u rounded to bfloat16)
    ref = [
        torch.tensor(wi + ui, dtype=torch.float64).to(torch.bfloat16).item() == wi and ui != 0
        for wi, ui in zip(w.double().tolist(), u.double().tolist(), strict=True)
    ]
    assert stale.tolist() == ref
    assert 0 < sum(ref) < 490
    # half-ulp is sufficient for staleness
    assert bool((stale | ~below_half_ulp(w, u) | (u == 0)).all())


def test_same_bits_distinguishes_signed_zero():
    a = torch.tensor([0.0, 1.0, float("nan")])
    b = torch.tensor([-0.0, 1.0, float("nan")])
    assert same_bits(a, b).tolist() == [False, True, True]
    with pytest.raises(TypeError):
        same_bits(a, b.double())


def test_stale_counts_and_fraction():
    before = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    after = torch.tensor([1.0, 2.5, 3.0, 4.0], dtype=torch.bfloat16)
    grad = torch.tensor([1e-4, 1.0, 0.0, 1e-5], dtype=torch.bfloat16)
    assert stale_counts(before, after, grad).tolist() == [2.0, 3.0]
    assert stale_fraction(before, after, grad) == pytest.approx(2 / 3)
    assert math.isnan(stale_fraction(before, after, torch.zeros_like(grad)))
