"""Finding: a condition the numerics judged, ready for a monitor to raise as an alert.

The gradient rules (:mod:`healthmon.numerics.zero_gradients`, :mod:`healthmon.numerics.underflow`,
:mod:`healthmon.numerics.dead_units`, :mod:`healthmon.numerics.depth_decay`,
:mod:`healthmon.numerics.stale_updates`) decide from host numbers and return findings; the monitor
that measured the numbers turns each into an alert (``Driver.alert``) at the step they were measured.
This module is pure Python: no Lightning, no logging.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    """One judged condition.

    Attributes:
        code: the alert code (``grad.zero``, ``grad.underflow``, ...).
        message: what was measured, in one or two sentences.
        where: the parameter, layer or module it is about.
        value: the measured number that decided (a fraction, orders of magnitude).
    """

    code: str
    message: str
    where: str | None = None
    value: float | None = None
