"""StaleWatch: the monitor side of ``update.stale`` (sample, defer, judge at the next monitored step).

:class:`~healthmon.numerics.stale_updates.StaleSampler` reads the sampled weights right before
``optimizer.step`` (in ``on_before_optimizer_step`` of a monitored step) and right after it (the
optimizer's step post-hook). The ``[stale, eligible]`` counts are handed to ``Driver.defer`` there
and fetched with the driver's next host synchronisation; they are judged at the next monitored step
(with its logging decision), or at the end of training. The decision itself is
:func:`~healthmon.numerics.stale_updates.stale_summary`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from healthmon import tags
from healthmon.engine.driver import Driver
from healthmon.numerics.findings import Finding
from healthmon.numerics.stale_updates import StaleSample, StaleSampler, stale_summary

TAG_STALE_DTYPE = tags.STALE_FRACTION_DTYPE.prefix
TAG_STALE_LAYER = tags.STALE_FRACTION_LAYER.prefix

Fetched = tuple[StaleSample, Tensor]


class StaleWatch:
    """Sampled optimizer steps in flight, and the last one fetched.

    Args:
        samples: elements sampled per parameter tensor.
        seed: seed of the sampler's private generator.
        min_samples: eligible samples a layer needs to be judged.
        fraction: the stale share that raises ``update.stale``.
    """

    def __init__(self, samples: int, seed: int, *, min_samples: int, fraction: float) -> None:
        self.sampler = StaleSampler(samples, seed)
        self.min_samples = min_samples
        self.fraction = fraction
        self.fetched: Fetched | None = None  # judged at the next monitored step
        self.in_flight = False  # a sampled step's counts wait for the driver's next sync
        self.ended = False  # training ended: judge the last counts as soon as they arrive
        self._end: Any = None  # what to call with them then

    def start(self) -> None:
        """A new fit: training has not ended."""
        self.ended, self._end = False, None

    def after_step(self, driver: Driver | None) -> None:
        """Optimizer step post-hook: hand the sampled step's counts to the driver's next sync."""
        if driver is None or driver.params is None:
            return
        sample = self.sampler.after(driver.params.layer_of)
        if sample is not None and sample.counts is not None:
            self.in_flight = True
            driver.defer(sample.counts, lambda v: self._arrived(sample, v))

    def _arrived(self, sample: StaleSample, values: list[float]) -> None:
        self.in_flight = False
        self.fetched = (sample, torch.tensor(values, dtype=torch.float64))
        if self.ended and self._end is not None:
            self._end()

    def take(self) -> Fetched | None:
        """The fetched counts not judged yet (forgotten here)."""
        fetched, self.fetched = self.fetched, None
        return fetched

    def end(self, judge_last: Any) -> None:
        """End of training: ``judge_last()`` now, or once the counts still in flight arrive."""
        self.ended, self._end = True, judge_last
        if not self.in_flight:
            judge_last()

    def judge(self, fetched: Fetched, layers: list[str]) -> tuple[dict[str, float], Finding | None]:
        """The scalars (stale shares per dtype and per layer) and the finding of a fetched step."""
        summary = stale_summary(*fetched, layers, min_samples=self.min_samples, fraction=self.fraction)
        values = {TAG_STALE_DTYPE + name: v for name, v in summary.by_dtype.items()}
        values.update({TAG_STALE_LAYER + name: v for name, v in summary.by_layer.items()})
        return values, summary.finding
