"""Floating-point facts per dtype and the stale-update test (an update that rounds away).

Goodfellow et al.'s chapter 4 warns that a step can be rounded to nothing: in float32,
``1 + 1e-8 == 1`` because ``1e-8`` is smaller than half the spacing (ulp) of floats near 1. The
same happens to a weight update ``w - lr * g`` whenever ``|lr * g| < ulp(w) / 2``, and much sooner
in bfloat16 (8 significand bits) than in float32 (24). This module holds the dtype facts needed
to see that, all verified by construction rather than trusted from ``torch.finfo``: for some
float8 types ``finfo.eps`` does not describe the significand (``float8_e5m2fnuz`` reports
``eps = 0.125`` for a 2-bit mantissa), so the smallest subnormal is found by halving.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class DtypeFacts:
    """Where a floating dtype stops being exact.

    Attributes:
        dtype: the dtype described.
        eps: spacing of the dtype's numbers just above 1 (``finfo.eps``).
        smallest_normal: smallest positive normal number (``finfo.smallest_normal``).
        smallest_subnormal: smallest positive number; equals ``smallest_normal`` when the dtype
            has no subnormals.
        largest_subnormal: largest number below ``smallest_normal`` (0 without subnormals).
        flush_threshold: magnitudes at or below this round to zero when a value is cast to the
            dtype (half the smallest subnormal: round-to-nearest-even sends the tie to 0).
    """

    dtype: torch.dtype
    eps: float
    smallest_normal: float
    smallest_subnormal: float
    largest_subnormal: float

    @property
    def has_subnormals(self) -> bool:
        """Whether the dtype has numbers below ``smallest_normal`` (subnormals)."""
        return self.smallest_subnormal < self.smallest_normal

    @property
    def flush_threshold(self) -> float:
        """Magnitudes at or below this round to zero when cast to the dtype."""
        return self.smallest_subnormal / 2


def _representable(value: float, dtype: torch.dtype) -> bool:
    """Whether ``value`` survives a round trip through ``dtype`` exactly (and is not 0)."""
    back = torch.tensor(value, dtype=torch.float64).to(dtype).to(torch.float64).item()
    return back == value and back != 0.0


@functools.cache
def dtype_facts(dtype: torch.dtype) -> DtypeFacts:
    """Facts of a floating dtype (float16, bfloat16, float32, float64, the float8 types).

    The smallest subnormal is found by construction: halve ``smallest_normal`` while the half
    survives a round trip through the dtype. Raises ``TypeError`` for non-floating dtypes.

    >>> f16 = dtype_facts(torch.float16)
    >>> f16.eps, f16.smallest_normal, f16.smallest_subnormal  # 2**-10, 2**-14, 2**-24
    (0.0009765625, 6.103515625e-05, 5.960464477539063e-08)
    >>> dtype_facts(torch.bfloat16).smallest_normal == torch.finfo(torch.float32).smallest_normal
    True
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"`dtype`: expected a floating torch.dtype, got {dtype!r}.")
    info = torch.finfo(dtype)
    normal = float(info.smallest_normal)
    sub = normal
    while sub / 2 > 0 and _representable(sub / 2, dtype):
        sub /= 2
    largest_sub = normal - sub if sub < normal else 0.0
    return DtypeFacts(
        dtype=dtype,
        eps=float(info.eps),
        smallest_normal=normal,
        smallest_subnormal=sub,
        largest_subnormal=largest_sub,
    )


def floating_dtypes() -> list[torch.dtype]:
    """The floating dtypes this torch build has and healthmon can count (float8 where present)."""
    names = ["float16", "bfloat16", "float32", "float64"]
    names += ["float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"]
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


def dtype_name(dtype: torch.dtype) -> str:
    """Short dtype name for tags and messages.

    >>> dtype_name(torch.bfloat16)
    'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def ulp(x: Tensor) -> Tensor:
    """Spacing from ``|x|`` to the next larger magnitude in ``x``'s dtype, as float64.

    For a normal ``|x|`` in ``[2**e, 2**(e+1))`` this is ``eps * 2**e``; for zero and subnormals
    it is the smallest subnormal. Just below a power of two the spacing downwards is half of
    this (which :func:`is_stale_update` handles exactly by rounding instead of comparing).

    >>> ulp(torch.tensor([1.0, 3.0, 0.0], dtype=torch.bfloat16)).tolist()  # eps 2**-7; 0: subnormal
    [0.0078125, 0.015625, 9.183549615799121e-41]
    """
    facts = dtype_facts(x.dtype)
    a = x.detach().to(torch.float64).abs()
    _, exponent = torch.frexp(a)  # a = m * 2**exponent, m in [0.5, 1)
    spacing = torch.ldexp(torch.full_like(a, facts.eps), exponent - 1)
    return torch.where(a < facts.smallest_normal, torch.full_like(a, facts.smallest_subnormal), spacing)


def is_stale_update(weight: Tensor, update: Tensor) -> Tensor:
    """Elementwise: ``weight + update`` rounds back to ``weight`` in the weight's dtype.

    The exact rounding test (the seed's ``(a + 1e-8) == a``), done by computing the sum in
    float64 and casting to the weight's dtype, so a sum that float64 itself cannot represent is
    not confused with one that rounds away. A zero update is not stale (nothing was asked).
    """
    w64 = weight.detach().to(torch.float64)
    total = (w64 + update.detach().to(torch.float64)).to(weight.dtype)
    return same_bits(total, weight) & (update != 0)


def below_half_ulp(weight: Tensor, update: Tensor) -> Tensor:
    """Elementwise ``|update| < ulp(weight) / 2``: the textbook sufficient condition for a lost step."""
    return update.detach().to(torch.float64).abs() < ulp(weight) / 2


def same_bits(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise bit identity (``-0.0`` differs from ``0.0``; a NaN equals the same NaN)."""
    if a.dtype != b.dtype:
        raise TypeError(f"`b`: expected dtype {a.dtype}, got {b.dtype}.")
    if a.dtype.is_floating_point:
        as_int = _INT_OF_SIZE[a.element_size()]
        return a.view(as_int) == b.view(as_int)
    return a == b


def stale_counts(before: Tensor, after: Tensor, grad: Tensor) -> Tensor:
    """``[stale, eligible]`` for sampled weight values around one optimizer step.

    An element is eligible when its gradient was nonzero (the optimizer was asked to move it)
    and stale when its weight is bit-identical after the step. Returned as a float32 device
    vector of length 2, so several tensors' counts can be stacked without a host sync.
    """
    moved_for = grad != 0
    stale = same_bits(before, after) & moved_for
    return torch.stack([stale.sum(), moved_for.sum()]).to(torch.float32)


def stale_fraction(before: Tensor, after: Tensor, grad: Tensor) -> float:
    """Host-side fraction of eligible elements whose step was lost (NaN when none is eligible)."""
    stale, eligible = stale_counts(before, after, grad).tolist()
    return stale / eligible if eligible else math.nan
