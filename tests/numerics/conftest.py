"""Fixtures shared by the numerics tests."""

from __future__ import annotations

import pytest
from numerics.hessian_cases import CASES, Case


@pytest.fixture(scope="module")
def hessian_cases() -> dict[str, Case]:
    """The small models with exact Hessians, built once per test module."""
    return {name: Case(name) for name in CASES}
