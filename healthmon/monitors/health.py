"""HealthMonitor: the default bundle of monitors with one shared alert book, policy and writer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from healthmon import _checks
from healthmon.alerts import Alert, AlertPolicy, OnAlert, Severity
from healthmon.monitors.base import Monitor, strictest_policy
from healthmon.monitors.gradient_norm import GradientNormMonitor
from healthmon.monitors.hessian import HessianEigenMonitor
from healthmon.monitors.hub import Hub
from healthmon.monitors.logits import LogitsCheck
from healthmon.monitors.nonfinite import NonFiniteMonitor
from healthmon.monitors.underflow import GradientUnderflowMonitor

PER_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


def default_monitors() -> list[Monitor]:
    """The monitors ``HealthMonitor()`` runs, each with its default (cheap) cadence."""
    return [
        NonFiniteMonitor(),
        GradientNormMonitor(),
        GradientUnderflowMonitor(),
        HessianEigenMonitor(),
        LogitsCheck(),
    ]


class HealthMonitor(Callback):
    """Watch a run's numerical health: add it to ``Trainer(callbacks=[...])`` and change nothing else.

    Args:
        on_alert: "warn" records and warns; "raise" raises ``NumericalHealthError`` inside ``fit``
            at the first alert at or above ``fail_on``; "stop" skips the offending optimizer step
            and asks the Trainer to stop cleanly.
        fail_on: lowest severity that raises or stops ("info", "warning" or "error").
        monitors: the monitors to run; default :func:`default_monitors`. Pass configured
            instances to change a cadence or a threshold.
        log_every_n_steps: how often scalars are written; None follows the Trainer's setting.
        report: write the JSON report beside the event files at the end of fit.
        summary: print the end-of-fit summary on rank zero.
    """

    def __init__(
        self,
        *,
        on_alert: OnAlert = "warn",
        fail_on: Severity = "warning",
        monitors: Sequence[Monitor] | None = None,
        log_every_n_steps: int | None = None,
        report: bool = True,
        summary: bool = True,
    ) -> None:
        self.policy = AlertPolicy(on_alert, fail_on)
        if log_every_n_steps is not None:
            _checks.positive_int(log_every_n_steps, "log_every_n_steps")
        for name, flag in (("report", report), ("summary", summary)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}`: expected True or False, got {flag!r}.")
        if monitors is None:
            monitors = default_monitors()
        else:
            monitors = list(monitors)
            for i, m in enumerate(monitors):
                if not isinstance(m, Monitor):
                    raise TypeError(f"`monitors[{i}]`: expected a healthmon monitor instance, got {m!r}.")
            kinds = [type(m).__name__ for m in monitors]
            duplicates = sorted({k for k in kinds if kinds.count(k) > 1})
            if duplicates:
                raise ValueError(
                    f"`monitors`: expected at most one monitor of each kind, got two of {duplicates}."
                )
        # stable: interceptors of the forward pass last (see Monitor.intercepts_forward)
        self.monitors: list[Monitor] = sorted(monitors, key=lambda m: m.intercepts_forward)
        self.hub = Hub(
            self.policy, log_every_n_steps=log_every_n_steps, write_report=report, print_summary=summary
        )
        for m in self.monitors:
            m.bind(self.hub)
        # Per-step hooks go only to monitors that implement them: the base class's versions do
        # nothing for a bundled monitor, and this loop runs several times every step.
        self._per_step: dict[str, list[Monitor]] = {
            hook: [m for m in self.monitors if getattr(type(m), hook) is not getattr(Monitor, hook)]
            for hook in PER_STEP_HOOKS
        }

    # ---- public --------------------------------------------------------------------------
    @property
    def alerts(self) -> list[Alert]:
        """Alerts in the order detected, de-duplicated by (code, where) with counts."""
        return self.hub.book.alerts

    @property
    def report_path(self) -> str | None:
        """The JSON report beside the TensorBoard event files (written at the end of fit)."""
        return self.hub.report_path

    @property
    def log_dir(self) -> str | None:
        return self.hub.log_dir

    def monitor(self, kind: type[Monitor]) -> Monitor | None:
        """The bundled monitor of a given class, if any."""
        return next((m for m in self.monitors if isinstance(m, kind)), None)

    def config(self) -> dict[str, Any]:
        return {
            "on_alert": self.policy.on_alert,
            "fail_on": self.policy.fail_on,
            "monitors": {type(m).__name__: m.config() for m in self.monitors},
        }

    # ---- Lightning hooks: drive the hub, then each monitor ------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.hub.setup(trainer, pl_module)
        self.hub.config.update(self.config())
        # standalone monitors on the same Trainer join this hub (see Monitor._share_hub)
        peers = [cb for cb in trainer.callbacks if isinstance(cb, Monitor) and not cb._bundled]
        self.hub.policy = strictest_policy([self.policy] + [m.policy for m in peers])
        for m in self.monitors:
            m.setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for m in self.monitors:
            m.on_fit_start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for m in self.monitors:
            m.on_train_start(trainer, pl_module)
        self.hub.start(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.hub.step_now = trainer.global_step
        try:
            for m in self._per_step["on_train_batch_start"]:
                m.on_train_batch_start(trainer, pl_module, batch, batch_idx)
        finally:
            self.hub.step_now = None

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.hub.add_loss(loss)
        for m in self._per_step["on_before_backward"]:
            m.on_before_backward(trainer, pl_module, loss)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for m in self._per_step["on_after_backward"]:
            m.on_after_backward(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.hub.step_now = trainer.global_step
        try:
            for m in self._per_step["on_before_optimizer_step"]:
                m.on_before_optimizer_step(trainer, pl_module, optimizer)
            self.hub.end_step()  # the next optimizer step (of this or another optimizer) gets its own loss
            self.hub.enforce_policy(trainer, optimizer)
        finally:
            self.hub.step_now = None

    @override
    def on_before_zero_grad(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for m in self._per_step["on_before_zero_grad"]:
            m.on_before_zero_grad(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.hub.step_now = trainer.global_step
        try:
            for m in self._per_step["on_train_batch_end"]:
                m.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.hub.enforce_policy(trainer)
            if self.hub.is_log_step(trainer):
                self.hub.gather_alerts(trainer)
        finally:
            self.hub.step_now = None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for m in self.monitors:
            m.on_train_epoch_end(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for m in self.monitors:
            m.on_train_end(trainer, pl_module)
        self.hub.gather_alerts(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for m in self.monitors:
            m.on_fit_end(trainer, pl_module)
        self.hub.finish(trainer, "stopped" if self.hub.stop_requested else "completed")

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        for m in self.monitors:
            m.on_exception(trainer, pl_module, exception)
        self.hub.finish(trainer, "exception", exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for m in self.monitors:
            m.teardown(trainer, pl_module, stage)
        self.hub.close()

    # ---- checkpoints -------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "hub": self.hub.state_dict(),
            "monitors": {type(m).__name__: m.monitor_state() for m in self.monitors},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.hub.load_state_dict(state_dict.get("hub", {}))
        saved = state_dict.get("monitors", {})
        for m in self.monitors:
            if type(m).__name__ in saved:
                m.load_monitor_state(saved[type(m).__name__])
