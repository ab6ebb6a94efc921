"""CountedStep: what a monitored step of ``GradientUnderflowMonitor`` measured, until its counts arrive.

On a monitored step (``on_before_optimizer_step``: after gradient accumulation and AMP unscaling,
before clipping) the monitor counts zeros and subnormals of every gradient on the device and hands
the counts to ``Driver.defer``. Everything known on the host at that moment -- the step, which tensors
are judged, their layers and dtypes, the depth profile from the driver's per-tensor norms, the loss
-- is kept in a :class:`CountedStep`, which also names the scalars written once the counts arrive
with the driver's next host synchronisation, and turns them into scalars and findings
(:meth:`CountedStep.judge`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from healthmon import tags
from healthmon.engine.step_stats import GradStep, ParamIndex
from healthmon.monitors.stale_watch import Fetched
from healthmon.numerics.dead_units import dead_unit_findings
from healthmon.numerics.depth_decay import DepthProfile, vanishing_finding
from healthmon.numerics.findings import Finding
from healthmon.numerics.precision import dtype_name
from healthmon.numerics.underflow import Shares, from_float32_exact, group_shares, underflow_finding
from healthmon.numerics.zero_gradients import ZeroGradientRule

TAG_ZERO_DTYPE = tags.ZERO_FRACTION_DTYPE.prefix
TAG_ZERO_LAYER = tags.ZERO_FRACTION_LAYER.prefix
TAG_SUB_DTYPE = tags.SUBNORMAL_FRACTION_DTYPE.prefix
TAG_SUB_LAYER = tags.SUBNORMAL_FRACTION_LAYER.prefix
TAG_FLUSH_DTYPE = tags.FLUSHED_FRACTION_DTYPE.prefix
TAG_FLUSH_LAYER = tags.FLUSHED_FRACTION_LAYER.prefix
TAG_DEAD = tags.DEAD_UNITS.prefix
TAG_DEPTH = tags.GRAD_DEPTH_DECAY
TAG_RMS = tags.GRAD_RMS.prefix


@dataclass(frozen=True)
class Limits:
    """The monitor's thresholds for a counted step (see ``GradientUnderflowMonitor``)."""

    underflow_fraction: float
    dead_fraction: float
    depth_orders: float
    min_depth: int


@dataclass
class CountedStep:
    """The host side of a monitored step.

    Attributes:
        step: the optimizer step measured (alerts and scalars carry it).
        log: whether scalars are written for it.
        params: the parameters counted (floating-point gradients), in the optimizer's order.
        judged: per parameter, whether its zeros are judged (not an embedding's structural zeros,
            not a sparse gradient).
        layer_index: per parameter, its layer in the driver's ``ParamIndex``.
        dtypes: per parameter, its gradient's dtype name.
        profile: the gradient rms along depth.
        loss: the step's loss (NaN when unknown).
        judge_zero: the loss is not ~0 and the model is not at a stationary point.
        judge_depth: the loss is not ~0 and still above half its start.
        updates: optimizer updates taken before this step.
        dead_names: watched ReLU-family modules whose dead share was measured.
        stale: the previous sampled step's fetched stale counts, judged with this step.
    """

    step: int
    log: bool
    params: list[Tensor]
    judged: list[bool]
    layer_index: list[int]
    dtypes: list[str]
    profile: DepthProfile
    loss: float
    judge_zero: bool = False
    judge_depth: bool = False
    updates: int = 0
    dead_names: list[str] = field(default_factory=list)
    stale: Fetched | None = None

    @classmethod
    def measure(
        cls,
        step: int,
        log: bool,
        params: list[Tensor],
        structural: Sequence[bool],
        stats: GradStep,
        index: ParamIndex,
    ) -> CountedStep:
        """Layers, dtypes and the depth profile of ``params`` (the driver's per-tensor norms ``stats``)."""
        grads = [p.grad for p in params if p.grad is not None]  # all of them: params have gradients
        judged = [not s and not g.is_sparse for s, g in zip(structural, grads, strict=True)]
        layer_index = [index.layer_of.get(id(p), 0) for p in params]
        row = {id(p): i for i, p in enumerate(stats.params)}
        kept = [i for i, ok in enumerate(judged) if ok]
        profile = DepthProfile.measure(
            [stats.per_tensor_host[row[id(params[i])]] for i in kept],
            [grads[i].numel() for i in kept],
            [layer_index[i] for i in kept],
            index.layers,
        )
        loss = math.nan if stats.loss is None else stats.loss
        dtypes = [dtype_name(g.dtype) for g in grads]
        return cls(step, log, params, judged, layer_index, dtypes, profile, loss)

    def scalars(
        self, by_dtype: dict[str, Shares], by_layer: dict[str, Shares], dead: Sequence[float]
    ) -> dict[str, float]:
        """The scalars of this step, once its shares and dead fractions are known."""
        values: dict[str, float] = {}
        for (zero, sub, flushed), shares in (
            ((TAG_ZERO_DTYPE, TAG_SUB_DTYPE, TAG_FLUSH_DTYPE), by_dtype),
            ((TAG_ZERO_LAYER, TAG_SUB_LAYER, TAG_FLUSH_LAYER), by_layer),
        ):
            for name, s in shares.items():
                values[zero + name], values[sub + name], values[flushed + name] = (
                    s.zero,
                    s.subnormal,
                    s.flushed,
                )
        values.update({TAG_DEAD + name: frac for name, frac in zip(self.dead_names, dead, strict=True)})
        values.update(
            {TAG_RMS + name: v for name, v in zip(self.profile.layers, self.profile.rms, strict=True)}
        )
        if self.profile.decay is not None and math.isfinite(self.profile.decay):
            values[TAG_DEPTH] = self.profile.decay
        return values

    def judge(
        self,
        values: list[float],
        index: ParamIndex,
        zero: ZeroGradientRule,
        kinds: Callable[[str], str],
        limits: Limits,
    ) -> tuple[dict[str, float], list[Finding]]:
        """The fetched ``values`` (split counts, then dead fractions): scalars and findings, in order.

        ``zero`` keeps the zero streaks (updated here when the step's zeros are judged); ``kinds``
        names the class of a watched ReLU-family module.
        """
        size = 8 * len(self.params)
        counts, dead = from_float32_exact(values[:size]), values[size:]
        dtype_names = sorted(set(self.dtypes))  # = sorted by str(torch dtype)
        by_dtype = group_shares(counts, [dtype_names.index(d) for d in self.dtypes], dtype_names)
        by_layer = group_shares(counts, self.layer_index, index.layers)
        found: list[Finding | None] = []
        if self.judge_zero:
            totals, zeros = counts[:, 0].tolist(), counts[:, 1].tolist()
            found.append(
                zero.judge(
                    self.params,
                    zeros,
                    totals,
                    self.judged,
                    updates=self.updates,
                    loss=self.loss,
                    name_of=index.name,
                )
            )
        tensor_layers = [index.layers[li] for li in self.layer_index]
        found.append(underflow_finding(by_layer, tensor_layers, self.dtypes, limits.underflow_fraction))
        names = self.dead_names
        found += dead_unit_findings(names, [kinds(n) for n in names], dead, limits.dead_fraction)
        if self.judge_depth:
            found.append(vanishing_finding(self.profile, limits.depth_orders, limits.min_depth))
        return self.scalars(by_dtype, by_layer, dead), [f for f in found if f is not None]
