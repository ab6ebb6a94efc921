"""What a tensor holds that is not finite, and how numbers are written in the explanations.

:func:`nonfinite_kinds` tells NaN, +inf and -inf apart (an operation is an origin when its output
holds a kind that none of its inputs held) with one host synchronisation for a list of tensors;
the other helpers read the values an explanation quotes (counts, the largest finite input).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

NAN, POSINF, NEGINF = "NaN", "+inf", "-inf"


def is_floating(x: Any) -> bool:
    """Whether ``x`` is a tensor that can hold NaN/Inf (floating or complex)."""
    return isinstance(x, Tensor) and (x.is_floating_point() or x.is_complex())


def tensors_in(value: Any, depth: int = 0) -> Iterator[Tensor]:
    """The tensors in a call's arguments or results (nested lists, tuples and dicts)."""
    if isinstance(value, Tensor):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v, depth + 1)


def numbers_in(value: Any, depth: int = 0) -> Iterator[float]:
    """The Python floats among a call's arguments (where an infinite constant hides)."""
    if isinstance(value, float):
        yield value
    elif depth < 2 and isinstance(value, (list, tuple)) and len(value) <= 64:
        for v in value:
            yield from numbers_in(v, depth + 1)


def real_view(t: Tensor) -> Tensor:
    """A complex tensor as its real and imaginary parts; a real tensor unchanged."""
    return torch.view_as_real(t) if t.is_complex() else t


@torch.no_grad()
def _flag_tensor(t: Tensor) -> Tensor:
    """[has NaN, has +inf, has -inf] as a device tensor (no synchronisation)."""
    r = real_view(t.detach())
    if r.numel() == 0:
        return torch.zeros(3, dtype=torch.bool, device=r.device)
    return torch.stack([r.isnan().any(), r.isposinf().any(), r.isneginf().any()])


@torch.no_grad()
def _extremes(t: Tensor) -> Tensor:
    """(min, max) in float64 (NaN when the tensor holds one): one fused pass, no synchronisation."""
    r = real_view(t.detach())
    if r.numel() == 0:
        return torch.zeros(2, dtype=torch.float64, device=r.device)
    lo, hi = torch.aminmax(r.reshape(-1))
    return torch.stack([lo, hi]).double()


def nonfinite_kinds(tensors: list[Tensor]) -> list[frozenset[str]]:
    """The kinds of non-finite values (NaN, +inf, -inf) each tensor holds.

    One fused min/max pass per tensor and one host synchronisation; the tensors holding NaN (whose
    min/max hide any infinities) get an exact second look.
    """
    if not tensors:
        return []
    ext = torch.stack([_extremes(t).cpu() for t in tensors]).tolist()
    kinds: list[frozenset[str]] = []
    nan_rows = []
    for i, (lo, hi) in enumerate(ext):
        if math.isnan(lo) or math.isnan(hi):
            nan_rows.append(i)
            kinds.append(frozenset({NAN}))
        else:
            kinds.append(frozenset(k for k, f in ((POSINF, hi == math.inf), (NEGINF, lo == -math.inf)) if f))
    if nan_rows:
        flags = torch.stack([_flag_tensor(tensors[i]).cpu() for i in nan_rows]).tolist()
        for i, row in zip(nan_rows, flags, strict=True):
            kinds[i] = frozenset(k for k, f in zip((NAN, POSINF, NEGINF), row, strict=True) if f)
    return kinds


def kinds_text(kinds: frozenset[str]) -> str:
    """``NaN/+inf/-inf`` in a fixed order ("NaN/Inf" when empty)."""
    return "/".join(k for k in (NAN, POSINF, NEGINF) if k in kinds) or "NaN/Inf"


def number_kind(x: float) -> str | None:
    """The kind of a non-finite Python number, or None when it is finite."""
    if math.isnan(x):
        return NAN
    if math.isinf(x):
        return POSINF if x > 0 else NEGINF
    return None


def number_text(x: float) -> str:
    """A value quoted in an explanation: four significant digits."""
    return f"{x:.4g}"


def finfo_of(t: Tensor) -> torch.finfo:
    """The limits of ``t``'s dtype (float32 for a non-floating tensor)."""
    dtype = t.dtype if t.is_floating_point() else torch.float32
    return torch.finfo(dtype)


@torch.no_grad()
def count_true(mask: Tensor) -> int:
    """How many entries of a boolean mask are set (one host synchronisation)."""
    return int(mask.sum())


def largest_finite(inputs: list[Tensor]) -> float | None:
    """The largest finite magnitude among ``inputs`` (None when they hold no finite value)."""
    vals = []
    with torch.no_grad():
        for t in inputs:
            r = real_view(t.detach()).float()
            r = r[torch.isfinite(r)]
            if r.numel():
                vals.append(float(r.abs().max()))
    return max(vals) if vals else None
