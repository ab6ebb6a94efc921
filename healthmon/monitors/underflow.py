"""GradientUnderflowMonitor: gradients rounded to zero, dead units, lost updates, decay along depth.

The seed's debugging advice: "if your model is stuck, you are probably rounding your gradient to
zero somewhere". This monitor looks for the places that happens, on a cadence (default every 100
optimizer steps), without a host synchronisation of its own:

* ``grad.zero``: a parameter's whole gradient is exactly zero while the loss is not ~0, on
  ``zero_steps`` (3) consecutive checked steps with an optimizer update between each two; between
  counting steps a per-tensor norm of exactly 0 is checked on every step, for free. Structural,
  transient zeros (LoRA's ``B = 0``, warm-up from 0), frozen and unused parameters, embedding rows
  not in the batch and a stationary point of the whole model are not reported.
* ``grad.underflow``: in some layer, a large share of the nonzero gradient entries is subnormal
  (float16 without loss scaling); the flushed-to-zero estimate is logged beside it.
* ``grad.dead_units``: most units of a ReLU-family layer passed no gradient for the whole batch
  (forward hooks only for the batches of a monitored step).
* ``update.stale``: most sampled weights of a layer were left bit-identical by the optimizer step
  although their gradient was nonzero (bfloat16 weights, small learning rate); groups whose
  learning rate is 0 or below 1% of its scheduled base are not sampled, and the model is never
  copied (a fixed sample of elements is read right before and after ``optimizer.step``).
* ``grad.vanishing``: the rms gradient entry decays by ``depth_orders`` orders of magnitude from
  the last layer back to the first while the smoothed loss is above half its start.

All statistics are measured in ``on_before_optimizer_step``: after gradient accumulation and AMP
unscaling (Lightning unscales before this hook), before clipping. A step the ``GradScaler`` skips
is not judged (``NonFiniteMonitor`` watches the scaler). The device counts of a monitored step, and
the stale counts read right after ``optimizer.step``, are fetched with the driver's next host
synchronisation (``Driver.defer``); alerts and scalars carry the step they were measured at. The
decisions, and the details above, are in :mod:`healthmon.numerics` (``zero_gradients``,
``underflow``, ``dead_units``, ``stale_updates``, ``depth_decay``), whose findings this monitor
raises as alerts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from healthmon import _checks, tags
from healthmon._checks import Cadence
from healthmon.alerts import OnAlert, Severity
from healthmon.engine.driver import Driver
from healthmon.engine.run import Run
from healthmon.engine.step_stats import GradStep, optimizer_params_with_grad
from healthmon.monitors.base import Monitor
from healthmon.monitors.counted_step import (  # noqa: F401  (the tags are this monitor's: re-exported)
    TAG_DEAD,
    TAG_DEPTH,
    TAG_FLUSH_DTYPE,
    TAG_FLUSH_LAYER,
    TAG_RMS,
    TAG_SUB_DTYPE,
    TAG_SUB_LAYER,
    TAG_ZERO_DTYPE,
    TAG_ZERO_LAYER,
    CountedStep,
    Limits,
)
from healthmon.monitors.stale_watch import TAG_STALE_DTYPE, TAG_STALE_LAYER, Fetched, StaleWatch
from healthmon.numerics.dead_units import UnitRecorder, relu_modules
from healthmon.numerics.depth_decay import LossLevel
from healthmon.numerics.findings import Finding
from healthmon.numerics.stale_updates import learning_rate
from healthmon.numerics.underflow import gradient_counts, log10_magnitudes, to_float32_exact
from healthmon.numerics.zero_gradients import ZeroGradientRule
from healthmon.schedules import SAMPLED_EVERY_100, LogCadence

TAG_HIST = tags.GRAD_LOG10_ABS.prefix

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


class GradientUnderflowMonitor(Monitor):
    """Gradients rounded or flushed to zero, dying ReLUs, optimizer steps that change nothing.

    Args:
        every_n_steps: optimizer steps at which gradients are counted, dead-unit hooks are
            installed and update staleness is sampled (default every 100 steps: a count costs
            about half a training step of a small MLP; these conditions persist, so a count every
            100 steps still catches them early). The default spaces out further on a model whose
            step is so short that the counts overrun the bundle's ``overhead_budget``
            (:class:`~healthmon.schedules.SampledEvery`); an int is kept exactly.
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

    unchecked_points = frozenset()

    def __init__(
        self,
        *,
        every_n_steps: Cadence = SAMPLED_EVERY_100,
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
        self.dead_units = _checks.boolean(dead_units, "dead_units")
        self.dead_fraction = _checks.fraction(dead_fraction, "dead_fraction")
        self.stale_updates = _checks.boolean(stale_updates, "stale_updates")
        self.stale_fraction = _checks.fraction(stale_fraction, "stale_fraction")
        self.stale_samples = _checks.positive_int(stale_samples, "stale_samples")
        self.stale_min_samples = _checks.positive_int(stale_min_samples, "stale_min_samples")
        self.resample_every = _checks.positive_int(resample_every, "resample_every")
        self.depth_orders = _checks.positive_float(depth_orders, "depth_orders")
        self.min_depth = _checks.positive_int(min_depth, "min_depth", minimum=2)
        self.histogram_every_n_steps = _checks.optional_positive_int(
            histogram_every_n_steps, "histogram_every_n_steps"
        )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed`: expected an integer, got {seed!r}.")
        self.seed = seed
        # run state
        self._zero = ZeroGradientRule(self.zero_fraction, self.zero_steps)
        self._loss = LossLevel()
        self._units = UnitRecorder()
        self._stale = StaleWatch(
            stale_samples, seed, min_samples=self.stale_min_samples, fraction=self.stale_fraction
        )
        self._limits = Limits(self.underflow_fraction, self.dead_fraction, self.depth_orders, self.min_depth)
        self._samplings = 0
        self._structural: set[int] = set()
        self._step_hooks: list[Any] = []
        self._updates = 0  # optimizer steps taken with a nonzero learning rate
        self._alive_step = -1
        self._log_cadence = LogCadence()

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
    def declare_layout(self, driver: Driver) -> None:
        driver.declare_layout(
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
    def on_start(self, run: Run) -> None:
        self._units = UnitRecorder(relu_modules(run.model))
        self._structural = {id(m.weight) for m in run.model.modules() if isinstance(m, _EMBEDDINGS)}
        self._stale.start()
        # Lightning runs the closure (forward, backward, on_before_optimizer_step) *inside*
        # optimizer.step, so a step pre-hook fires before the gradients exist: the weights are
        # sampled in on_before_optimizer_step and again in the post-hook, right after the update.
        for optimizer in run.optimizers:
            self._step_hooks.append(optimizer.register_step_post_hook(self._after_step))

    @override
    def on_batch_start(self, run: Run, batch: Any, batch_idx: int) -> None:
        self._watch_units(run, run.global_step)

    @override
    def on_optimizer_step(self, run: Run, optimizer: Any) -> None:
        if self.should_run(run):
            self._units.detach()
            self._check(run, optimizer)
            if self.stale_updates:
                self._sample_before(optimizer, run.global_step)
        else:
            self._whole_zero_from_shared_norms(run, optimizer)
        every = self.histogram_every_n_steps
        if every is not None and run.global_step % every == 0:
            self._histograms(run, optimizer)
        self._count_update(run, optimizer)

    def _count_update(self, run: Run, optimizer: Any) -> None:
        """Count the update this checked step is about to apply (a nonzero learning rate, not skipped).

        The zero-gradient rule needs an update between each two checked steps of a streak: the
        update that follows a checked step is one. Read here, not in an every-step hook, so that
        unchecked steps cost nothing (a warm-up from 0 is then seen at the next checked step).
        """
        driver = self.driver
        if driver.scaler is not None and driver.grad_step(run, optimizer).skipped:
            return
        if any(learning_rate(group, exact=False) > 0.0 for group in optimizer.param_groups):
            self._updates += 1

    @override
    def on_batch_end(self, run: Run, batch: Any, batch_idx: int) -> None:
        self._units.detach()
        self._stale.sampler.disarm()  # a step the GradScaler skipped never reached the post-hook

    @override
    def on_training_end(self, run: Run) -> None:
        self._stale.end(lambda: self._judge_stale(run, self._stale.take(), log=True))

    @override
    def on_teardown(self, run: Run) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks.clear()
        self._units.detach()

    # ---- the monitored step: count on the device, fetch with the driver's next sync, judge ------------
    def _watch_units(self, run: Run, step: int) -> None:
        """Dead units: forward hooks only for the batches of a monitored step."""
        if self._alive_step != step:  # a new optimizer step (not the next micro-batch of this one)
            self._units.clear()
            self._alive_step = step
        if self.dead_units and self._units.modules and not self._units.attached and self.should_run(run):
            self._units.attach()

    def _check(self, run: Run, optimizer: torch.optim.Optimizer) -> None:
        driver, index = self.driver, self.driver.params
        params, _ = optimizer_params_with_grad(optimizer)
        params = [p for p in params if p.grad is not None and p.grad.is_floating_point()]
        if index is None or not params:
            return
        structural = [id(p) in self._structural for p in params]
        counts = gradient_counts([p.grad for p in params if p.grad is not None], structural_zeros=structural)
        # per-tensor norms and the loss come from the driver's shared per-step statistics
        stats = driver.grad_step(run, optimizer)
        if stats.skipped:  # overflow the GradScaler handles: these gradients are never applied
            return
        if not math.isfinite(stats.norm):
            return  # NaN/Inf gradients: NonFiniteMonitor names the cause; zero/dead counts mean nothing
        stationary = self._at_stationary_point(stats)
        self._loss.update(stats.loss)
        step = run.global_step
        m = CountedStep.measure(step, self._log_due(run, step), params, structural, stats, index)
        loss_nonzero = math.isnan(m.loss) or abs(m.loss) > self.loss_tolerance
        m.judge_zero, m.judge_depth = loss_nonzero and not stationary, loss_nonzero and self._loss.judged()
        m.updates, m.stale = self._updates, self._stale.take()
        dead = self._units.take()
        m.dead_names = list(dead)
        values = [to_float32_exact(counts).reshape(-1)]
        values += [d.to(device=counts.device, dtype=torch.float64).reshape(1) for d in dead.values()]
        driver.defer(torch.cat(values), lambda v: self._judge(run, m, v))

    def _judge(self, run: Run, m: CountedStep, values: list[float]) -> None:
        """The fetched counts of a monitored step: write its scalars, raise its findings."""
        driver = self.driver
        assert driver.params is not None
        scalars, findings = m.judge(values, driver.params, self._zero, self._units.kind, self._limits)
        if m.log:
            driver.log(run, scalars, m.step)
        for found in findings:
            self._raise(run, found, m.step)
        if m.stale is not None:
            self._judge_stale(run, m.stale, log=m.log, step=m.step)

    def _raise(self, run: Run, found: Finding | None, step: int | None = None) -> None:
        if found is not None:
            self.driver.report(run, found, step=step)

    def _log_due(self, run: Run, step: int) -> bool:
        """Write scalars about every ``log_every_n_steps`` (the driver's, else the loop's) steps.

        Decisions are made on every monitored step; writing a few dozen scalars costs more than
        counting, so the writes follow the logging cadence even when the two cadences do not align.
        """
        return self._log_cadence.due(step, self.driver.stats.log_every(run))

    # ---- exact zeros between counting steps, from the driver's shared norms -------------------------
    def _whole_zero_from_shared_norms(self, run: Run, optimizer: torch.optim.Optimizer) -> None:
        """Report tensors whose gradient norm is exactly 0 (entirely zero), between counting steps.

        Free, as the per-tensor norms were already fetched for the NaN check, so a layer killed mid-run
        is reported at once.
        """
        driver = self.driver
        stats = driver.grad_step(run, optimizer)
        if stats.skipped:
            return
        self._loss.update(stats.loss)
        if self._at_stationary_point(stats):
            return
        if driver.params is None or stats.loss is None or not abs(stats.loss) > self.loss_tolerance:
            return
        eligible = [
            id(p) not in self._structural and p.grad is not None and not p.grad.is_sparse
            for p in stats.params
        ]
        found = self._zero.judge_norms(
            stats.params,
            stats.per_tensor_host,
            eligible,
            updates=self._updates,
            loss=stats.loss,
            name_of=driver.params.name,
        )
        self._raise(run, found)

    def _at_stationary_point(self, stats: GradStep) -> bool:
        """Track the peak gradient norm; at a stationary point of the whole model zero streaks restart."""
        return self._zero.at_stationary_point(
            stats.optimizer_index, stats.norm, (id(p) for p in stats.params)
        )

    # ---- stale updates: sampled around optimizer.step, fetched with the driver's next sync ----------
    def _sample_before(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        self._samplings += 1
        self._stale.sampler.before(optimizer, step, resample=self._samplings % self.resample_every == 0)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._stale.sampler.armed:  # a sampled step (the others pay nothing here)
            self._stale.after_step(self.driver)

    def _judge_stale(self, run: Run, fetched: Fetched | None, *, log: bool, step: int | None = None) -> None:
        if fetched is None or self._driver is None or self.driver.params is None:
            return
        values, found = self._stale.judge(fetched, self.driver.params.layers)
        if log:
            self.driver.log(run, values, fetched[0].step)
        self._raise(run, found, step)

    # ---- histograms ------------------------------------------------------------------------------
    def _histograms(self, run: Run, optimizer: torch.optim.Optimizer) -> None:
        driver = self.driver
        if driver.output.writer is None or driver.params is None:
            return
        per_layer: dict[int, list[Tensor]] = {}
        for p in optimizer_params_with_grad(optimizer)[0]:
            if p.grad is not None and p.grad.is_floating_point():
                per_layer.setdefault(driver.params.layer_of.get(id(p), 0), []).append(
                    log10_magnitudes(p.grad)
                )
        for li, parts in per_layer.items():
            values = torch.cat(parts)
            if values.numel():
                driver.histogram(run, TAG_HIST + driver.params.layers[li], values)

    # ---- checkpoints -----------------------------------------------------------------------------
    @override
    def monitor_state(self) -> dict[str, Any]:
        return {
            "samplings": self._samplings,
            "peak_norms": {str(k): v for k, v in self._zero.stationary.peaks.items()},
            "loss_start": self._loss.start,
            "loss_count": self._loss.count,
            "loss_level": self._loss.level.value,
        }

    @override
    def load_monitor_state(self, state: dict[str, Any]) -> None:
        self._samplings = int(state.get("samplings", 0))
        self._zero.stationary.peaks = {int(k): float(v) for k, v in state.get("peak_norms", {}).items()}
        self._loss.start = state.get("loss_start")
        self._loss.count = int(state.get("loss_count", 0))
        self._loss.level.value = state.get("loss_level")
