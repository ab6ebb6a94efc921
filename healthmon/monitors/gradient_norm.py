"""GradientNormMonitor: gradient norm against loss, per-layer norms, update ratios, trend alerts."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from typing_extensions import override

from healthmon import _checks
from healthmon._checks import Cadence
from healthmon.alerts import OnAlert, Severity
from healthmon.monitors.base import Monitor
from healthmon.monitors.hub import Hub
from healthmon.numerics.gradients import global_norm, tensor_norms, update_ratios
from healthmon.numerics.trends import (
    CollapseRule,
    DivergenceRule,
    OpposingTrendRule,
    SpikeRule,
    load_rule_state,
    rule_state,
)

TAG_LOSS = "healthmon/loss"
TAG_NORM = "healthmon/grad/norm"
TAG_NORM_CLIPPED = "healthmon/grad/norm_clipped"
TAG_LAYER = "healthmon/grad/layer/"
TAG_GROUP = "healthmon/grad/group/"
TAG_UPDATE_RATIO = "healthmon/update_ratio/"
TAG_OPTIMIZER = "healthmon/optimizer_{}/"
RULES = ("spike", "collapse", "divergence", "opposing")


def optimizer_tag(tag: str, index: int) -> str:
    """The tag of optimizer ``index``: optimizer 0 keeps the contract tags (``healthmon/loss``,
    ``healthmon/grad/norm``); optimizer k > 0 gets ``healthmon/optimizer_k/loss``, ..."""
    return tag if index == 0 else TAG_OPTIMIZER.format(index) + tag.removeprefix("healthmon/")


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

    Args:
        every_n_steps: steps at which the statistics are computed (default every step: the trend
            rules need the series).
        spike_factor: how far above the running level a norm is an explosion.
        warmup_steps: steps before the spike and collapse rules judge.
        collapse_orders: orders of magnitude of decay that count as a collapse.
        blowup_factor: recent loss level / early loss level that counts as blowing up.
        divergence_window: steps over which a steady loss rise is judged.
        divergence_rise: relative rise over the window that counts as divergence.
        update_ratios: log ||update|| / ||weight|| per layer on logged steps.
        on_alert: see :class:`~healthmon.monitors.base.Monitor`.
        fail_on: see :class:`~healthmon.monitors.base.Monitor`.
        log_every_n_steps: see :class:`~healthmon.monitors.base.Monitor`.
    """

    def __init__(
        self,
        *,
        every_n_steps: Cadence = 1,
        spike_factor: float = 10.0,
        warmup_steps: int = 20,
        collapse_orders: float = 3.0,
        blowup_factor: float = 10.0,
        divergence_window: int = 50,
        divergence_rise: float = 0.5,
        update_ratios: bool = True,
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
        self.warmup_steps = _checks.positive_int(warmup_steps, "warmup_steps", minimum=0)
        self.collapse_orders = _checks.positive_float(collapse_orders, "collapse_orders")
        self.blowup_factor = _checks.positive_float(blowup_factor, "blowup_factor", above=1.0)
        self.divergence_window = _checks.positive_int(divergence_window, "divergence_window", minimum=3)
        self.divergence_rise = _checks.positive_float(divergence_rise, "divergence_rise")
        if not isinstance(update_ratios, bool):
            raise TypeError(f"`update_ratios`: expected True or False, got {update_ratios!r}.")
        self.update_ratios = update_ratios
        self._reset_rules()
        self._hooks: list[Any] = []
        self._snapshot: list[Tensor] | None = None
        self._snapshot_params: list[Tensor] = []
        self._clip_on = False
        self._snapshot_step = 0

    def _reset_rules(self) -> None:
        self._rules: dict[int, dict[str, Any]] = {}

    def _new_rules(self) -> dict[str, Any]:
        return {
            "spike": SpikeRule(factor=self.spike_factor, warmup=self.warmup_steps),
            "collapse": CollapseRule(orders=self.collapse_orders, warmup=self.warmup_steps),
            "divergence": DivergenceRule(
                blowup=self.blowup_factor, window=self.divergence_window, rise=self.divergence_rise
            ),
            "opposing": OpposingTrendRule(),
        }

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
        }

    @override
    def declare_layout(self, hub: Hub) -> None:
        hub.declare_layout(
            "healthmon: gradients",
            {
                "gradient norm vs loss": [TAG_NORM, TAG_LOSS],
                "gradient norm before / after clipping": [TAG_NORM, TAG_NORM_CLIPPED],
                "per-layer gradient norms": [TAG_LAYER + ".*"],
                "update / weight ratio per layer": [TAG_UPDATE_RATIO + ".*"],
                "further optimizers: gradient norm vs loss": [r"healthmon/optimizer_\d+/.*"],
            },
        )

    # ---- hooks -------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._clip_on = bool(trainer.gradient_clip_val) if pl_module.automatic_optimization else False
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._after_step))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.should_run(trainer):
            self._check(trainer, optimizer)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _check(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        hub = self.hub
        stats = hub.grad_step(trainer, optimizer)
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
            if (self.update_ratios or self._clip_on) and stats.params:
                # Weights before the update; the post-step hook measures the update and, with
                # clipping on, the clipped gradient (clipping runs after this hook, in place).
                self._snapshot_step = step
                self._snapshot_params = stats.params
                self._snapshot = [p.detach().clone() for p in stats.params] if self.update_ratios else []
        hub.log(trainer, values, step)
        if not stats.skipped:  # a step the GradScaler skips says nothing about the trends
            self._judge(trainer, stats.norm, stats.loss, index)

    def _judge(self, trainer: pl.Trainer, norm: float, loss: float | None, optimizer_index: int = 0) -> None:
        hub = self.hub
        rules = self.rules(optimizer_index)
        # several optimizers: say which one, and keep their alerts apart (de-duplication key)
        where = f"optimizer {optimizer_index}" if len(trainer.optimizers) > 1 else None
        of = f" ({where})" if where else ""
        ratio = rules["spike"].update(norm, loss)
        if ratio is not None:
            hub.alert(
                trainer,
                "grad.explosion",
                f"Gradient norm{of} {norm:.3g} is {ratio:.3g}x its running level, and "
                f"{rules['spike'].reason}.",
                where=where,
                value=norm,
            )
        drop = rules["collapse"].update(norm, loss)
        if drop is not None:
            hub.alert(
                trainer,
                "grad.vanishing",
                f"Gradient norm{of} {norm:.3g} collapsed {drop:.1f} orders of magnitude below its peak "
                "while the loss is still high.",
                where=where,
                value=norm,
            )
        if loss is None:
            return
        reason = rules["divergence"].update(loss, norm)
        if reason is not None:
            hub.alert(trainer, "loss.divergence", f"The loss{of} {reason}.", where=where, value=loss)
        trend = rules["opposing"].update(norm, loss)
        if trend is not None:
            hub.alert(
                trainer,
                "grad.norm_rising",
                f"Over the last {rules['opposing'].window} steps the gradient norm{of} rose "
                f"(correlation {trend[0]:.2f}) while the loss fell ({trend[1]:.2f}).",
                where=where,
            )

    # ---- optimizer step hook: the update itself, and the gradient after clipping ----------------
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params, before = self._snapshot_params, self._snapshot
        self._snapshot, self._snapshot_params = None, []
        if before is None or self._hub is None or self._hub.params is None or not params:
            return
        hub, step = self._hub, self._snapshot_step
        if self._clip_on:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                norm = global_norm(tensor_norms(grads))
                hub.defer(norm, lambda v: hub.log(self._trainer, {TAG_NORM_CLIPPED: v[0]}, step))
        if not before:
            return
        idx = [hub.params.layer_of.get(id(p), 0) for p in params]
        layers = hub.params.layers
        ratio = update_ratios(before, [p.detach() for p in params], torch.tensor(idx), len(layers))
        present = sorted(set(idx))

        def log_ratios(values: list[float]) -> None:
            hub.log(self._trainer, {TAG_UPDATE_RATIO + layers[i]: values[i] for i in present}, step)

        hub.defer(ratio, log_ratios)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._snapshot, self._snapshot_params = None, []  # the step was skipped (AMP inf) if still set
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        super().teardown(trainer, pl_module, stage)

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
