"""HealthMonitor: the default bundle of monitors with one shared alert book, policy and writer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from typing_extensions import override

from healthmon.alerts import OnAlert, Severity
from healthmon.engine.driver import Driver
from healthmon.integrations.lightning import LightningHooks
from healthmon.monitors.base import Monitor
from healthmon.monitors.bundle import BundleResults, bundle_config, bundle_driver
from healthmon.schedules import DEFAULT_OVERHEAD_BUDGET


class HealthMonitor(BundleResults, LightningHooks):
    """Watch a run's numerical health: add it to ``Trainer(callbacks=[...])`` and change nothing else.

    Args:
        on_alert: "warn" records and warns; "raise" raises ``NumericalHealthError`` inside ``fit``
            at the first alert at or above ``fail_on``; "stop" skips the offending optimizer step
            and asks the Trainer to stop cleanly.
        fail_on: lowest severity that raises or stops ("info", "warning" or "error").
        monitors: the monitors to run; default :func:`default_monitors`. Pass configured
            instances to change a cadence or a threshold.
        log_every_n_steps: how often scalars are written; None follows the Trainer's setting.
        overhead_budget: the share of the step time the checks may take (default 0.01). On a
            model whose step is so short that checking every step would cost more, the gradients
            are checked at least every k-th step (k a power of two up to 64, planned after the first
            20 steps, which are all checked; log steps always are, and paid for first; k counts
            from the last checked step) and the loss
            is still checked for NaN/Inf on every step. Where even then the log steps and the
            sampled checks (underflow counts, logits checks, every 100 steps by default) overrun
            the budget, the samples space out (every 200, 400, up to 800 steps). None: check
            every step whatever it costs.
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
        overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET,
        report: bool = True,
        summary: bool = True,
    ) -> None:
        self.driver = bundle_driver(
            on_alert=on_alert,
            fail_on=fail_on,
            monitors=monitors,
            log_every_n_steps=log_every_n_steps,
            overhead_budget=overhead_budget,
            report=report,
            summary=summary,
        )
        self.policy = self.driver.policy

    # ---- public --------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The bundle's settings, as recorded in the report: the policy and every monitor's config."""
        return bundle_config(self.driver)

    # ---- as a Lightning callback ------------------------------------------------------------
    @override
    def attach(self, trainer: pl.Trainer) -> Driver | None:
        self.driver.config.update(self.config())
        return self.driver

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "hub": self.driver.state_dict(),  # the key of 0.1 checkpoints
            "monitors": {type(m).__name__: m.monitor_state() for m in self.monitors if m._bundled},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.driver.load_state_dict(state_dict.get("hub", {}))
        saved = state_dict.get("monitors", {})
        for m in self.monitors:  # adopted standalone monitors restore their own state
            if type(m).__name__ in saved:
                m.load_monitor_state(saved[type(m).__name__])
