"""GradientUnderflowMonitor: gradients rounded to zero, dead units, lost updates, decay along depth.

The seed's debugging advice: "if your model is stuck, you are probably rounding your gradient to
zero somewhere". This monitor looks for the places that happens, on a cadence (default every 100
optimizer steps), with one host synchronisation per monitored step:

* ``grad.zero``: a parameter's whole gradient is exactly zero while the loss is not ~0, on
  ``zero_steps`` (3) consecutive checked steps with an optimizer update between each two. A zero
  that the first updates end is structural and transient: LoRA's ``B = 0`` zeroes A's gradient
  until B has moved once, as do zero-initialised residual branches and zero convolutions; steps
  the optimizer skipped (GradScaler overflow) or took with a learning rate of 0 (warm-up from 0)
  move nothing, so they do not count. Frozen parameters and parameters unused this step
  (``grad is None``) are not looked at; the absent rows of ``nn.Embedding`` gradients (dense or
  ``sparse=True``) are legitimate zeros and never counted. A zero at a stationary point of the
  whole model (the global gradient norm 3 orders of magnitude below the run's peak: full-batch
  least squares at its float32 optimum, where the bias gradient is exactly 0) is the optimum,
  not a cut gradient path: only a zero while the rest of the model still learns is reported.
* ``grad.underflow``: in some layer, a large share of the nonzero gradient entries sits in the
  subnormal range of its dtype (the flushed-to-zero estimate, see
  :mod:`healthmon.numerics.underflow`, is logged beside it). Typical cause: float16 training
  without loss scaling.
* ``grad.dead_units``: most units of a ReLU-family layer passed no gradient for the whole batch.
  Forward hooks are installed only for the batches of a monitored step.
* ``update.stale``: most sampled weights of a layer were left bit-identical by the optimizer step
  although their gradient was nonzero (``w + update == w``: bfloat16/float16 weights with a small
  learning rate). Only updates the optimizer asked for count: parameters whose group's learning
  rate is 0 (warm-up from 0), or below 1% of its scheduler's base rate (the ends of a warm-up or
  an annealing schedule), are not sampled. Works with any optimizer: a fixed random sample of
  elements per tensor is read
  right before and after ``optimizer.step`` (step hooks); the model is never copied.
* ``grad.vanishing``: the root-mean-square gradient entry decays by ``depth_orders`` orders of
  magnitude from the last layer back to the first (deep sigmoid/tanh stacks), while the loss
  (smoothed) is above half its start (the mean of its first 10 values): such a stack cannot
  learn and is reported from its first checked step; a run whose loss fell below half its start
  learned through its first layers, and a profile decayed at a near-zero loss (a post-LN BERT
  under AdamW) is not a vanishing gradient.

All statistics are measured in ``on_before_optimizer_step``: after gradient accumulation and AMP
unscaling (Lightning unscales before this hook), before clipping. A step the ``GradScaler`` skips
(its gradients overflowed) is not judged; the scaler itself is watched by ``NonFiniteMonitor``.
The device counts of a monitored step (and the stale counts, read right after ``optimizer.step``)
are fetched with the hub's next host synchronisation (``Hub.defer``); the alerts carry the step
they were measured at. The decisions live in :mod:`healthmon.numerics` (``zero_gradients``,
``underflow``, ``dead_units``, ``depth_decay``, ``stale_updates``), which return findings that
this monitor raises as alerts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from healthmon import _checks
from healthmon._checks import Cadence
from healthmon.alerts import OnAlert, Severity
from healthmon.monitors.base import Monitor
from healthmon.monitors.hub import GradStep, Hub, ParamIndex, optimizer_params_with_grad
from healthmon.numerics.dead_units import UnitRecorder, dead_unit_findings, relu_modules
from healthmon.numerics.depth_decay import DepthProfile, LossLevel, layer_rms, vanishing_finding
from healthmon.numerics.findings import Finding
from healthmon.numerics.precision import dtype_name
from healthmon.numerics.stale_updates import StaleSample, StaleSampler, learning_rate, stale_summary
from healthmon.numerics.underflow import (
    Shares,
    from_float32_exact,
    gradient_counts,
    group_shares,
    log10_magnitudes,
    to_float32_exact,
    underflow_finding,
)
from healthmon.numerics.zero_gradients import StationaryWatch, ZeroStreaks, zero_finding, zero_hits

PREFIX = "healthmon/grad/"
TAG_ZERO_DTYPE = "healthmon/grad/zero_fraction/dtype/"
TAG_ZERO_LAYER = "healthmon/grad/zero_fraction/layer/"
TAG_SUB_DTYPE = "healthmon/grad/subnormal_fraction/dtype/"
TAG_SUB_LAYER = "healthmon/grad/subnormal_fraction/layer/"
TAG_FLUSH_DTYPE = "healthmon/grad/flushed_fraction/dtype/"
TAG_FLUSH_LAYER = "healthmon/grad/flushed_fraction/layer/"
TAG_DEAD = "healthmon/grad/dead_units/"
TAG_DEPTH = "healthmon/grad/depth_decay_orders"
TAG_RMS = "healthmon/grad/rms/"
TAG_STALE_DTYPE = "healthmon/update/stale_fraction/dtype/"
TAG_STALE_LAYER = "healthmon/update/stale_fraction/layer/"
TAG_HIST = "healthmon/grad/log10_abs/"

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}`: expected True or False, got {value!r}.")
    return value


@dataclass
class _Measured:
    """What a monitored step measured on the host, kept until its device counts are fetched."""

    step: int
    log: bool
    index: ParamIndex
    params: list[Tensor]
    judged: list[bool]  # zeros judged: neither an embedding's structural zeros nor a sparse gradient
    layer_index: list[int]
    dtypes: list[str]  # per tensor
    profile: DepthProfile
    loss: float
    judge_zero: bool
    judge_depth: bool
    updates: int
    dead_names: list[str]
    stale: tuple[StaleSample, Tensor] | None


class GradientUnderflowMonitor(Monitor):
    """Gradients rounded or flushed to zero, dying ReLUs, optimizer steps that change nothing.

    Args:
        every_n_steps: optimizer steps at which gradients are counted, dead-unit hooks are
            installed and update staleness is sampled (default 100: a check costs about half a
            training step of a small MLP, ~0.5% amortised; these conditions persist, so a check
            every 100 steps still catches them early).
        zero_fraction: a parameter whose share of exactly-zero gradient entries reaches this
            raises ``grad.zero`` (default 1.0: the whole gradient is zero).
        zero_steps: consecutive checked steps, with an optimizer update between each two, on which
            a gradient must be zero before ``grad.zero`` is raised (structural zeros of
            zero-initialised parameters end with the first update; default 3).
        underflow_fraction: a layer whose share of nonzero gradient entries in the subnormal
            range reaches this raises ``grad.underflow`` (exact count; the flushed-to-zero
            estimate is logged beside it but, being an upper bound, does not decide).
        loss_tolerance: ``|loss|`` at or below this counts as ~0 (a converged run may have zero
            gradients): ``grad.zero`` and ``grad.vanishing`` are then not raised.
        dead_units: watch ReLU-family modules (``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh``) for units
            that pass no gradient for the whole batch. Functional ``F.relu`` calls are not seen.
        dead_fraction: share of dead units in a layer that raises ``grad.dead_units``.
        stale_updates: sample weights around ``optimizer.step`` to detect lost updates.
        stale_fraction: share of a layer's sampled, nonzero-gradient weights left bit-identical
            that raises ``update.stale``.
        stale_samples: elements sampled per parameter tensor.
        stale_min_samples: a layer needs at least this many eligible samples to be judged.
        resample_every: draw new sample indices after this many samplings.
        depth_orders: orders of magnitude of decay (last layer vs first) that raise
            ``grad.vanishing``.
        min_depth: layers with gradients needed before the depth profile is judged.
        histogram_every_n_steps: write histograms of log10|grad| per layer every N steps (copies
            gradients to the host: off by default).
        seed: seed of the private generator that picks the sampled elements.
        on_alert: see :class:`~healthmon.monitors.base.Monitor`.
        fail_on: see :class:`~healthmon.monitors.base.Monitor`.
        log_every_n_steps: see :class:`~healthmon.monitors.base.Monitor` (scalars of this monitor
            are written on its own monitored steps).
    """

    def __init__(
        self,
        *,
        every_n_steps: Cadence = 100,
        zero_fraction: float = 1.0,
        zero_steps: int = 3,
        underflow_fraction: float = 0.05,
        loss_tolerance: float = 1e-8,
        dead_units: bool = True,
        dead_fraction: float = 0.5,
        stale_updates: bool = True,
        stale_fraction: float = 0.5,
        stale_samples: int = 256,
        stale_min_samples: int = 32,
        resample_every: int = 50,
        depth_orders: float = 3.0,
        min_depth: int = 3,
        histogram_every_n_steps: int | None = None,
        seed: int = 0,
        on_alert: OnAlert = "warn",
        fail_on: Severity = "warning",
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            on_alert=on_alert,
            fail_on=fail_on,
            log_every_n_steps=log_every_n_steps,
        )
        self.zero_fraction = _checks.fraction(zero_fraction, "zero_fraction")
        self.zero_steps = _checks.positive_int(zero_steps, "zero_steps")
        self.underflow_fraction = _checks.fraction(underflow_fraction, "underflow_fraction")
        self.loss_tolerance = _checks.positive_float(loss_tolerance, "loss_tolerance", inclusive=True)
        self.dead_units = _flag(dead_units, "dead_units")
        self.dead_fraction = _checks.fraction(dead_fraction, "dead_fraction")
        self.stale_updates = _flag(stale_updates, "stale_updates")
        self.stale_fraction = _checks.fraction(stale_fraction, "stale_fraction")
        self.stale_samples = _checks.positive_int(stale_samples, "stale_samples")
        self.stale_min_samples = _checks.positive_int(stale_min_samples, "stale_min_samples")
        self.resample_every = _checks.positive_int(resample_every, "resample_every")
        self.depth_orders = _checks.positive_float(depth_orders, "depth_orders")
        self.min_depth = _checks.positive_int(min_depth, "min_depth", minimum=2)
        if histogram_every_n_steps is not None:
            _checks.positive_int(histogram_every_n_steps, "histogram_every_n_steps")
        self.histogram_every_n_steps = histogram_every_n_steps
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed`: expected an integer, got {seed!r}.")
        self.seed = seed
        # run state
        self._sampler = StaleSampler(stale_samples, seed)
        self._samplings = 0
        self._units = UnitRecorder()
        self._streaks = ZeroStreaks(self.zero_steps)
        self._stationary = StationaryWatch()
        self._loss = LossLevel()
        self._structural: set[int] = set()
        self._step_hooks: list[Any] = []
        self._updates = 0  # optimizer steps taken with a nonzero learning rate
        self._alive_step = -1
        self._last_log = -1
        self._stale: tuple[StaleSample, Tensor] | None = None  # fetched, judged at the next monitored step
        self._stale_in_flight = False
        self._ended = False
        self._trainer: pl.Trainer | None = None

    @override
    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "zero_fraction": self.zero_fraction,
            "zero_steps": self.zero_steps,
            "underflow_fraction": self.underflow_fraction,
            "loss_tolerance": self.loss_tolerance,
            "dead_units": self.dead_units,
            "dead_fraction": self.dead_fraction,
            "stale_updates": self.stale_updates,
            "stale_fraction": self.stale_fraction,
            "stale_samples": self.stale_samples,
            "depth_orders": self.depth_orders,
            "histogram_every_n_steps": self.histogram_every_n_steps,
        }

    @override
    def declare_layout(self, hub: Hub) -> None:
        hub.declare_layout(
            "healthmon: precision",
            {
                "zero gradient fraction per dtype": [TAG_ZERO_DTYPE + ".*"],
                "subnormal gradient fraction per dtype": [TAG_SUB_DTYPE + ".*"],
                "flushed-to-zero estimate per dtype": [TAG_FLUSH_DTYPE + ".*"],
                "zero gradient fraction per layer": [TAG_ZERO_LAYER + ".*"],
                "subnormal gradient fraction per layer": [TAG_SUB_LAYER + ".*"],
                "dead units per layer": [TAG_DEAD + ".*"],
                "stale updates per layer": [TAG_STALE_LAYER + ".*"],
                "stale updates per dtype": [TAG_STALE_DTYPE + ".*"],
                "gradient decay along depth (orders of magnitude)": [TAG_DEPTH],
            },
        )

    # ---- lifecycle ---------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._units = UnitRecorder(relu_modules(pl_module))
        self._structural = {id(m.weight) for m in pl_module.modules() if isinstance(m, _EMBEDDINGS)}
        self._trainer, self._ended = trainer, False
        # Lightning runs the closure (forward, backward, on_before_optimizer_step) *inside*
        # optimizer.step, so a step pre-hook fires before the gradients exist: the weights are
        # sampled in on_before_optimizer_step and again in the post-hook, right after the update.
        for optimizer in trainer.optimizers:
            self._step_hooks.append(optimizer.register_step_post_hook(self._after_step))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._watch_units(trainer, int(trainer.global_step))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.should_run(trainer):
            self._units.detach()
            self._check(trainer, optimizer)
            if self.stale_updates:
                self._samplings += 1
                resample = self._samplings % self.resample_every == 0
                self._sampler.before(optimizer, int(trainer.global_step), resample=resample)
        else:
            self._whole_zero_from_shared_norms(trainer, optimizer)
        every = self.histogram_every_n_steps
        if every is not None and trainer.global_step % every == 0:
            self._histograms(trainer, optimizer)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._units.detach()
        self._sampler.disarm()  # a step the GradScaler skipped never reached the post-hook
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ended = True
        self._judge_last_stale(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks.clear()
        self._units.detach()
        super().teardown(trainer, pl_module, stage)

    # ---- dead units: forward hooks on the batches of a monitored step ------------------------------
    def _watch_units(self, trainer: pl.Trainer, step: int) -> None:
        if self._alive_step != step:  # a new optimizer step (not the next micro-batch of this one)
            self._units.clear()
            self._alive_step = step
        if self.dead_units and self._units.modules and not self._units.attached and self.should_run(trainer):
            self._units.attach()

    # ---- the monitored step: count on the device, fetch with the next sync, judge ------------------
    def _check(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        hub, index = self.hub, self.hub.params
        params, _ = optimizer_params_with_grad(optimizer)
        params = [p for p in params if p.grad is not None and p.grad.is_floating_point()]
        if index is None or not params:
            return
        grads = [p.grad for p in params]
        structural = [id(p) in self._structural for p in params]
        counts = gradient_counts(grads, structural_zeros=structural)  # type: ignore[arg-type]
        # per-tensor norms and the loss come from the hub's shared per-step statistics
        stats = hub.grad_step(trainer, optimizer)
        if stats.skipped:  # overflow the GradScaler handles: these gradients are never applied
            return
        if not math.isfinite(stats.norm):
            return  # NaN/Inf gradients: NonFiniteMonitor names the cause; zero/dead counts mean nothing
        stationary = self._at_stationary_point(stats)
        self._loss.update(stats.loss)
        measured = self._measure(trainer, index, params, structural, stats, stationary)
        dead = self._units.take()
        measured.dead_names = list(dead)
        values = [to_float32_exact(counts).reshape(-1)]
        values += [d.to(device=counts.device, dtype=torch.float64).reshape(1) for d in dead.values()]
        hub.defer(torch.cat(values), lambda v: self._judge(trainer, measured, v))

    def _measure(
        self,
        trainer: pl.Trainer,
        index: ParamIndex,
        params: list[Tensor],
        structural: list[bool],
        stats: GradStep,
        stationary: bool,
    ) -> _Measured:
        """The host side of a monitored step: layers, the depth profile, what is judged."""
        grads = [p.grad for p in params]
        judged = [not s and not g.is_sparse for s, g in zip(structural, grads, strict=True)]  # type: ignore[union-attr]
        layer_index = [index.layer_of.get(id(p), 0) for p in params]
        shared = {id(p): i for i, p in enumerate(stats.params)}
        profile = [i for i, ok in enumerate(judged) if ok]
        rms = layer_rms(
            [stats.per_tensor_host[shared[id(params[i])]] for i in profile],
            [grads[i].numel() for i in profile],  # type: ignore[union-attr]
            [layer_index[i] for i in profile],
            len(index.layers),
        )
        loss = math.nan if stats.loss is None else stats.loss
        loss_nonzero = math.isnan(loss) or abs(loss) > self.loss_tolerance
        stale, self._stale = self._stale, None
        step = int(trainer.global_step)
        return _Measured(
            step=step,
            log=self._log_due(trainer, step),
            index=index,
            params=params,
            judged=judged,
            layer_index=layer_index,
            dtypes=[dtype_name(g.dtype) for g in grads],  # type: ignore[union-attr]
            profile=DepthProfile.of(rms, index.layers),
            loss=loss,
            judge_zero=loss_nonzero and not stationary,
            judge_depth=loss_nonzero and self._loss.judged(),
            updates=self._updates,
            dead_names=[],
            stale=stale,
        )

    def _judge(self, trainer: pl.Trainer, m: _Measured, values: list[float]) -> None:
        """The fetched counts of a monitored step: log its scalars, raise its findings."""
        size = 8 * len(m.params)
        counts = from_float32_exact(values[:size])
        dead = values[size:]
        layers = m.index.layers
        dtype_names = sorted(set(m.dtypes), key=lambda n: str(getattr(torch, n)))
        by_dtype = group_shares(counts, [dtype_names.index(d) for d in m.dtypes], dtype_names)
        by_layer = group_shares(counts, m.layer_index, layers)
        if m.log:
            self.hub.log(
                trainer,
                self._scalars(by_dtype, by_layer, dict(zip(m.dead_names, dead, strict=True)), m.profile),
                m.step,
            )
        if m.judge_zero:
            totals, zeros = counts[:, 0].tolist(), counts[:, 1].tolist()
            self._judge_zero(trainer, m.params, m.judged, zeros, totals, m.loss, m.updates, m.step)
        layer_dtypes: dict[str, list[str]] = {}
        for li, d in zip(m.layer_index, m.dtypes, strict=True):
            layer_dtypes.setdefault(layers[li], []).append(d)
        findings = [underflow_finding(by_layer, layer_dtypes, self.underflow_fraction)]
        kinds = [self._units.kind(n) for n in m.dead_names]
        findings += dead_unit_findings(m.dead_names, kinds, dead, self.dead_fraction)
        if m.judge_depth:
            findings.append(vanishing_finding(m.profile, self.depth_orders, self.min_depth))
        for finding in findings:
            self._raise(trainer, finding, m.step)
        if m.stale is not None:
            self._judge_stale(trainer, *m.stale, log=m.log, step=m.step)

    @staticmethod
    def _scalars(
        by_dtype: dict[str, Shares],
        by_layer: dict[str, Shares],
        dead: dict[str, float],
        profile: DepthProfile,
    ) -> dict[str, float]:
        values: dict[str, float] = {}
        for tags, shares in (
            ((TAG_ZERO_DTYPE, TAG_SUB_DTYPE, TAG_FLUSH_DTYPE), by_dtype),
            ((TAG_ZERO_LAYER, TAG_SUB_LAYER, TAG_FLUSH_LAYER), by_layer),
        ):
            for name, s in shares.items():
                values[tags[0] + name], values[tags[1] + name], values[tags[2] + name] = (
                    s.zero,
                    s.subnormal,
                    s.flushed,
                )
        values.update({TAG_DEAD + name: frac for name, frac in dead.items()})
        values.update({TAG_RMS + name: rms for name, rms in zip(profile.layers, profile.rms, strict=True)})
        if profile.decay is not None and math.isfinite(profile.decay):
            values[TAG_DEPTH] = profile.decay
        return values

    def _raise(self, trainer: pl.Trainer, finding: Finding | None, step: int | None = None) -> None:
        if finding is not None:
            self.hub.alert(
                trainer, finding.code, finding.message, where=finding.where, value=finding.value, step=step
            )

    def _log_due(self, trainer: pl.Trainer, step: int) -> bool:
        """Write scalars about every ``log_every_n_steps`` (the hub's, else the Trainer's) steps.

        Decisions are made on every monitored step; writing a few dozen scalars costs more than
        counting, so the writes follow the logging cadence even when the two cadences do not align.
        """
        every = self.hub.log_every_n_steps or max(int(getattr(trainer, "log_every_n_steps", 50)), 1)
        if self._last_log < 0 or step - self._last_log >= every or step % every == 0:
            self._last_log = step
            return True
        return False

    # ---- exact zeros -------------------------------------------------------------------------------
    def _whole_zero_from_shared_norms(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Between counting steps: a gradient whose norm is exactly 0 is entirely zero.

        Free: the per-tensor norms are the hub's shared per-step statistics (already fetched for
        the NaN check), so a layer killed mid-run (dead ReLUs after a blow-up) is reported at once.
        """
        hub = self.hub
        stats = hub.grad_step(trainer, optimizer)
        if stats.skipped:
            return
        self._loss.update(stats.loss)
        if self._at_stationary_point(stats):
            return
        if hub.params is None or stats.loss is None or not abs(stats.loss) > self.loss_tolerance:
            return
        norms, params = stats.per_tensor_host, stats.params
        hits = [
            p
            for p, norm in zip(params, norms, strict=True)
            if norm == 0.0 and id(p) not in self._structural and not p.grad.is_sparse and p.numel() > 0  # type: ignore[union-attr]
        ]
        if self.zero_fraction >= 1.0:  # a nonzero norm ends a streak (partial zeros are counted elsewhere)
            self._streaks.end(id(p) for p, norm in zip(params, norms, strict=True) if norm != 0.0)
        if hits:
            sizes = [float(p.numel()) for p in hits]
            self._judge_zero(trainer, hits, [True] * len(hits), sizes, sizes, stats.loss, self._updates, None)

    def _at_stationary_point(self, stats: GradStep) -> bool:
        """Track the run's peak gradient norm (per optimizer); True when this step is at a stationary point.

        Then no tensor's zero gradient is a cut path, and zero streaks restart.
        """
        if not self._stationary.update(stats.optimizer_index, stats.norm):
            return False
        self._streaks.end(id(p) for p in stats.params)
        return True

    def _judge_zero(
        self,
        trainer: pl.Trainer,
        params: list[Tensor],
        judged: list[bool],
        zeros: list[float],
        totals: list[float],
        loss: float,
        updates: int,
        step: int | None,
    ) -> None:
        hits = zero_hits(zeros, totals, judged, self.zero_fraction)
        hits = self._streaks.judge([id(p) for p in params], hits, updates)
        if hits:
            names = [self.hub.params.name(params[i]) for i in hits]  # type: ignore[union-attr]
            value = zeros[hits[0]] / totals[hits[0]]
            self._raise(trainer, zero_finding(names, value, self.zero_fraction, self.zero_steps, loss), step)

    # ---- stale updates: sampled around optimizer.step, fetched with the next sync ----------------
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if any(learning_rate(group, exact=False) > 0.0 for group in optimizer.param_groups):
            self._updates += 1
        hub = self._hub
        if hub is None or hub.params is None:
            return
        sample = self._sampler.after(hub.params.layer_of)
        if sample is not None and sample.counts is not None:
            self._stale_in_flight = True
            hub.defer(sample.counts, lambda v: self._on_stale_counts(sample, v))

    def _on_stale_counts(self, sample: StaleSample, values: list[float]) -> None:
        self._stale_in_flight = False
        self._stale = (sample, torch.tensor(values, dtype=torch.float64))
        if self._ended and self._trainer is not None:
            self._judge_last_stale(self._trainer)

    def _judge_last_stale(self, trainer: pl.Trainer) -> None:
        """End of training: judge the last sampled step (once its counts are fetched)."""
        if self._stale is not None and not self._stale_in_flight and self._hub is not None:
            stale, self._stale = self._stale, None
            self._judge_stale(trainer, *stale, log=True)

    def _judge_stale(
        self, trainer: pl.Trainer, sample: StaleSample, counts: Tensor, *, log: bool, step: int | None = None
    ) -> None:
        hub = self.hub
        assert hub.params is not None
        summary = stale_summary(
            sample,
            counts,
            hub.params.layers,
            min_samples=self.stale_min_samples,
            fraction=self.stale_fraction,
        )
        if log:
            values = {TAG_STALE_DTYPE + name: v for name, v in summary.by_dtype.items()}
            values.update({TAG_STALE_LAYER + name: v for name, v in summary.by_layer.items()})
            hub.log(trainer, values, sample.step)
        self._raise(trainer, summary.finding, step)

    # ---- histograms ------------------------------------------------------------------------------
    def _histograms(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        hub = self.hub
        if hub.sink is None or hub.params is None:
            return
        per_layer: dict[int, list[Tensor]] = {}
        for p in optimizer_params_with_grad(optimizer)[0]:
            if p.grad is not None and p.grad.is_floating_point():
                per_layer.setdefault(hub.params.layer_of.get(id(p), 0), []).append(log10_magnitudes(p.grad))
        for li, parts in per_layer.items():
            values = torch.cat(parts)
            if values.numel():
                hub.sink.histogram(TAG_HIST + hub.params.layers[li], values, int(trainer.global_step))

    # ---- checkpoints -----------------------------------------------------------------------------
    @override
    def monitor_state(self) -> dict[str, Any]:
        return {
            "samplings": self._samplings,
            "peak_norms": {str(k): v for k, v in self._stationary.peaks.items()},
            "loss_start": self._loss.start,
            "loss_count": self._loss.count,
            "loss_level": self._loss.level.value,
        }

    @override
    def load_monitor_state(self, state: dict[str, Any]) -> None:
        self._samplings = int(state.get("samplings", 0))
        self._stationary.peaks = {int(k): float(v) for k, v in state.get("peak_norms", {}).items()}
        self._loss.start = state.get("loss_start")
        self._loss.count = int(state.get("loss_count", 0))
        self._loss.level.value = state.get("loss_level")
