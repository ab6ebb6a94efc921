"""Clocks and paired ratios shared by the overhead benchmarks (scripts, never timed tests).

Every benchmark runs the same training with and without healthmon, interleaved in one process,
and reports paired ratios: per repeat, the healthmon run against the plain run next to it; the
median over repeats cancels slow drift of the machine.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

#: ``--clock wall`` (perf_counter) or ``--clock cpu`` (the thread's CPU time: robust to other
#: processes sharing the machine).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}

#: One repeat: (median, mean) step time of the plain run, then of the watched run.
Pair = tuple[tuple[float, float], tuple[float, float]]


def clock_cost(clock: Callable[[], float], n: int = 20000) -> float:
    """Seconds one reading of ``clock`` takes (subtracted from each timed call)."""
    start = clock()
    for _ in range(n):
        clock()
    return (clock() - start) / n


def paired_ratios(pairs: Sequence[Pair]) -> tuple[float, float, float, float]:
    """Plain median and mean step time, then the steady (median) and amortised (mean) ratios."""
    plain_median = statistics.median(p[0] for p, _ in pairs)
    plain_mean = statistics.median(p[1] for p, _ in pairs)
    steady = statistics.median(w[0] / p[0] for p, w in pairs)
    amortised = statistics.median(w[1] / p[1] for p, w in pairs)
    return plain_median, plain_mean, steady, amortised


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval of the median of ``values`` (None: too few values).

    The order statistics ``x_(k)`` and ``x_(n+1-k)`` bracket the true median with probability
    ``P(k <= B <= n - k)``, ``B ~ Binomial(n, 1/2)``, whatever the distribution of one repeat: the
    widest such k whose coverage is at least ``confidence`` (9 repeats: the 2nd and 8th values).
    On a shared machine one run of the small model differs from the next by a few percent, so
    a ratio's limit is met with confidence only where the interval's upper end is below it.

    >>> median_interval([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8])
    (1.1, 1.7)
    """
    xs = sorted(values)
    n = len(xs)
    found = None
    for k in range(1, n // 2 + 1):
        coverage = sum(math.comb(n, i) for i in range(k, n - k + 1)) / 2**n
        if coverage < confidence:
            break
        found = k
    return None if found is None else (xs[found - 1], xs[n - found])
