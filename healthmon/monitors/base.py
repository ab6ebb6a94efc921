"""The base of healthmon's monitors: cadence, policy, checkpoint state and the driver's hooks.

A monitor implements the points of a training step it needs (``on_batch_start``, ``on_loss``,
``on_optimizer_step``, ``on_batch_end``, ...) against a :class:`~healthmon.engine.run.Run` and
writes through its :class:`~healthmon.engine.driver.Driver`; it never sees a particular trainer.

A monitor is also a Lightning callback of its own, for ``Trainer(callbacks=[GradientNormMonitor()])``:
it is then a bundle of one. The monitors of one Trainer share one driver, so that a run has one
report with every monitor's alerts: a ``HealthMonitor``'s when the Trainer has one (the monitor
joins its bundle), else one driven by the first standalone monitor in the callback list, whose
policy is the strictest of theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import pytorch_lightning as pl
from torch import Tensor
from typing_extensions import override

from healthmon import _checks
from healthmon._checks import Cadence
from healthmon.alerts import Alert, AlertPolicy, OnAlert, Severity, severity_rank
from healthmon.engine.driver import Driver
from healthmon.engine.run import Run
from healthmon.integrations.lightning import LightningHooks
from healthmon.schedules import DEFAULT_OVERHEAD_BUDGET, SampledEvery


def strictest_policy(policies: list[AlertPolicy]) -> AlertPolicy:
    """One policy for monitors that share a driver.

    The strongest action ("raise" > "stop" > "warn") at the lowest ``fail_on`` of those that act.
    """
    acting = [p for p in policies if p.on_alert != "warn"]
    if not acting:
        return AlertPolicy("warn", min((p.fail_on for p in policies), key=severity_rank, default="warning"))
    on_alert = max((p.on_alert for p in acting), key=("warn", "stop", "raise").index)
    return AlertPolicy(on_alert, min((p.fail_on for p in acting), key=severity_rank))


def _every_checked_step(step: int) -> bool:
    return True


class Monitor(LightningHooks):
    """Common machinery of the healthmon monitors.

    Args:
        every_n_steps: run the check every N optimizer steps, or a callable ``step -> bool``;
            None: on the steps the driver checks (every step unless that costs more than the
            bundle's ``overhead_budget``, see :class:`~healthmon.schedules.CheckBudget`).
        on_alert: "warn" (record and warn), "raise" (:class:`NumericalHealthError` inside ``fit``)
            or "stop" (skip the offending step and stop the Trainer cleanly). Used only when the
            monitor runs on its own; inside ``HealthMonitor`` the bundle's policy applies.
        fail_on: lowest severity that raises or stops.
        log_every_n_steps: how often scalars are written; None follows the loop's setting.
    """

    #: Monitors that intercept the forward pass (a TorchFunctionMode) run after the others in a
    #: bundle, so that extra computation of other monitors (probe passes) is not intercepted.
    intercepts_forward: ClassVar[bool] = False

    #: The points a monitor is called at on steps whose gradients are not checked (see
    #: :class:`~healthmon.schedules.CheckBudget`). All by default; a monitor whose per-step work
    #: only serves the gradient checks names fewer, and those steps cost it nothing.
    unchecked_points: ClassVar[frozenset[str]] = frozenset({"on_batch_start", "on_loss", "on_batch_end"})

    def __init__(
        self,
        *,
        every_n_steps: Cadence | None = None,
        on_alert: OnAlert = "warn",
        fail_on: Severity = "warning",
        log_every_n_steps: int | None = None,
    ) -> None:
        self.every_n_steps = None if every_n_steps is None else _checks.check_cadence(every_n_steps)
        self._schedule = _every_checked_step if every_n_steps is None else _checks.cadence(every_n_steps)
        self.policy = AlertPolicy(on_alert, fail_on)
        if log_every_n_steps is not None:
            _checks.positive_int(log_every_n_steps, "log_every_n_steps")
        self.log_every_n_steps = log_every_n_steps
        self._driver: Driver | None = None  # set by the driver that runs this monitor (bind)
        self._bundled = False  # constructed into a HealthMonitor's bundle
        self._pending_state: dict[str, Any] | None = None  # driver state loaded before setup

    # ---- public --------------------------------------------------------------------------
    @property
    def driver(self) -> Driver:
        """The driver this monitor writes through (raises before it is attached)."""
        if self._driver is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a training loop yet.")
        return self._driver

    def bind(self, driver: Driver) -> None:
        """Write through ``driver`` from now on (called by :meth:`Driver.add`)."""
        self._driver = driver

    @property
    def alerts(self) -> list[Alert]:
        """Alerts of every monitor sharing this monitor's driver (the run's report), in the order detected.

        De-duplicated; see ``Alert.count``.
        """
        return [] if self._driver is None else self._driver.alerts

    @property
    def report_path(self) -> str | None:
        """Where the run's report is written (None before the monitor joins a driver, or off rank zero)."""
        return None if self._driver is None else self._driver.report_path

    def config(self) -> dict[str, Any]:
        """The settings recorded in the report and TensorBoard's configuration text."""
        every = self.every_n_steps
        if every is None:
            return {"every_n_steps": "checked steps"}
        if isinstance(every, SampledEvery):
            return {"every_n_steps": f"{every.every} (x the overhead budget's stretch)"}
        return {"every_n_steps": every if isinstance(every, int) else getattr(every, "__name__", repr(every))}

    def should_run(self, run: Run) -> bool:
        """Whether this step is on the monitor's cadence."""
        return self.due_at(run.global_step)

    def due_at(self, step: int) -> bool:
        """Whether ``step`` is on the monitor's cadence (a sampled cadence as the budget stretches it)."""
        every = self.every_n_steps
        if isinstance(every, SampledEvery) and self._driver is not None:
            return every(step, self._driver.stats.budget.stretch)
        return bool(self._schedule(step))

    def next_due(self, step: int) -> int | None:
        """The first step after ``step`` on the monitor's cadence; None where only :meth:`due_at` can say.

        Exact for an int period and a :class:`~healthmon.schedules.SampledEvery` (at the budget's
        current stretch, which only grows: a later stretch never makes an earlier step due).
        """
        every = self.every_n_steps
        if isinstance(every, SampledEvery):
            period = every.every * (self._driver.stats.budget.stretch if self._driver is not None else 1)
        elif isinstance(every, int):
            period = every
        else:
            return None
        return (step // period + 1) * period

    @property
    def sample_period(self) -> int | None:
        """The period of a :class:`~healthmon.schedules.SampledEvery` cadence (None: another cadence)."""
        every = self.every_n_steps
        return every.every if isinstance(every, SampledEvery) else None

    def declare_layout(self, driver: Driver) -> None:
        """Add this monitor's charts to the custom-scalars layout (override)."""

    @property
    def state_key(self) -> str:
        """The key of this monitor's state in a Lightning checkpoint (its class and cadence)."""
        return self._generate_state_key(every_n_steps=str(self.every_n_steps))

    # ---- the points of a step (override what the monitor needs) ----------------------------
    def on_setup(self, run: Run) -> None:
        """A fit begins (parameters are indexed, the writer is open): declare charts."""
        if self._driver is not None:
            self.declare_layout(self._driver)

    def on_start(self, run: Run) -> None:
        """The first step is next: read the loop's settings (clipping, planned steps)."""

    def on_batch_start(self, run: Run, batch: Any, batch_idx: int) -> None:
        """A micro-batch starts (before the forward pass)."""

    def on_loss(self, run: Run, loss: Tensor) -> None:
        """A micro-batch's loss is about to be backpropagated (scaled under fp16 AMP)."""

    def on_optimizer_step(self, run: Run, optimizer: Any) -> None:
        """Gradients are complete and unscaled, before clipping and the step."""

    def on_unchecked_losses(self, run: Run, optimizer: Any, losses: Sequence[tuple[int, float]]) -> None:
        """The finite losses of steps whose gradients were not checked, as (global step, loss), in order.

        Handed over together, so that an unchecked step calls no monitor: before the next step
        whose ``on_optimizer_step`` runs, before another optimizer's, and when training ends.
        """

    def needs_step(self, step: int) -> bool:
        """Whether global step ``step`` must reach this monitor's every point (override).

        The driver plans these steps ahead with the checked ones, so a monitor that samples the
        forward pass on steps of its own says them here instead of naming ``unchecked_points``:
        the other steps then do not call it at all.
        """
        return False

    def next_needed(self, step: int) -> int | None:
        """The first step after ``step`` that :meth:`needs_step`; None where only it can say (override)."""
        return None

    def on_batch_end(self, run: Run, batch: Any, batch_idx: int) -> None:
        """A micro-batch ended (after the optimizer step when it was the last of a step)."""

    def on_training_end(self, run: Run) -> None:
        """The training loop finished."""

    def on_end(self, run: Run, error: BaseException | None) -> None:
        """The fit ended, normally or by ``error``."""

    def on_teardown(self, run: Run) -> None:
        """Release what the monitor holds (modes, hooks)."""

    # ---- resumable state -------------------------------------------------------------------
    def monitor_state(self) -> dict[str, Any]:
        """Resumable state of this monitor (override): running statistics, warm starts..."""
        return {}

    def load_monitor_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`monitor_state` (override)."""

    # ---- as a Lightning callback of its own --------------------------------------------------
    @override
    def attach(self, trainer: pl.Trainer) -> Driver | None:
        """Join the one driver of this Trainer's healthmon callbacks (see the module docstring)."""
        callbacks = list(getattr(trainer, "callbacks", None) or [])
        peers = [cb for cb in callbacks if isinstance(cb, Monitor) and not cb._bundled]
        if self not in peers:
            peers.append(self)
        bundle = next(
            (cb for cb in callbacks if isinstance(cb, LightningHooks) and not isinstance(cb, Monitor)), None
        )
        if bundle is not None:
            driver: Driver = bundle.driver  # type: ignore[attr-defined]  # the bundle (HealthMonitor) has one
            driver.add(self)
            driver.policy = strictest_policy([driver.policy, self.policy])
            driver.config[type(self).__name__] = self.config()
            return None
        if peers[0] is not self:
            return None  # the first standalone monitor drives every peer
        every = next((m.log_every_n_steps for m in peers if m.log_every_n_steps is not None), None)
        driver = Driver(
            peers,
            strictest_policy([m.policy for m in peers]),
            log_every_n_steps=every,
            overhead_budget=DEFAULT_OVERHEAD_BUDGET,
        )
        for m in peers:
            driver.config[type(m).__name__] = m.config()
        if self._pending_state is not None:
            driver.load_state_dict(self._pending_state)
            self._pending_state = None
        return driver

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self.monitor_state()
        if self._lightning_driver is not None:
            state["hub"] = self._lightning_driver.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "hub" in state_dict:
            if self._lightning_driver is not None:
                self._lightning_driver.load_state_dict(state_dict["hub"])
            else:
                self._pending_state = dict(state_dict["hub"])
        self.load_monitor_state(state_dict)
