"""Gradients that are exactly zero: which tensors, for how long, and whether that is a cut path.

``grad.zero`` is raised for a parameter whose gradient is (almost) entirely zero while the loss is
not, on ``steps`` consecutive checked steps with an optimizer update between each two. The
numbers are measured in ``on_before_optimizer_step`` (after accumulation and AMP unscaling,
before clipping): per-tensor zero counts on the monitor's counting steps, per-tensor norms (a
norm of exactly 0 is a whole-zero tensor) on every other step. The rules here only decide:

* :class:`ZeroStreaks` counts the zero steps of each tensor; a zero seen again before any update
  is no new evidence (the gradient could not have changed), so structural zeros that the first
  updates end (LoRA's ``B = 0``, zero-initialised residual branches) never reach the limit.
* :class:`StationaryWatch` tells a stationary point of the whole model (every gradient collapsed
  below the run's peak) from a cut gradient path.
* :func:`zero_finding` words the alert; :class:`ZeroGradientRule` puts the three together for
  the counting steps (:meth:`~ZeroGradientRule.judge`) and the steps between
  (:meth:`~ZeroGradientRule.judge_norms`).

This module is pure torch: no Lightning, no logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence

from torch import Tensor

from healthmon.numerics.findings import Finding, listed

#: Orders of magnitude below the run's peak global gradient norm that make a stationary point.
STATIONARY_ORDERS = 3.0
#: Parameter names spelled out in a ``grad.zero`` message.
MAX_NAMES = 5


def at_stationary_point(norm: float, peak: float, orders: float = STATIONARY_ORDERS) -> bool:
    """Whether the whole model's gradient has collapsed: ``norm`` is ``orders`` decades below ``peak``.

    ``norm`` is the global gradient norm of this step, ``peak`` the largest the run has had. At a
    stationary point of the whole model (full-batch least squares at its float32 optimum: the
    bias gradient, the mean residual, is exactly 0 while the weights' is roundoff) an exactly zero
    tensor is the optimum, not a cut gradient path; whether that point is a good one is for the
    loss to say (``grad.vanishing``). A run that never had a gradient (``peak`` 0) is not at one.
    """
    if not (math.isfinite(norm) and math.isfinite(peak)) or peak <= 0.0:
        return False
    return norm <= peak * 10.0 ** (-orders)


class StationaryWatch:
    """The run's peak global gradient norm per optimizer, and whether a step is at a stationary point.

    Fed with the global norm of every optimizer step (measured before clipping).
    """

    def __init__(self) -> None:
        self.peaks: dict[int, float] = {}

    def update(self, optimizer_index: int, norm: float) -> bool:
        """Record this step's global norm; True when the step is at a stationary point."""
        peak = self.peaks.get(optimizer_index, 0.0)
        if math.isfinite(norm) and norm > peak:
            peak = self.peaks[optimizer_index] = norm
        return at_stationary_point(norm, peak)


class ZeroStreaks:
    """Per tensor, the streak of checked steps on which its gradient was zero.

    A streak counts consecutive checked steps, with an optimizer update between each two.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self._streaks: dict[Hashable, tuple[int, int]] = {}  # key -> (zero steps, updates seen)

    def end(self, keys: Iterable[Hashable]) -> None:
        """These tensors' gradients were not zero (or are not judged): their streaks restart."""
        for key in keys:
            self._streaks.pop(key, None)

    def observe(self, key: Hashable, updates: int) -> int:
        """Count one more zero step for ``key`` if ``updates`` (optimizer updates so far) moved on."""
        count, seen = self._streaks.get(key, (0, -1))
        if seen != updates:
            count += 1
        self._streaks[key] = (count, updates)
        return count

    def judge(self, keys: Sequence[Hashable], hits: Sequence[int], updates: int) -> list[int]:
        """Positions in ``hits`` whose zero streak reached :attr:`steps`.

        ``keys``: the tensors checked this step; ``hits``: the positions of those that are zero. Every
        other checked tensor's streak ends.
        """
        hit_keys = {keys[i] for i in hits}
        self.end(k for k in keys if k not in hit_keys)
        return [i for i in hits if self.observe(keys[i], updates) >= self.steps]


def zero_hits(
    zeros: Sequence[float], totals: Sequence[float], judged: Sequence[bool], fraction: float
) -> list[int]:
    """Positions of the judged tensors whose share of exactly-zero entries reaches ``fraction``.

    ``judged`` is False for tensors whose zeros are legitimate (embedding rows not in the batch,
    sparse gradients); an empty tensor is never a hit.
    """
    return [
        i
        for i, (z, t, ok) in enumerate(zip(zeros, totals, judged, strict=True))
        if ok and t > 0 and z / t >= fraction
    ]


def zero_finding(
    names: Sequence[str], first_value: float, fraction: float, steps: int, loss: float
) -> Finding:
    """``grad.zero`` for the tensors ``names`` (the first one's zero share is ``first_value``).

    Args:
        names: parameter names, in the optimizer's order.
        first_value: share of zero entries of ``names[0]``.
        fraction: the zero share that counts as zero (1.0: the whole gradient).
        steps: zero steps with updates between them that were required.
        loss: the loss of the step (NaN when unknown).
    """
    shown = listed(names, MAX_NAMES)
    what = "entirely zero" if fraction >= 1.0 else f"at least {fraction:.0%} zeros"
    loss_text = "unknown" if math.isnan(loss) else f"{loss:.3g}"
    return Finding(
        "grad.zero",
        f"The gradient of {len(names)} parameter tensor(s) is {what} while the loss is {loss_text}, "
        f"and stayed so over {steps} checked steps with optimizer updates between them: {shown}.",
        where=names[0],
        value=first_value,
    )


class ZeroGradientRule:
    """``grad.zero`` over a run: the stationary-point watch, the streaks and the decision together.

    Args:
        fraction: the share of exactly-zero entries that counts as a zero gradient.
        steps: zero steps, with optimizer updates between them, before a tensor is reported.
    """

    def __init__(self, fraction: float, steps: int) -> None:
        self.fraction = fraction
        self.streaks = ZeroStreaks(steps)
        self.stationary = StationaryWatch()

    def at_stationary_point(self, optimizer_index: int, norm: float, keys: Iterable[Hashable]) -> bool:
        """Record the step's global norm; at a stationary point the streaks of ``keys`` restart."""
        if not self.stationary.update(optimizer_index, norm):
            return False
        self.streaks.end(keys)
        return True

    def judge(
        self,
        params: Sequence[Tensor],
        zeros: Sequence[float],
        totals: Sequence[float],
        judged: Sequence[bool],
        *,
        updates: int,
        loss: float,
        name_of: Callable[[Tensor], str],
    ) -> Finding | None:
        """Judge the tensors ``params`` checked this step: ``grad.zero`` if some stayed zero long enough.

        ``zeros`` and ``totals`` are their zero and total entry counts; ``judged`` is False where zeros
        are legitimate.
        """
        hits = self.streaks.judge(
            [id(p) for p in params], zero_hits(zeros, totals, judged, self.fraction), updates
        )
        if not hits:
            return None
        names = [name_of(params[i]) for i in hits]
        return zero_finding(names, zeros[hits[0]] / totals[hits[0]], self.fraction, self.streaks.steps, loss)

    def judge_norms(
        self,
        params: Sequence[Tensor],
        norms: Sequence[float],
        eligible: Sequence[bool],
        *,
        updates: int,
        loss: float,
        name_of: Callable[[Tensor], str],
    ) -> Finding | None:
        """Between counting steps, from per-tensor norms: a norm of exactly 0 is a whole-zero tensor.

        With :attr:`fraction` 1.0 a nonzero norm ends a streak (partial zeros are counted on the
        counting steps only). ``eligible`` is False for tensors whose zeros are never judged.
        """
        hits = [
            p for p, n, ok in zip(params, norms, eligible, strict=True) if n == 0.0 and ok and p.numel() > 0
        ]
        if self.fraction >= 1.0:
            self.streaks.end(id(p) for p, n in zip(params, norms, strict=True) if n != 0.0)
        if not hits:
            return None
        sizes = [float(p.numel()) for p in hits]
        return self.judge(hits, sizes, sizes, [True] * len(hits), updates=updates, loss=loss, name_of=name_of)
