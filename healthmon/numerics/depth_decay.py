"""Vanishing gradients along depth: the gradient's size decaying from the last layer to the first.

Measured on a monitored optimizer step, in ``on_before_optimizer_step`` (after accumulation and AMP
unscaling, before clipping), from the per-tensor gradient norms the driver already fetched: the
root-mean-square gradient entry of each layer (:func:`layer_rms`), ordered input -> output. A
decay of several orders of magnitude (deep sigmoid/tanh stacks) is ``grad.vanishing`` while the
loss is still above half its start (:class:`LossLevel`): a run whose loss fell that far learned
through its first layers.

This module is pure Python: no Lightning, no logging.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from healthmon.numerics.findings import Finding
from healthmon.numerics.trends import EMA

#: Losses averaged into the start level the depth profile is judged against.
LOSS_START_STEPS = 10


def layer_rms(
    per_tensor_norms: Sequence[float], numel: Sequence[int], layer_index: Sequence[int], n: int
) -> list[float]:
    """Root-mean-square gradient entry per layer from per-tensor L2 norms (size-independent).

    RMS rather than the norm, so that a wide layer is not "larger" than a narrow one just by size.
    Sums are taken in float64, in tensor order. Layers with no tensor get NaN.
    """
    sq = [0.0] * n
    cnt = [0.0] * n
    for norm, size, layer in zip(per_tensor_norms, numel, layer_index, strict=True):
        sq[layer] += float(norm) * float(norm)
        cnt[layer] += float(size)
    return [math.sqrt(s / c) if c > 0 else math.nan for s, c in zip(sq, cnt, strict=True)]


def depth_decay_orders(rms_by_depth: Sequence[float]) -> float | None:
    """Orders of magnitude the gradient loses from the last layer back to the first: log10(last/first).

    ``rms_by_depth`` is ordered input -> output; layers without a gradient (NaN) are skipped.
    Returns None with fewer than two layers, or when the last layer's gradient is zero (nothing
    to compare against); ``inf`` when the first layer's gradient is exactly zero.
    """
    values = [v for v in rms_by_depth if not math.isnan(v)]
    if len(values) < 2 or values[-1] <= 0 or math.isinf(values[-1]):
        return None
    first, last = values[0], values[-1]
    if first <= 0:
        return math.inf
    return math.log10(last / first)


def depth_profile_judged(loss_level: float, start_loss: float | None, fraction: float = 0.5) -> bool:
    """Whether a decay along depth still says something: the loss is above ``fraction`` of its start.

    A stack whose first layers get no gradient cannot learn: its loss stays near where it started,
    and the profile is judged from the first checked step on (step 0 with the default cadence).
    Once the loss has fallen below ``fraction`` of its start, the run has learned through those
    layers; a profile that decays then (a post-LN BERT at 4% of its initial loss: the classifier's
    gradient rms 0.03, the embeddings' LayerNorm 1e-5, under AdamW, whose update does not scale
    with the gradient) is the head's leftover error, not a vanishing gradient. ``start_loss`` is
    None (not known yet) or not positive: judged.
    """
    if start_loss is None or start_loss <= 0.0 or not math.isfinite(loss_level):
        return True
    return loss_level > fraction * start_loss


class LossLevel:
    """The loss's start (mean of its first :data:`LOSS_START_STEPS` values) and smoothed level.

    Fed with the loss of every optimizer step (finite values only).
    """

    def __init__(self) -> None:
        self.start: float | None = None
        self.count = 0
        self.level = EMA(0.1)

    def update(self, loss: float | None) -> None:
        """Add one optimizer step's loss (None and non-finite values are ignored)."""
        if loss is None or not math.isfinite(loss):
            return
        self.level.update(loss)
        if self.count < LOSS_START_STEPS:
            self.count += 1
            start = self.start or 0.0
            self.start = start + (loss - start) / self.count

    def judged(self) -> bool:
        """Whether a depth profile measured now is judged (see :func:`depth_profile_judged`)."""
        return depth_profile_judged(self.level.value or math.nan, self.start)


@dataclass(frozen=True)
class DepthProfile:
    """The layers that have a gradient, input -> output, with their rms and the decay along them."""

    layers: list[str]
    rms: list[float]
    decay: float | None

    @classmethod
    def of(cls, rms_by_layer: Sequence[float], names: Sequence[str]) -> DepthProfile:
        """From the rms of every layer (NaN: no gradient) and the layers' names."""
        present = [i for i, v in enumerate(rms_by_layer) if not math.isnan(v)]
        rms = [rms_by_layer[i] for i in present]
        return cls([names[i] for i in present], rms, depth_decay_orders(rms))

    @classmethod
    def measure(
        cls,
        per_tensor_norms: Sequence[float],
        numel: Sequence[int],
        layer_index: Sequence[int],
        names: Sequence[str],
    ) -> DepthProfile:
        """From per-tensor gradient norms, sizes and layers (see :func:`layer_rms`)."""
        return cls.of(layer_rms(per_tensor_norms, numel, layer_index, len(names)), names)


def vanishing_finding(profile: DepthProfile, orders: float, min_depth: int) -> Finding | None:
    """``grad.vanishing`` when the profile spans ``min_depth`` layers and decays ``orders`` or more.

    The caller judges only while the loss is not ~0 and :meth:`LossLevel.judged` holds.
    """
    decay = profile.decay
    if decay is None or len(profile.layers) < min_depth or not decay >= orders:
        return None
    first, last = profile.layers[0], profile.layers[-1]
    return Finding(
        "grad.vanishing",
        f"The gradient decays {decay:.1f} orders of magnitude from the last layer ({last}, "
        f"rms {profile.rms[-1]:.2g}) back to the first ({first}, "
        f"rms {profile.rms[0]:.2g}) over {len(profile.layers)} layers.",
        where=first,
        value=decay,
    )
