"""The overflow hint names float16's limit, taken from ``torch.finfo``; other dtypes get the generic fix."""

from __future__ import annotations

import torch

from healthmon.numerics.nonfinite.hints import overflow_hint


def test_float16_overflow_names_its_maximum_and_the_mixed_precision_remedies() -> None:
    hint = overflow_hint(torch.float16)
    assert f"{torch.finfo(torch.float16).max:.0f}" in hint
    assert "bf16-mixed" in hint
    assert "16-mixed" in hint


def test_other_dtypes_get_the_scale_or_wider_dtype_hint() -> None:
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        hint = overflow_hint(dtype)
        assert "wider dtype" in hint
        assert "65504" not in hint
