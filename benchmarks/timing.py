"""Clocks and paired ratios shared by the overhead benchmarks (scripts, never timed tests).

Every benchmark runs the same training with and without healthmon, interleaved in one process,
and reports paired ratios: per repeat, the healthmon run against the plain run next to it; the
median over repeats cancels slow drift of the machine.
"""

from __future__ import annotations

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
