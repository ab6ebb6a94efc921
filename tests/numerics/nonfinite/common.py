"""Helpers shared by the NaN/Inf origin tests: source-line markers and leaf tensors."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def marker_line(path: str) -> Callable[[str], str]:
    """``line(marker)``: the ``file:LINE`` of the line of ``path`` that ends with ``# <- marker``."""
    here = os.path.relpath(path)

    def line(marker: str) -> str:
        with open(path) as f:
            for i, text in enumerate(f, 1):
                if text.rstrip().endswith(f"# <- {marker}"):
                    return f"{here}:{i}"
        raise AssertionError(marker)

    return line


def leaf(*values: float) -> torch.Tensor:
    return torch.tensor(values, requires_grad=True)
