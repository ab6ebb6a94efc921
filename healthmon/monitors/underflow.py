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
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from healthmon import _checks
from healthmon._checks import Cadence
from healthmon.alerts import OnAlert, Severity
from healthmon.engine.driver import Driver
from healthmon.engine.run import Run
from healthmon.engine.step_stats import GradStep, optimizer_params_with_grad
from healthmon.monitors.base import Monitor
from healthmon.numerics.precision import dtype_name, stale_counts
from healthmon.numerics.trends import EMA
from healthmon.numerics.underflow import (
    RELU_FAMILY,
    TOTAL,
    ZEROS,
    active_units,
    at_stationary_point,
    dead_fraction,
    depth_decay_orders,
    depth_profile_judged,
    fractions,
    gradient_counts,
    grouped_counts,
    layer_rms,
    log10_magnitudes,
    sample_indices,
)

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
_SCHEDULE_FLOOR = 0.01  # update.stale: a scheduled lr below 1% of its base asks for no update
_MAX_NAMES = 5
_LOSS_START_STEPS = 10  # losses averaged into the start level the depth profile is judged against


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}`: expected True or False, got {value!r}.")
    return value


def _learning_rate(group: dict[str, Any], *, exact: bool = True) -> float:
    """A parameter group's learning rate (groups of optimizers without one count as moving).

    A learning rate held in a device tensor (capturable optimizers) is read only when ``exact``:
    reading it is a host synchronisation, which the every-step bookkeeping does not pay.
    """
    lr = group.get("lr", 1.0)
    if isinstance(lr, Tensor):
        return float(lr) if exact or lr.device.type == "cpu" else 1.0
    return float(lr) if isinstance(lr, (int, float)) else 1.0


def _asks_for_updates(group: dict[str, Any]) -> bool:
    """Whether the optimizer asks this group's weights to move by more than a schedule's rounding.

    A learning rate of 0 asks for nothing (the first step of a warm-up from 0, the end of a cosine
    schedule). Below ``_SCHEDULE_FLOOR`` of the scheduler's base learning rate (``initial_lr``,
    set by every ``torch.optim.lr_scheduler``), the schedule itself asks for vanishing updates:
    float32 rounds away updates of 1e-9, which is the last steps of an annealing to 0 doing what
    they were designed to, not a precision bug.
    """
    lr = _learning_rate(group)
    base = group.get("initial_lr")
    if isinstance(base, (int, float, Tensor)) and float(base) > 0.0:
        return lr >= _SCHEDULE_FLOOR * float(base)
    return lr > 0.0


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
        self._generator = torch.Generator().manual_seed(seed)
        self._indices: dict[int, Tensor] = {}
        self._samplings = 0
        self._step_hooks: list[Any] = []
        self._fwd_hooks: list[Any] = []
        self._relus: list[tuple[str, nn.Module]] = []
        self._structural: set[int] = set()
        self._zero_streaks: dict[int, tuple[int, int]] = {}  # id(param) -> (zero steps, updates seen)
        self._peak_norms: dict[int, float] = {}  # optimizer index -> largest global gradient norm
        self._loss_start: float | None = None  # mean of the first _LOSS_START_STEPS losses
        self._loss_count = 0
        self._loss_level = EMA(0.1)  # the loss, smoothed over every optimizer step
        self._updates = 0  # optimizer steps taken with a nonzero learning rate
        self._alive: dict[str, Tensor] = {}
        self._alive_step = -1
        self._armed_step = -1
        self._last_log = -1
        self._stale_before: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._pending_stale: tuple[int, list[int], list[str], Tensor] | None = None

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
    def declare_layout(self, hub: Driver) -> None:
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
    def on_start(self, run: Run) -> None:
        self._relus = [(n or "(root)", m) for n, m in run.model.named_modules() if isinstance(m, RELU_FAMILY)]
        self._structural = {id(m.weight) for m in run.model.modules() if isinstance(m, _EMBEDDINGS)}
        # Lightning runs the closure (forward, backward, on_before_optimizer_step) *inside*
        # optimizer.step, so a step pre-hook fires before the gradients exist: the weights are
        # sampled in on_before_optimizer_step and again in the post-hook, right after the update.
        for optimizer in run.optimizers:
            self._step_hooks.append(optimizer.register_step_post_hook(self._after_step))

    @override
    def on_batch_start(self, run: Run, batch: Any, batch_idx: int) -> None:
        step = run.global_step
        if self._alive_step != step:  # a new optimizer step (not the next micro-batch of this one)
            self._alive, self._alive_step = {}, step
        if self.dead_units and self._relus and not self._fwd_hooks and self.should_run(run):
            self._fwd_hooks = [m.register_forward_hook(self._record_units(name)) for name, m in self._relus]

    def _record_units(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor) and module.training:
                live = active_units(module, output)
                seen = self._alive.get(name)
                self._alive[name] = live if seen is None or seen.shape != live.shape else seen | live

        return hook

    def _remove_forward_hooks(self) -> None:
        for handle in self._fwd_hooks:
            handle.remove()
        self._fwd_hooks = []

    @override
    def on_optimizer_step(self, run: Run, optimizer: Any) -> None:
        if self.should_run(run):
            self._remove_forward_hooks()
            self._check(run, optimizer)
            if self.stale_updates:
                self._sample_before(optimizer, run.global_step)
        else:
            self._whole_zero_from_shared_norms(run, optimizer)
        every = self.histogram_every_n_steps
        if every is not None and run.global_step % every == 0:
            self._histograms(run, optimizer)

    @override
    def on_batch_end(self, run: Run, batch: Any, batch_idx: int) -> None:
        self._remove_forward_hooks()
        self._stale_before = []  # a step the GradScaler skipped never reached the post-hook

    @override
    def on_training_end(self, run: Run) -> None:
        if self._pending_stale is not None and self.driver is not None:
            self._judge_stale(run, self._pending_stale, self._pending_stale[3].cpu(), log=True)
            self._pending_stale = None

    @override
    def on_teardown(self, run: Run) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks.clear()
        self._remove_forward_hooks()

    # ---- the monitored step ------------------------------------------------------------------
    def _check(self, run: Run, optimizer: torch.optim.Optimizer) -> None:
        hub = self.hub
        index = hub.params
        params, _ = optimizer_params_with_grad(optimizer)
        params = [p for p in params if p.grad is not None and p.grad.is_floating_point()]
        if index is None or not params:
            return
        step = run.global_step
        grads = [p.grad for p in params]
        structural = [id(p) in self._structural for p in params]
        layer_idx = [index.layer_of.get(id(p), 0) for p in params]
        dtypes = sorted({g.dtype for g in grads}, key=str)
        dtype_idx = [dtypes.index(g.dtype) for g in grads]
        n_layers = len(index.layers)

        counts = gradient_counts(grads, structural_zeros=structural)
        profile = [i for i, s in enumerate(structural) if not s and not grads[i].is_sparse]
        # per-tensor norms and the loss come from the hub's shared per-step statistics
        stats = hub.grad_step(run, optimizer)
        if stats.skipped:  # overflow the GradScaler handles: these gradients are never applied
            return
        if not math.isfinite(stats.norm):
            return  # NaN/Inf gradients: NonFiniteMonitor names the cause; zero/dead counts mean nothing
        stationary = self._at_stationary_point(stats)
        self._track_loss(stats)
        shared = {id(p): i for i, p in enumerate(stats.params)}
        rows = torch.tensor([shared[id(params[i])] for i in profile], dtype=torch.long)
        norms = stats.per_tensor[rows.to(stats.per_tensor.device)] if profile else torch.zeros(0)
        rms = layer_rms(norms, [grads[i].numel() for i in profile], [layer_idx[i] for i in profile], n_layers)
        dead_names = list(self._alive)
        device = counts.device
        parts = [counts.reshape(-1), rms.to(device)]
        parts += [
            dead_fraction(self._alive[n]).to(device=device, dtype=torch.float64).reshape(1)
            for n in dead_names
        ]
        pending = self._pending_stale
        if pending is not None:
            parts.append(pending[3].to(device=device, dtype=torch.float64).reshape(-1))
        host = torch.cat(parts).cpu()  # the one host synchronisation of this monitored step
        self._alive = {}

        pos = counts.numel()
        counts_h = host[:pos].reshape(-1, 4)
        rms_h = host[pos : pos + n_layers].tolist()
        pos += n_layers
        dead_h = host[pos : pos + len(dead_names)].tolist()
        pos += len(dead_names)
        stale_h = None
        if pending is not None:
            size = pending[3].numel()
            stale_h = host[pos : pos + size].reshape(-1, 2)
            pos += size
            self._pending_stale = None
        loss_h = math.nan if stats.loss is None else stats.loss

        loss_nonzero = math.isnan(loss_h) or abs(loss_h) > self.loss_tolerance
        values: dict[str, float] = {}
        layers = index.layers
        by_dtype = fractions(grouped_counts(counts_h, dtype_idx, len(dtypes))).tolist()
        for dt, (zero, sub, flushed) in zip(dtypes, by_dtype, strict=True):
            name = dtype_name(dt)
            values[TAG_ZERO_DTYPE + name] = zero
            values[TAG_SUB_DTYPE + name] = sub
            values[TAG_FLUSH_DTYPE + name] = flushed
        layer_counts = grouped_counts(counts_h, layer_idx, n_layers)
        by_layer = fractions(layer_counts).tolist()
        present = sorted(set(layer_idx))
        for li in present:
            zero, sub, flushed = by_layer[li]
            values[TAG_ZERO_LAYER + layers[li]] = zero
            values[TAG_SUB_LAYER + layers[li]] = sub
            values[TAG_FLUSH_LAYER + layers[li]] = flushed
        for name, frac in zip(dead_names, dead_h, strict=True):
            values[TAG_DEAD + name] = frac
        profile_layers = [li for li in range(n_layers) if not math.isnan(rms_h[li])]
        decay = depth_decay_orders([rms_h[li] for li in profile_layers])
        for li in profile_layers:
            values[TAG_RMS + layers[li]] = rms_h[li]
        if decay is not None and math.isfinite(decay):
            values[TAG_DEPTH] = decay
        log = self._log_due(run, step)
        if log:
            hub.log(run, values, step)

        # ---- alerts --------------------------------------------------------------------------
        if loss_nonzero and not stationary:
            self._judge_zero(run, params, grads, structural, counts_h, loss_h)
        # The decision uses the exact share of nonzero entries in the subnormal range; the
        # flushed-to-zero figure is an upper-bound estimate (structural zeros such as ReLU-masked
        # columns count too), so it is reported but never decides on its own. A gradient flushed
        # entirely to zero is the whole-tensor ``grad.zero`` case.
        subnormal_share = {li: by_layer[li][1] for li in present if not math.isnan(by_layer[li][1])}
        flagged = [li for li, sub in subnormal_share.items() if sub >= self.underflow_fraction]
        if flagged:
            worst = max(flagged, key=lambda li: subnormal_share[li])
            kinds = sorted({dtype_name(grads[i].dtype) for i, li in enumerate(layer_idx) if li == worst})
            zero, sub, flushed = by_layer[worst]
            hub.alert(
                run,
                "grad.underflow",
                f"{sub:.0%} of the nonzero {'/'.join(kinds)} gradient entries of {layers[worst]} are "
                f"subnormal (an estimated {flushed:.0%} of its entries flushed to zero); "
                f"{len(flagged)} layer(s) affected.",
                where=layers[worst],
                value=sub,
            )
        for name, frac in zip(dead_names, dead_h, strict=True):
            if frac >= self.dead_fraction:
                module = dict(self._relus).get(name)
                hub.alert(
                    run,
                    "grad.dead_units",
                    f"{frac:.0%} of the units of {name} ({type(module).__name__}) passed no gradient for "
                    "the whole batch.",
                    where=name,
                    value=frac,
                )
        if (
            loss_nonzero
            and depth_profile_judged(self._loss_level.value or math.nan, self._loss_start)
            and decay is not None
            and len(profile_layers) >= self.min_depth
            and decay >= self.depth_orders
        ):
            first, last = layers[profile_layers[0]], layers[profile_layers[-1]]
            hub.alert(
                run,
                "grad.vanishing",
                f"The gradient decays {decay:.1f} orders of magnitude from the last layer ({last}, "
                f"rms {rms_h[profile_layers[-1]]:.2g}) back to the first ({first}, "
                f"rms {rms_h[profile_layers[0]]:.2g}) over {len(profile_layers)} layers.",
                where=first,
                value=decay,
            )
        if pending is not None and stale_h is not None:
            self._judge_stale(run, pending, stale_h, log=log)

    def _log_due(self, run: Run, step: int) -> bool:
        """Write scalars about every ``log_every_n_steps`` (the hub's, else the Trainer's) steps.

        Decisions are made on every monitored step; writing a few dozen scalars costs more than
        counting, so the writes follow the logging cadence even when the two cadences do not align.
        """
        every = self.hub.stats.log_every_n_steps or run.log_every_n_steps
        if self._last_log < 0 or step - self._last_log >= every or step % every == 0:
            self._last_log = step
            return True
        return False

    def _whole_zero_from_shared_norms(self, run: Run, optimizer: torch.optim.Optimizer) -> None:
        """Between counting steps: a gradient whose norm is exactly 0 is entirely zero.

        Free: the per-tensor norms are the hub's shared per-step statistics (already fetched for
        the NaN check), so a layer killed mid-run (dead ReLUs after a blow-up) is reported at once.
        """
        hub = self.hub
        stats = hub.grad_step(run, optimizer)
        if stats.skipped:
            return
        self._track_loss(stats)
        if self._at_stationary_point(stats):
            return
        if hub.params is None or stats.loss is None or not abs(stats.loss) > self.loss_tolerance:
            return
        hits = [
            i
            for i, norm in enumerate(stats.per_tensor_host)
            if norm == 0.0
            and id(stats.params[i]) not in self._structural
            and not stats.params[i].grad.is_sparse  # type: ignore[union-attr]
            and stats.params[i].numel() > 0
        ]
        if self.zero_fraction >= 1.0:  # a nonzero norm ends a streak (partial zeros are counted elsewhere)
            for i, norm in enumerate(stats.per_tensor_host):
                if norm != 0.0:
                    self._zero_streaks.pop(id(stats.params[i]), None)
        if hits:
            params = [stats.params[i] for i in hits]
            rows = torch.tensor([[float(p.numel()), float(p.numel()), 0.0, 0.0] for p in params])
            self._judge_zero(
                run, params, [p.grad for p in params], [False] * len(params), rows, stats.loss
            )  # type: ignore[misc]

    def _track_loss(self, stats: GradStep) -> None:
        """The loss's start level and smoothed level (host floats the hub already fetched)."""
        loss = stats.loss
        if loss is None or not math.isfinite(loss):
            return
        self._loss_level.update(loss)
        if self._loss_count < _LOSS_START_STEPS:
            self._loss_count += 1
            start = self._loss_start or 0.0
            self._loss_start = start + (loss - start) / self._loss_count

    def _at_stationary_point(self, stats: GradStep) -> bool:
        """Track the run's peak gradient norm (per optimizer); True when this step is at a stationary point.

        Then no tensor's zero gradient is a cut path (see
        :func:`~healthmon.numerics.underflow.at_stationary_point`), and zero streaks restart.
        """
        peak = self._peak_norms.get(stats.optimizer_index, 0.0)
        if math.isfinite(stats.norm) and stats.norm > peak:
            peak = self._peak_norms[stats.optimizer_index] = stats.norm
        if not at_stationary_point(stats.norm, peak):
            return False
        for p in stats.params:
            self._zero_streaks.pop(id(p), None)
        return True

    def _judge_zero(
        self,
        run: Run,
        params: list[Tensor],
        grads: list[Tensor],
        structural: list[bool],
        counts: Tensor,
        loss: float,
    ) -> None:
        hub = self.hub
        assert hub.params is not None
        rows = counts.tolist()
        hits = [
            i
            for i, row in enumerate(rows)
            if not structural[i]
            and not grads[i].is_sparse
            and row[TOTAL] > 0
            and row[ZEROS] / row[TOTAL] >= self.zero_fraction
        ]
        hit_ids = {id(params[i]) for i in hits}
        for p in params:
            if id(p) not in hit_ids:
                self._zero_streaks.pop(id(p), None)
        hits = [i for i in hits if self._zero_streak(params[i]) >= self.zero_steps]
        if not hits:
            return
        names = [hub.params.name(params[i]) for i in hits]
        shown = ", ".join(names[:_MAX_NAMES]) + (
            f" and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else ""
        )
        what = "entirely zero" if self.zero_fraction >= 1.0 else f"at least {self.zero_fraction:.0%} zeros"
        loss_text = "unknown" if math.isnan(loss) else f"{loss:.3g}"
        hub.alert(
            run,
            "grad.zero",
            f"The gradient of {len(names)} parameter tensor(s) is {what} while the loss is {loss_text}, "
            f"and stayed so over {self.zero_steps} checked steps with optimizer updates between them: "
            f"{shown}.",
            where=names[0],
            value=rows[hits[0]][ZEROS] / rows[hits[0]][TOTAL],
        )

    def _zero_streak(self, p: Tensor) -> int:
        """Count one more zero step for ``p`` if the optimizer updated the model since the last one.

        A zero seen again before any update (a skipped step, a learning rate of 0) is no new
        evidence: the gradient could not have changed.
        """
        count, updates = self._zero_streaks.get(id(p), (0, -1))
        if updates != self._updates:
            count += 1
        self._zero_streaks[id(p)] = (count, self._updates)
        return count

    def _judge_stale(
        self,
        run: Run,
        pending: tuple[int, list[int], list[str], Tensor],
        stale: Tensor,
        *,
        log: bool,
    ) -> None:
        hub = self.hub
        assert hub.params is not None
        step, layer_idx, kinds, _ = pending
        layers = hub.params.layers
        names = sorted(set(kinds))
        by_layer = grouped_counts(stale.to(torch.float64), layer_idx, len(layers)).tolist()
        by_dtype = grouped_counts(
            stale.to(torch.float64), [names.index(k) for k in kinds], len(names)
        ).tolist()
        values: dict[str, float] = {}
        for name, (s, e) in zip(names, by_dtype, strict=True):
            if e > 0:
                values[TAG_STALE_DTYPE + name] = s / e
        worst, worst_frac, n_bad = -1, -1.0, 0
        for li in sorted(set(layer_idx)):
            s, e = by_layer[li]
            if e <= 0:
                continue
            values[TAG_STALE_LAYER + layers[li]] = s / e
            if e >= self.stale_min_samples and s / e >= self.stale_fraction:
                n_bad += 1
                if s / e > worst_frac:
                    worst, worst_frac = li, s / e
        if log:
            hub.log(run, values, step)
        if worst >= 0:
            kinds_worst = sorted({k for k, li in zip(kinds, layer_idx, strict=True) if li == worst})
            hub.alert(
                run,
                "update.stale",
                f"The optimizer step left {worst_frac:.0%} of the sampled {'/'.join(kinds_worst)} weights of "
                f"{layers[worst]} bit-identical although their gradient was nonzero (step {step}); "
                f"{n_bad} layer(s) affected.",
                where=layers[worst],
                value=worst_frac,
            )

    # ---- sampled weights before and after the optimizer's update ---------------------
    def _sample_index(self, p: Tensor) -> Tensor:
        idx = self._indices.get(id(p))
        if idx is None or idx.device != p.device:
            idx = sample_indices(p.numel(), self.stale_samples, self._generator).to(p.device)
            self._indices[id(p)] = idx
        return idx

    def _sample_before(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Sampled weights and gradients once the gradients are final, before the update."""
        self._armed_step = step
        self._samplings += 1
        if self._samplings % self.resample_every == 0:
            self._indices.clear()
        self._stale_before = []
        for group in optimizer.param_groups:
            if not _asks_for_updates(group):
                continue
            for p in group["params"]:
                g = p.grad
                if g is None or g.is_sparse or g.layout != torch.strided or not p.is_floating_point():
                    continue
                idx = self._sample_index(p)
                self._stale_before.append((p, idx, torch.take(p.detach(), idx), torch.take(g, idx)))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._awaiting_step = False
        if any(_learning_rate(group, exact=False) > 0.0 for group in optimizer.param_groups):
            self._updates += 1
        if not self._stale_before or self.driver is None or self.driver.params is None:
            return
        index = self.driver.params
        rows, layer_idx, kinds = [], [], []
        for p, idx, before, grad in self._stale_before:
            rows.append(stale_counts(before, torch.take(p.detach(), idx), grad))
            layer_idx.append(index.layer_of.get(id(p), 0))
            kinds.append(dtype_name(p.dtype))
        self._stale_before = []
        self._pending_stale = (self._armed_step, layer_idx, kinds, torch.stack(rows))

    # ---- histograms ------------------------------------------------------------------------------
    def _histograms(self, run: Run, optimizer: torch.optim.Optimizer) -> None:
        hub = self.hub
        if hub.output.writer is None or hub.params is None:
            return
        per_layer: dict[int, list[Tensor]] = {}
        for p in optimizer_params_with_grad(optimizer)[0]:
            if p.grad is not None and p.grad.is_floating_point():
                per_layer.setdefault(hub.params.layer_of.get(id(p), 0), []).append(log10_magnitudes(p.grad))
        for li, parts in per_layer.items():
            values = torch.cat(parts)
            if values.numel():
                hub.histogram(run, TAG_HIST + hub.params.layers[li], values)

    # ---- checkpoints -----------------------------------------------------------------------------
    @override
    def monitor_state(self) -> dict[str, Any]:
        return {
            "samplings": self._samplings,
            "peak_norms": {str(k): v for k, v in self._peak_norms.items()},
            "loss_start": self._loss_start,
            "loss_count": self._loss_count,
            "loss_level": self._loss_level.value,
        }

    @override
    def load_monitor_state(self, state: dict[str, Any]) -> None:
        self._samplings = int(state.get("samplings", 0))
        self._peak_norms = {int(k): float(v) for k, v in state.get("peak_norms", {}).items()}
        self._loss_start = state.get("loss_start")
        self._loss_count = int(state.get("loss_count", 0))
        self._loss_level.value = state.get("loss_level")
