"""Argument validation with errors that name the argument, the value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from healthmon.schedules import Cadence, cadence, check_cadence

__all__ = [
    "Cadence",
    "boolean",
    "cadence",
    "check_cadence",
    "choice",
    "fraction",
    "non_negative_int",
    "open_fraction",
    "optional_positive_int",
    "positive_float",
    "positive_int",
]


def _integer_at_least(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}`: expected an integer >= {minimum}, got {value!r}.")
    return value


def positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """``value`` when it is an integer >= ``minimum`` (itself >= 1), else ValueError naming ``name``.

    >>> positive_int(3, "top_k")
    3
    >>> positive_int(2, "window", minimum=3)
    Traceback (most recent call last):
    ...
    ValueError: `window`: expected an integer >= 3, got 2.
    """
    if minimum < 1:
        raise ValueError(
            f"`minimum`: expected an integer >= 1 (use non_negative_int for 0), got {minimum!r}."
        )
    return _integer_at_least(value, name, minimum)


def non_negative_int(value: Any, name: str) -> int:
    """``value`` when it is an integer >= 0 (a count that may be zero, a seed), else ValueError.

    >>> non_negative_int(0, "seed")
    0
    >>> non_negative_int(True, "seed")
    Traceback (most recent call last):
    ...
    ValueError: `seed`: expected an integer >= 0, got True.
    """
    return _integer_at_least(value, name, 0)


def boolean(value: Any, name: str) -> bool:
    """``value`` when it is True or False (not 0/1, not None), else TypeError naming ``name``.

    >>> boolean(False, "report")
    False
    >>> boolean(1, "report")
    Traceback (most recent call last):
    ...
    TypeError: `report`: expected True or False, got 1.
    """
    if not isinstance(value, bool):
        raise TypeError(f"`{name}`: expected True or False, got {value!r}.")
    return value


def positive_float(value: Any, name: str, *, above: float = 0.0, inclusive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= above if inclusive else value > above)
    if not ok:
        op = ">=" if inclusive else ">"
        raise ValueError(f"`{name}`: expected a finite number {op} {above}, got {value!r}.")
    return float(value)


def fraction(value: Any, name: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0
    if not ok:
        raise ValueError(f"`{name}`: expected a number in (0, 1], got {value!r}.")
    return float(value)


def optional_fraction(value: Any, name: str) -> float | None:
    """None, or a number in (0, 1]."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0
    if not ok:
        raise ValueError(f"`{name}`: expected None or a number in (0, 1], got {value!r}.")
    return float(value)


def choice(value: Any, name: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"`{name}`: expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}.")
    return str(value)


def open_fraction(value: Any, name: str) -> float:
    """A finite number strictly between 0 and 1 (a relative tolerance)."""
    checked = positive_float(value, name)
    if checked >= 1:
        raise ValueError(f"`{name}`: expected a number in (0, 1), got {value!r}.")
    return checked


def optional_positive_int(value: Any, name: str) -> int | None:
    """None, or an integer >= 1 (see :func:`positive_int`)."""
    return None if value is None else positive_int(value, name)
