"""Finding: a condition the numerics judged, ready for a monitor to raise as an alert.

Every rule in ``numerics/`` returns its verdicts as findings: the gradient rules
(:mod:`~healthmon.numerics.zero_gradients`, :mod:`~healthmon.numerics.underflow`,
:mod:`~healthmon.numerics.dead_units`, :mod:`~healthmon.numerics.depth_decay`,
:mod:`~healthmon.numerics.stale_updates`), the trend rules
(:mod:`~healthmon.numerics.gradient_trends`), the first-step rule
(:mod:`~healthmon.numerics.first_step`), the curvature verdicts
(:mod:`~healthmon.numerics.curvature_findings`) and the logits interceptor
(:mod:`healthmon.numerics.logits`). The monitor that measured the numbers turns each into an
alert (:meth:`~healthmon.monitors.base.Monitor.raise_finding`) at the step they were measured.
This module is pure Python: no Lightning, no logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    """One judged condition.

    Attributes:
        code: the alert code (``grad.zero``, ``grad.underflow``, ...).
        message: what was measured, in one or two sentences.
        where: the parameter, layer, module or ``file.py:LINE`` it is about.
        value: the measured number that decided (a fraction, orders of magnitude).
        hint: the fix for this very case; None takes the alert registry's hint for ``code``.
        count: how many occurrences the finding stands for (calls at one line in one step).
    """

    code: str
    message: str
    where: str | None = None
    value: float | None = None
    hint: str | None = None
    count: int = 1


def listed(names: Sequence[str], limit: int) -> str:
    """The first ``limit`` names, and how many more there are (alert messages stay one line).

    >>> listed(["a", "b", "c"], 2), listed(["a"], 2)
    ('a, b and 1 more', 'a')
    """
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
