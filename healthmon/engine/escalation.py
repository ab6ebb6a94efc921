"""Escalation: record alerts, act on the policy, and agree across ranks.

Alerts are recorded (de-duplicated) in the run's :class:`~healthmon.alerts.AlertBook`, warned
once, and written as text. At fixed points of every step the driver asks :meth:`Escalation.enforce`
whether the policy acts: under DDP all ranks agree through one boolean all-reduce and raise or stop
together instead of hanging in the next collective. Alerts first seen on another rank reach rank
zero through :meth:`Escalation.gather`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_warn

from healthmon.alerts import Alert, AlertBook, AlertPolicy, NumericalHealthError, make_alert
from healthmon.engine.run import Run
from healthmon.tags import ALERT_RECORDS, ALERTS_TEXT


class HealthWarning(UserWarning):
    """The warning category of healthmon alerts (filter it with ``warnings.filterwarnings``)."""


def alert_markdown(alert: Alert) -> str:
    """An alert as one Markdown paragraph (TensorBoard's TEXT tab)."""
    where = f" at `{alert.where}`" if alert.where else ""
    head = f"**{alert.severity}** `{alert.code}` step {alert.step}{where}"
    return f"{head}: {alert.message}  \n*Fix:* {alert.hint}"


class Escalation:
    """The alert book of a run and the policy that acts on it."""

    def __init__(self, policy: AlertPolicy) -> None:
        self.policy = policy
        self.book = AlertBook()
        self.stop_requested = False
        self._pending: Alert | None = None
        self._unsent: list[Alert] = []

    def reset(self) -> None:
        """Forget a pending decision (a new fit)."""
        self.stop_requested = False
        self._pending = None

    def record(self, alert: Alert, text: Callable[[str, str, int], None] | None = None) -> Alert:
        """Record an alert; warn and write it on its first occurrence; note it if the policy acts.

        Returns the alert as recorded (the first occurrence, whose count this one increased).
        """
        new = self.book.record(alert)
        if new is not None:
            self._unsent.append(new)
            rank_zero_warn(f"healthmon: {alert.line()} Hint: {alert.hint}", category=HealthWarning)
            if text is not None:
                text(ALERTS_TEXT, alert_markdown(alert), alert.step)
                text(ALERT_RECORDS, json.dumps(alert.to_dict()), alert.step)
        if self._pending is None and self.policy.escalates(alert):
            self._pending = new or alert
        return new or alert

    def enforce(self, run: Run, optimizer: Any = None) -> None:
        """Act on an alert that the policy escalates: raise, or stop without applying the step.

        Call on every rank at the same point of a step. Under ``stop`` the gradients of
        ``optimizer`` are dropped (set to None): torch optimizers skip parameters without a
        gradient, so the weights keep their last healthy values.
        """
        if self.policy.on_alert == "warn":
            return
        decision = self._pending is not None
        if run.world_size > 1:
            decision = run.any_rank(decision)
        if not decision:
            return
        alert = self._pending or make_alert(
            "monitor.skipped",
            run.global_step,
            "Another rank raised an alert that stops the run.",
            severity=self.policy.fail_on,
        )
        if self.policy.on_alert == "raise":
            self._pending = None
            raise NumericalHealthError(alert)
        self.stop_requested = True
        run.request_stop()
        if optimizer is not None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def gather(self, run: Run, text: Callable[[str, str, int], None] | None = None) -> None:
        """Bring alerts first seen on other ranks to rank zero (call on every rank, same step)."""
        mine = [a.to_dict() for a in self._unsent]
        self._unsent.clear()
        if run.world_size <= 1:
            return
        gathered = run.gather_objects(mine)
        if gathered is None or not run.is_global_zero:
            return
        me = run.rank
        for rank, alerts in enumerate(gathered):
            if rank == me:
                continue
            for data in alerts or []:
                remote = Alert.from_dict(data)
                remote.message = f"{remote.message} [rank {rank}]"
                self.record(remote, text)
        self._unsent.clear()

    def state_dict(self) -> dict[str, Any]:
        """The alert book's state, for a checkpoint."""
        return self.book.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the alert book from what :meth:`state_dict` saved."""
        self.book.load_state_dict(state)
