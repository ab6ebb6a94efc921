"""Schedules: when a monitor runs, as a function ``step -> bool`` of the optimizer step.

* :data:`Cadence` - what every monitor's ``every_n_steps`` accepts: an int period or a callable.
* :class:`LogThenEvery` - log-spaced steps early in the run, then a fixed period.
* :class:`BudgetClock` - the next step at which an expensive estimate fits a share of training time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

Cadence = int | Callable[[int], bool]


def _positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}`: expected an integer >= {minimum}, got {value!r}.")
    return value


def cadence(value: Any, name: str = "every_n_steps") -> Callable[[int], bool]:
    """A schedule ``step -> bool`` from an int period or a callable (Cockpit-style schedules).

    >>> every_3 = cadence(3)
    >>> [s for s in range(10) if every_3(s)]
    [0, 3, 6, 9]
    """
    if callable(value):
        return value
    every = _positive_int(value, name)
    return lambda step: step % every == 0


def check_cadence(value: Any, name: str = "every_n_steps") -> Cadence:
    """Validate a cadence argument and return it unchanged."""
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}`: expected an integer >= 1 or a callable step -> bool, got {value!r}.")
    return value


class LogThenEvery:
    """Schedule: steps 0, 1, base, base^2, ... below ``every``, then every multiple of ``every``.

    Early estimates catch a run that is unstable from its first steps; later ones are sparse and
    warm-started (the top eigenvector moves slowly), which keeps the amortised cost low.
    """

    def __init__(self, every: int, base: int = 4) -> None:
        self.every = _positive_int(every, "every")
        self.base = _positive_int(base, "base", minimum=2)
        self.__name__ = f"log_then_every({every}, base={base})"

    def __call__(self, step: int) -> bool:
        """Whether ``step`` is on the schedule."""
        if step % self.every == 0:
            return True
        if step >= self.every:
            return False
        power = 1
        while power < step:
            power *= self.base
        return power == step

    def __repr__(self) -> str:
        return self.__name__


def log_then_every(every: int = 2000, *, base: int = 4) -> Callable[[int], bool]:
    """The default cadence of :class:`HessianEigenMonitor`: log-spaced early, then every ``every``.

    ``log_then_every(2000)`` runs at steps 0, 1, 4, 16, 64, 256, 1024, 2000, 4000, ...

    >>> due = log_then_every(2000)
    >>> [s for s in range(4001) if due(s)]
    [0, 1, 4, 16, 64, 256, 1024, 2000, 4000]
    """
    return LogThenEvery(every, base)


class BudgetClock:
    """When the next Hessian estimate is due so that estimates take ``budget`` of training time.

    Training time is measured between batch starts, minus the estimates' own time. The decision
    is made in steps, at known points (after ``calibration`` timed steps, and right after each
    estimate): ``next = step + ceil(cost / (budget * seconds_per_step))``. The first estimate
    comes right after calibration when the whole run can afford it (``budget * total_steps``
    covers a cold estimate), else once the elapsed time does. ``agree`` maps a
    proposed interval to the one every DDP rank uses (the largest), so all ranks estimate at the
    same step.
    """

    COLD_COST_STEPS = 150  # a first (cold) estimate costs about this many training steps

    def __init__(
        self,
        budget: float,
        *,
        calibration: int = 10,
        agree: Callable[[int], int] = lambda steps: steps,
        now: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.budget = budget
        self.calibration = calibration
        self.agree = agree
        self.now = now
        self.next_step: int | None = None
        self.total_steps = math.inf  # the run's planned optimizer steps (Lightning's estimate)
        self.train_seconds = 0.0
        self.timed_steps = 0
        self._last: float | None = None
        self._estimating = 0.0
        self.last_cost: float | None = None  # seconds of the latest estimate (early ones too)

    def due(self, step: int) -> bool:
        """Call once per optimizer step, at its start; True when an estimate is due."""
        now = self.now()
        if self._last is not None:
            self.train_seconds += max(now - self._last - self._estimating, 0.0)
            self.timed_steps += 1
        self._last, self._estimating = now, 0.0
        if self.next_step is None and self.timed_steps >= self.calibration:
            if self.last_cost is not None:  # an estimate ran before calibration ended
                self.next_step = step + self._interval(self.last_cost)
            elif self.budget * self.total_steps >= self.COLD_COST_STEPS:
                self.next_step = step  # a long run affords its first estimate right away
            else:
                self.next_step = step + self._interval(self.COLD_COST_STEPS * self.seconds_per_step)
        return self.next_step is not None and step >= self.next_step

    def spent(self, step: int, seconds: float) -> None:
        """An estimate at ``step`` took ``seconds``: schedule the next one."""
        self._estimating += seconds
        self.last_cost = seconds
        if self.timed_steps >= self.calibration:  # else: planned once the step time is known
            self.next_step = step + self._interval(seconds)

    @property
    def seconds_per_step(self) -> float:
        """Mean training seconds per timed step (the estimates' own time excluded)."""
        return self.train_seconds / max(self.timed_steps, 1)

    def _interval(self, cost: float) -> int:
        return self.agree(max(1, math.ceil(cost / (self.budget * max(self.seconds_per_step, 1e-9)))))

    def state(self) -> dict[str, Any]:
        """The clock's state, for a checkpoint."""
        return {
            "next_step": self.next_step,
            "train_seconds": self.train_seconds,
            "timed_steps": self.timed_steps,
            "last_cost": self.last_cost,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state`."""
        self.next_step = state.get("next_step")
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.timed_steps = int(state.get("timed_steps", 0))
        self.last_cost = state.get("last_cost")


class LogSpacedSteps:
    """Steps 0, base, base^2, ... below ``until`` (0, 4, 16, 64, 256): the early estimates of a run.

    A learning rate far above the stability limit shows at step 0; progressive sharpening in the
    first hundreds of steps shows on a log scale. Later steps are left to another schedule.

    >>> due = LogSpacedSteps(base=4, until=100)
    >>> [s for s in range(200) if due(s)], due
    ([0, 4, 16, 64], log_spaced(base=4, until=100))
    """

    def __init__(self, base: int = 4, until: int = 1000) -> None:
        self.base = _positive_int(base, "base", minimum=2)
        self.until = _positive_int(until, "until", minimum=0)

    def __call__(self, step: int) -> bool:
        """Whether ``step`` is one of the log-spaced steps below ``until``."""
        if step >= self.until:
            return False
        if step == 0:
            return True
        power = self.base
        while power < step:
            power *= self.base
        return power == step

    def __repr__(self) -> str:
        return f"log_spaced(base={self.base}, until={self.until})"


class LogCadence:
    """When to write scalars: every ``every`` steps, and whenever that many have passed unlogged.

    Checks that run on their own cadence (or an optimizer that steps on odd global steps) would
    otherwise never land on a multiple of ``every``; the first step asked always logs.

    >>> log = LogCadence()
    >>> [step for step in (0, 3, 7, 10, 13, 25) if log.due(step, every=10)]
    [0, 10, 25]
    """

    def __init__(self) -> None:
        self.last: int | None = None

    def due(self, step: int, every: int) -> bool:
        """Whether ``step`` writes scalars (and remember it when it does)."""
        if self.last is None or step % every == 0 or step - self.last >= every:
            self.last = step
            return True
        return False
