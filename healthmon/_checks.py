"""Argument validation with errors that name the argument, the value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

Cadence = int | Callable[[int], bool]


def positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}`: expected an integer >= {minimum}, got {value!r}.")
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


def choice(value: Any, name: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"`{name}`: expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}.")
    return str(value)


def cadence(value: Any, name: str = "every_n_steps") -> Callable[[int], bool]:
    """A schedule ``step -> bool`` from an int period or a callable (Cockpit-style schedules)."""
    if callable(value):
        return value
    every = positive_int(value, name)
    return lambda step: step % every == 0


def check_cadence(value: Any, name: str = "every_n_steps") -> Cadence:
    """Validate a cadence argument and return it unchanged."""
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}`: expected an integer >= 1 or a callable step -> bool, got {value!r}.")
    return value
