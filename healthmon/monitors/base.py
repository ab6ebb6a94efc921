"""The base of healthmon's callbacks: cadence, the shared hub, alert policy and checkpoint state.

Subclasses override Lightning hooks and call ``super()``: first in ``on_before_backward`` (the hub
records the loss), last in ``on_before_optimizer_step`` (a ``stop`` policy drops the step) and in
``on_train_batch_end``. Inside ``HealthMonitor`` the bundle drives the shared hub and the monitor
only reads and writes through it. Monitors used on their own (directly in ``Trainer(callbacks=...)``)
share one hub per Trainer, so a run has one report holding every monitor's alerts: a
``HealthMonitor``'s hub when the Trainer has one, else one hub driven by the last standalone
monitor in the callback list (its hooks run after the others', so the policy is enforced, the loss
reset and the report written once every monitor has seen the step).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from healthmon import _checks
from healthmon._checks import Cadence
from healthmon.alerts import Alert, AlertPolicy, OnAlert, Severity, severity_rank
from healthmon.monitors.hub import Hub


def strictest_policy(policies: list[AlertPolicy]) -> AlertPolicy:
    """One policy for callbacks that share a hub: the strongest action ("raise" > "stop" >
    "warn") at the lowest ``fail_on`` of the callbacks that act."""
    acting = [p for p in policies if p.on_alert != "warn"]
    if not acting:
        return AlertPolicy("warn", min((p.fail_on for p in policies), key=severity_rank, default="warning"))
    on_alert = max((p.on_alert for p in acting), key=("warn", "stop", "raise").index)
    return AlertPolicy(on_alert, min((p.fail_on for p in acting), key=severity_rank))


class Monitor(Callback):
    """Common machinery of the healthmon monitors.

    Args:
        every_n_steps: run the check every N optimizer steps, or a callable ``step -> bool``.
        on_alert: "warn" (record and warn), "raise" (:class:`NumericalHealthError` inside ``fit``)
            or "stop" (skip the offending step and stop the Trainer cleanly). Used only when the
            monitor runs on its own; inside ``HealthMonitor`` the bundle's policy applies.
        fail_on: lowest severity that raises or stops.
        log_every_n_steps: how often scalars are written; None follows the Trainer's
            ``log_every_n_steps``.
    """

    #: Monitors that intercept the forward pass (a TorchFunctionMode) run after the others in a
    #: bundle, so that extra computation of other monitors (probe passes) is not intercepted.
    intercepts_forward: ClassVar[bool] = False

    def __init__(
        self,
        *,
        every_n_steps: Cadence = 1,
        on_alert: OnAlert = "warn",
        fail_on: Severity = "warning",
        log_every_n_steps: int | None = None,
    ) -> None:
        self.every_n_steps = _checks.check_cadence(every_n_steps)
        self._schedule = _checks.cadence(every_n_steps)
        self.policy = AlertPolicy(on_alert, fail_on)
        if log_every_n_steps is not None:
            _checks.positive_int(log_every_n_steps, "log_every_n_steps")
        self.log_every_n_steps = log_every_n_steps
        self._hub: Hub | None = None
        self._owns_hub = False  # this monitor drives the hub (lifecycle, loss, policy, report)
        self._bundled = False  # bound by a HealthMonitor, which drives the hub

    # ---- public --------------------------------------------------------------------------
    @property
    def hub(self) -> Hub:
        if self._hub is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer yet.")
        return self._hub

    @property
    def alerts(self) -> list[Alert]:
        """Alerts in the order detected (de-duplicated; see ``Alert.count``), of every monitor
        sharing this monitor's hub (the run's report)."""
        return [] if self._hub is None else self._hub.book.alerts

    @property
    def report_path(self) -> str | None:
        return None if self._hub is None else self._hub.report_path

    def config(self) -> dict[str, Any]:
        """The settings recorded in the report and TensorBoard's hparams."""
        every = self.every_n_steps
        return {"every_n_steps": every if isinstance(every, int) else getattr(every, "__name__", repr(every))}

    def bind(self, hub: Hub) -> None:
        """Share a hub owned by a bundle (``HealthMonitor``)."""
        self._hub = hub
        self._owns_hub = False
        self._bundled = True

    def _share_hub(self, trainer: pl.Trainer) -> None:
        """Attach to the one hub of this Trainer's healthmon callbacks (see the module docstring).

        Idempotent: every standalone monitor calls it in ``setup`` and all reach the same hub and
        driver. The hub's policy is the strictest of the callbacks' policies.
        """
        callbacks = list(getattr(trainer, "callbacks", None) or [])
        peers = [cb for cb in callbacks if isinstance(cb, Monitor) and not cb._bundled]
        if self not in peers:
            peers.append(self)
        bundle = next(
            (
                cb
                for cb in callbacks
                if not isinstance(cb, Monitor) and isinstance(getattr(cb, "hub", None), Hub)
            ),
            None,
        )
        if bundle is not None:
            hub, driver, policies = bundle.hub, None, [bundle.policy]
        else:
            hub = next((m._hub for m in peers if m._owns_hub and m._hub is not None), None)
            every = next((m.log_every_n_steps for m in peers if m.log_every_n_steps is not None), None)
            hub = hub or Hub(self.policy, log_every_n_steps=every)
            driver, policies = peers[-1], []
        for m in peers:
            m._hub, m._owns_hub = hub, m is driver
        hub.policy = strictest_policy(policies + [m.policy for m in peers])

    def should_run(self, trainer: pl.Trainer) -> bool:
        hub = self._hub
        return bool(self._schedule(int(trainer.global_step) if hub is None else hub.global_step(trainer)))

    def declare_layout(self, hub: Hub) -> None:
        """Add this monitor's charts to the custom-scalars layout (override)."""

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=str(self.every_n_steps))

    # ---- Lightning hooks -----------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._bundled:
            self._share_hub(trainer)
        hub = self.hub
        if self._owns_hub:
            hub.setup(trainer, pl_module)
        if not self._bundled:
            hub.config[type(self).__name__] = self.config()
        self.declare_layout(hub)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._owns_hub:
            self.hub.start(trainer)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._owns_hub:
            self.hub.add_loss(loss)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._owns_hub:
            self.hub.end_step()
            self.hub.enforce_policy(trainer, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._owns_hub:
            self.hub.enforce_policy(trainer)
            if self.hub.is_log_step(trainer):
                self.hub.gather_alerts(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._owns_hub:
            self.hub.gather_alerts(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._owns_hub:
            self.hub.finish(trainer, "stopped" if self.hub.stop_requested else "completed")

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._owns_hub:
            self.hub.finish(trainer, "exception", exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._owns_hub:
            self.hub.close()

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self.monitor_state()
        if self._owns_hub and self._hub is not None:
            state["hub"] = self._hub.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "hub" in state_dict:
            if self._hub is None:
                self._hub = Hub(self.policy, log_every_n_steps=self.log_every_n_steps)
                self._owns_hub = True
            self._hub.load_state_dict(state_dict["hub"])
        self.load_monitor_state(state_dict)

    def monitor_state(self) -> dict[str, Any]:
        """Resumable state of this monitor (override): running statistics, warm starts..."""
        return {}

    def load_monitor_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`monitor_state` (override)."""
