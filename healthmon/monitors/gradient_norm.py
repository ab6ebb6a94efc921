"""GradientNormMonitor: gradient norm against loss, per-layer norms, update ratios, trend alerts.

The decisions live in :mod:`healthmon.numerics`: the trend rules and their findings
(:mod:`~healthmon.numerics.gradient_trends`), the first-step explosion rule and its hint by cause
(:mod:`~healthmon.numerics.first_step`), clipping (:mod:`~healthmon.numerics.clipping`); this
module feeds them from the Lightning hooks and turns findings into alerts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from healthmon import _checks, tags
from healthmon._checks import Cadence
from healthmon.alerts import OnAlert, Severity
from healthmon.engine.driver import Driver
from healthmon.engine.run import Run
from healthmon.engine.step_stats import optimizer_index
from healthmon.monitors.base import Monitor
from healthmon.numerics.clipping import clipped_norm
from healthmon.numerics.first_step import (
    MeasuredStep,
    first_step_finding,
    in_first_steps,
    is_recurrent,
    judge_measured_step,
    measure_step,
    update_ratios,
)
from healthmon.numerics.gradient_trends import RULES, judge_loss, judge_trends, trend_rules
from healthmon.numerics.scale_invariance import NormalisedLayers
from healthmon.numerics.trends import load_rule_state, rule_state
from healthmon.numerics.update_size import (
    SENSITIVITY_LIMIT,
    UPDATE_RATIO_LIMIT,
    OversizedStep,
    UpdateSampler,
    layer_update_table,
)
from healthmon.schedules import LogCadence

TAG_LOSS = tags.LOSS
TAG_NORM = tags.GRAD_NORM
TAG_NORM_CLIPPED = tags.GRAD_NORM_CLIPPED
TAG_LAYER = tags.GRAD_LAYER.prefix
TAG_GROUP = tags.GRAD_GROUP.prefix
TAG_UPDATE_RATIO = tags.UPDATE_RATIO.prefix
TAG_OPTIMIZER = tags.OPTIMIZER_TEMPLATE


optimizer_tag = tags.optimizer_tag  # kept importable from here


class GradientNormMonitor(Monitor):
    """Global and per-layer gradient L2 norms, the loss, update/weight ratios, and trend alerts.

    Norms are measured in ``on_before_optimizer_step``: after gradients are final (accumulation
    done) and AMP-unscaled, before clipping. When clipping is on, the norm after clipping is
    logged too (``healthmon/grad/norm_clipped``, measured right before ``optimizer.step``).

    Each optimizer (manual optimisation, e.g. a GAN's generator and discriminator) has its own
    loss and norm series and its own trend rules: optimizer 0 logs ``healthmon/loss`` and
    ``healthmon/grad/norm``, optimizer k > 0 ``healthmon/optimizer_k/loss`` and
    ``healthmon/optimizer_k/grad/norm``. Steps the ``GradScaler`` skips (overflow) log the loss
    but feed no trend rule.

    Alerts: ``grad.explosion`` (norm > ``spike_factor`` x its running level, and 4 standard
    deviations of its log-noise above it, that the run does not shrug off: a record
    ``spike_factor`` x above the largest norm seen, a loss that jumps above its start with it, or
    5 such steps in a row; see :class:`~healthmon.numerics.trends.SpikeRule`), ``grad.vanishing``
    (norm fell ``collapse_orders`` orders of magnitude below its peak while the loss is still
    above half its initial level and has climbed back from its best: a converged run is quiet),
    ``loss.divergence`` (the median of the last 5 losses above ``blowup_factor`` x the median of
    the first 10, or x the first loss while the gradient norm rose as much, on 3 consecutive
    steps, or a steady rise of ``divergence_rise`` over
    ``divergence_window`` steps on two consecutive checks; see
    :class:`~healthmon.numerics.trends.DivergenceRule`) and
    ``grad.norm_rising`` (info: norm rising while the loss falls, as in Goodfellow's figure).

    ``grad.explosion`` is also raised, with the layer as ``where``, during the spike rule's
    warm-up (its first ``warmup_steps`` steps, when it has no running level yet), by a
    history-free rule on each layer
    (:func:`~healthmon.numerics.update_size.judge_update_sizes`): the step's update exceeds
    ``update_ratio_limit`` times the layer's weights (their norm, floored at an RMS entry of
    1e-2 so zero-initialised parameters are not judged against 0), or ||g|| * ||w|| / |loss|
    exceeds ``sensitivity_limit`` (a gradient explosion that an Adam-type optimizer's normalised
    first update would hide). A layer whose output goes straight into a normalisation (a conv
    before BatchNorm: scale-invariant, seen in the first training forward pass) is judged by its
    sensitivity only: a step many times its weights only grows them. The update is measured on
    those steps and on logged steps (for
    the ratio charts; every ``stretch``-th log interval where the overhead budget spaces out the
    sampled checks) only, on sampled entries (up to 4096 a tensor; small tensors whole), never
    on a full copy of the weights.

    Args:
        every_n_steps: steps at which the statistics are computed; None (default): the driver's
            checked steps (every step unless that costs more than ``overhead_budget`` of the step
            time; the trend rules then see at least every k-th step), an int forces its own cadence.
        spike_factor: how far above the running level a norm is an explosion.
        warmup_steps: steps before the spike and collapse rules judge.
        collapse_orders: orders of magnitude of decay that count as a collapse.
        blowup_factor: recent loss level / early loss level that counts as blowing up.
        divergence_window: steps over which a steady loss rise is judged.
        divergence_rise: relative rise over the window that counts as divergence.
        update_ratios: log ||update|| / ||weight|| per layer on logged steps.
        update_ratio_limit: update / weight ratio of one step that counts as rewriting a layer.
        sensitivity_limit: ||g|| * ||w|| / |loss| of a layer that counts as an exploded gradient.
        on_alert: see :class:`~healthmon.monitors.base.Monitor`.
        fail_on: see :class:`~healthmon.monitors.base.Monitor`.
        log_every_n_steps: see :class:`~healthmon.monitors.base.Monitor`.
    """

    unchecked_points = frozenset()

    def __init__(
        self,
        *,
        every_n_steps: Cadence | None = None,
        spike_factor: float = 10.0,
        warmup_steps: int = 20,
        collapse_orders: float = 3.0,
        blowup_factor: float = 10.0,
        divergence_window: int = 50,
        divergence_rise: float = 0.5,
        update_ratios: bool = True,
        update_ratio_limit: float = UPDATE_RATIO_LIMIT,
        sensitivity_limit: float = SENSITIVITY_LIMIT,
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
        self.spike_factor = _checks.positive_float(spike_factor, "spike_factor", above=1.0)
        self.warmup_steps = _checks.non_negative_int(warmup_steps, "warmup_steps")
        self.collapse_orders = _checks.positive_float(collapse_orders, "collapse_orders")
        self.blowup_factor = _checks.positive_float(blowup_factor, "blowup_factor", above=1.0)
        self.divergence_window = _checks.positive_int(divergence_window, "divergence_window", minimum=3)
        self.divergence_rise = _checks.positive_float(divergence_rise, "divergence_rise")
        self.update_ratios = _checks.boolean(update_ratios, "update_ratios")
        self.update_ratio_limit = _checks.positive_float(update_ratio_limit, "update_ratio_limit")
        self.sensitivity_limit = _checks.positive_float(sensitivity_limit, "sensitivity_limit")
        self._reset_rules()
        self._hooks: list[Any] = []
        self._sampler = UpdateSampler()
        self._measured: MeasuredStep | None = None
        self._snapshot_params: list[Tensor] = []
        self._clip_on = False
        self._several_optimizers = False
        self._unjudged: dict[int, list[tuple[int, float]]] = {}  # optimizer -> (step, loss) to judge
        self._ratio_cadence = LogCadence()  # the logged steps that measure update ratios
        self._snapshot_step = 0
        # the layers whose output goes straight into a normalisation, seen in the first forward pass
        self._watch: NormalisedLayers | None = None
        self.scale_invariant_layers: frozenset[str] | None = None

    def _reset_rules(self) -> None:
        self._rules: dict[int, dict[str, Any]] = {}

    def _new_rules(self) -> dict[str, Any]:
        return trend_rules(
            spike_factor=self.spike_factor,
            warmup=self.warmup_steps,
            collapse_orders=self.collapse_orders,
            blowup=self.blowup_factor,
            window=self.divergence_window,
            rise=self.divergence_rise,
        )

    def rules(self, optimizer_index: int = 0) -> dict[str, Any]:
        """The trend rules of one optimizer's series (created on first use)."""
        if optimizer_index not in self._rules:
            self._rules[optimizer_index] = self._new_rules()
        return self._rules[optimizer_index]

    # optimizer 0's rules, by name
    spike = property(lambda self: self.rules(0)["spike"])
    collapse = property(lambda self: self.rules(0)["collapse"])
    divergence = property(lambda self: self.rules(0)["divergence"])
    opposing = property(lambda self: self.rules(0)["opposing"])

    @override
    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "spike_factor": self.spike_factor,
            "warmup_steps": self.warmup_steps,
            "collapse_orders": self.collapse_orders,
            "blowup_factor": self.blowup_factor,
            "divergence_window": self.divergence_window,
            "divergence_rise": self.divergence_rise,
            "update_ratios": self.update_ratios,
            "update_ratio_limit": self.update_ratio_limit,
            "sensitivity_limit": self.sensitivity_limit,
        }

    @override
    def declare_layout(self, driver: Driver) -> None:
        driver.declare_layout(
            "healthmon: gradients",
            {
                "gradient norm vs loss": [TAG_NORM, TAG_LOSS],
                "gradient norm before / after clipping": [TAG_NORM, TAG_NORM_CLIPPED],
                "per-layer gradient norms": [TAG_LAYER + ".*"],
                "update / weight ratio per layer": [TAG_UPDATE_RATIO + ".*"],
                "further optimizers: gradient norm vs loss": [tags.OPTIMIZER_PATTERN],
            },
        )

    # ---- hooks -------------------------------------------------------------------------------
    @override
    def on_start(self, run: Run) -> None:
        self._current_run = run
        self._ratio_cadence = LogCadence()
        self._clip_on = run.clips_gradients
        self._several_optimizers = len(run.optimizers) > 1
        for optimizer in run.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._after_step))

    # ---- the scale-invariant layers: watched in the first micro-batch's own forward pass ------
    @override
    def on_batch_start(self, run: Run, batch: Any, batch_idx: int) -> None:
        if self.scale_invariant_layers is None and self._watch is None:
            self._watch = NormalisedLayers(run.model)
            self._watch.attach()

    @override
    def on_loss(self, run: Run, loss: Tensor) -> None:
        self._stop_watching()

    def _stop_watching(self) -> None:
        """Remove the forward hooks; keep the layers seen when a forward pass was watched.

        The first-step rule judges those layers' updates by their sensitivity only: the loss does
        not depend on their scale, so a step many times their weights is no rewrite
        (:mod:`~healthmon.numerics.scale_invariance`). The hooks only look at the training step's
        own forward pass, so the run is unchanged.
        """
        watch, self._watch = self._watch, None
        if watch is None:
            return
        watch.detach()
        self.scale_invariant_layers = frozenset(layer or "(root)" for layer in watch.layers)

    @override
    def on_optimizer_step(self, run: Run, optimizer: Any) -> None:
        if self.should_run(run):
            self._check(run, optimizer)

    def _check(self, run: Run, optimizer: torch.optim.Optimizer) -> None:
        driver = self.driver
        stats = driver.grad_step(run, optimizer)
        step, index = stats.step, stats.optimizer_index
        values: dict[str, float] = {}
        if stats.logged and stats.loss is not None:
            values[optimizer_tag(TAG_LOSS, index)] = stats.loss
        if stats.layer_norms is not None and not stats.skipped:  # a logged step
            values[optimizer_tag(TAG_NORM, index)] = stats.norm
            values.update({TAG_LAYER + name: v for name, v in stats.layer_norms.items()})
            if len(optimizer.param_groups) > 1 and stats.group_norms is not None:
                group = optimizer_tag(TAG_GROUP, index)
                values.update({f"{group}{i}": v for i, v in enumerate(stats.group_norms)})
            if self._clip_on and stats.params:
                # The post-step hook measures the clipped gradient (clipping runs after this
                # hook, in place).
                self._snapshot_step = step
                self._snapshot_params = stats.params
        self._arm_update_measure(stats, logged=stats.layer_norms is not None)
        driver.log(run, values, step)
        if not stats.skipped:  # a step the GradScaler skips says nothing about the trends
            self._judge_unchecked_losses(run, index)
            self._judge(run, stats.norm, stats.loss, index)

    @override
    def on_unchecked_losses(self, run: Run, optimizer: Any, losses: Sequence[tuple[int, float]]) -> None:
        # The divergence rule sees every step's loss, the norm rules the checked steps' norms. The
        # losses of unchecked steps are judged in order at the next checked step (or the run's
        # end), each at its own step: nothing is lost, and an unchecked step costs nothing here.
        index = optimizer_index(run, optimizer) if self._several_optimizers else 0
        self._unjudged.setdefault(index, []).extend(losses)

    def _judge_unchecked_losses(self, run: Run, index: int) -> None:
        pending = self._unjudged.pop(index, None)
        if not pending:
            return
        where = f"optimizer {index}" if self._several_optimizers else None
        rules = self.rules(index)
        for step, loss in pending:
            found = judge_loss(rules, loss, None, where)
            if found is not None:
                self.driver.report(run, found, where=where, step=step)

    @override
    def on_training_end(self, run: Run) -> None:
        for index in list(self._unjudged):
            self._judge_unchecked_losses(run, index)

    def _judge(self, run: Run, norm: float, loss: float | None, optimizer_index: int = 0) -> None:
        # several optimizers: say which one, and keep their alerts apart (de-duplication key)
        where = f"optimizer {optimizer_index}" if len(run.optimizers) > 1 else None
        for found in judge_trends(self.rules(optimizer_index), norm, loss, where):
            self.driver.report(run, found, where=where)

    # ---- the update across optimizer.step: ratios on logged steps, first-step explosions -------
    def _arm_update_measure(self, stats: Any, *, logged: bool) -> None:
        """Sample the weights before the update when the post-step hook will need them.

        On logged steps (the ratios are written) and while the spike rule has no running level
        (the update's size is judged): the rest of the run pays nothing.
        """
        log_ratios = logged and self.update_ratios and self._ratios_due(stats.step)
        judge = in_first_steps(self.rules(stats.optimizer_index)["spike"], stats.skipped)
        index = self.driver.params
        if not (log_ratios or judge) or not stats.params or index is None:
            return
        self._sampler.before(stats.params)
        self._measured = measure_step(
            stats.step,
            stats.params,
            index.layer_of,
            stats.per_tensor_host,
            stats.loss,
            log_ratios=log_ratios,
            judge=judge,
        )

    def _ratios_due(self, step: int) -> bool:
        """Whether this logged step measures the update ratios (a chart, not a rule's input).

        Every logged step; where the overhead budget spaces out the sampled checks (a model whose
        step is a few milliseconds), every ``stretch``-th log interval like them.
        """
        driver = self.driver
        stretch = driver.stats.budget.stretch
        if stretch == 1:
            return True
        return self._ratio_cadence.due(step, driver.stats.log_every(self._current_run) * stretch)

    # ---- optimizer step hook: the update itself, and the gradient after clipping ----------------
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = self._snapshot_params
        measured = self._measured
        if not params and measured is None:
            return  # nothing was armed for this step (most steps)
        self._snapshot_params, self._measured = [], None
        index = self.driver.params if self._driver is not None else None
        if index is None:
            self._sampler.disarm()
            return
        driver, step = self.driver, self._snapshot_step
        norm = clipped_norm(params) if self._clip_on else None
        if norm is not None:
            driver.defer(norm, lambda v: driver.log(self._current_run, {TAG_NORM_CLIPPED: v[0]}, step))
        weight_norms = self._sampler.weight_norms
        update_norms = self._sampler.update_norms()
        if measured is None or update_norms is None or weight_norms is None:
            return
        num_layers = len(index.layers)
        table = layer_update_table(update_norms, weight_norms, torch.tensor(measured.layer_index), num_layers)
        driver.defer(table, lambda v: self._on_update_sizes(measured, v[:num_layers], v[num_layers:]))

    def _on_update_sizes(self, measured: MeasuredStep, updates: list[float], weights: list[float]) -> None:
        driver = self.driver
        assert driver.params is not None
        layers = driver.params.layers
        if measured.log_ratios:
            ratios = update_ratios(measured, layers, updates, weights)
            driver.log(self._current_run, {TAG_UPDATE_RATIO + k: v for k, v in ratios.items()}, measured.step)
        if not measured.judge:
            return
        found = judge_measured_step(
            measured,
            layers,
            updates,
            weights,
            ratio_limit=self.update_ratio_limit,
            sensitivity_limit=self.sensitivity_limit,
            scale_invariant=self.scale_invariant_layers or (),
        )
        if found:
            self._alert_oversized(measured.step, found)

    def _alert_oversized(self, step: int, found: list[OversizedStep]) -> None:
        finding = first_step_finding(
            found,
            step,
            ratio_limit=self.update_ratio_limit,
            sensitivity_limit=self.sensitivity_limit,
            recurrent=is_recurrent(self._layer_module(found[0].layer)),
        )
        self.driver.report(self._current_run, finding, step=step)

    def _layer_module(self, name: str) -> torch.nn.Module | None:
        """The LightningModule's submodule ``name``, None when it is not one."""
        try:
            return self._current_run.model.get_submodule(name)
        except (AttributeError, RuntimeError):
            return None

    @override
    def on_batch_end(self, run: Run, batch: Any, batch_idx: int) -> None:
        # The step was skipped (AMP inf) if these are still set.
        self._stop_watching()  # no loss was backpropagated (manual optimization): keep what was seen
        self._snapshot_params, self._measured = [], None
        self._sampler.disarm()

    @override
    def on_teardown(self, run: Run) -> None:
        self._stop_watching()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @override
    def monitor_state(self) -> dict[str, Any]:
        return {
            "optimizers": {
                str(index): {name: rule_state(rule) for name, rule in rules.items()}
                for index, rules in self._rules.items()
            }
        }

    @override
    def load_monitor_state(self, state: dict[str, Any]) -> None:
        saved = state.get("optimizers")
        if saved is None:  # a checkpoint from before per-optimizer rules: optimizer 0's
            saved = {"0": {name: state[name] for name in RULES if name in state}}
        self._reset_rules()
        for index, rules in saved.items():
            mine = self.rules(int(index))
            for name in RULES:
                if name in rules:
                    load_rule_state(mine[name], rules[name])
