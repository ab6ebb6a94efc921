"""healthmon._checks: switches, open fractions and optional counts name the argument and the value."""

from __future__ import annotations

import pytest

from healthmon import _checks


def test_boolean_accepts_only_booleans() -> None:
    assert _checks.boolean(True, "x") is True and _checks.boolean(False, "x") is False
    for bad in (0, 1, None, "yes"):
        with pytest.raises(TypeError, match=rf"`warm_start`: expected True or False, got {bad!r}\."):
            _checks.boolean(bad, "warm_start")


def test_open_fraction_excludes_both_ends() -> None:
    assert _checks.open_fraction(0.5, "tol") == 0.5 and isinstance(_checks.open_fraction(1e-3, "tol"), float)
    for bad in (1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"`tol`: expected a number in \(0, 1\), got "):
            _checks.open_fraction(bad, "tol")
    for bad in (0, -0.1, float("nan"), True, "0.1"):  # the positive_float message first
        with pytest.raises(ValueError, match=r"`tol`: expected a finite number > 0.0, got "):
            _checks.open_fraction(bad, "tol")


def test_optional_positive_int() -> None:
    assert _checks.optional_positive_int(None, "n") is None
    assert _checks.optional_positive_int(3, "n") == 3
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"`probe_chunk_size`: expected an integer >= 1, got "):
            _checks.optional_positive_int(bad, "probe_chunk_size")
