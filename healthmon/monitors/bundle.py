"""The default bundle of monitors, and one driver over a bundle with its arguments checked.

Every integration (``HealthMonitor`` for Lightning, :func:`healthmon.watch`, ``HFHealthCallback``)
builds its driver here, so that the arguments a user passes mean the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from healthmon import _checks
from healthmon.alerts import Alert, AlertPolicy, OnAlert, Severity
from healthmon.engine.driver import Driver
from healthmon.monitors.base import Monitor
from healthmon.monitors.gradient_norm import GradientNormMonitor
from healthmon.monitors.hessian import HessianEigenMonitor
from healthmon.monitors.logits import LogitsCheck
from healthmon.monitors.nonfinite import NonFiniteMonitor
from healthmon.monitors.underflow import GradientUnderflowMonitor
from healthmon.schedules import DEFAULT_OVERHEAD_BUDGET


def default_monitors() -> list[Monitor]:
    """The monitors ``HealthMonitor()`` runs, each with its default (cheap) cadence."""
    return [
        NonFiniteMonitor(),
        GradientNormMonitor(),
        GradientUnderflowMonitor(),
        HessianEigenMonitor(),
        LogitsCheck(),
    ]


def checked_monitors(monitors: Sequence[Monitor] | None) -> list[Monitor]:
    """``monitors`` as a list of distinct monitor kinds (default: :func:`default_monitors`)."""
    if monitors is None:
        return default_monitors()
    checked = list(monitors)
    for i, m in enumerate(checked):
        if not isinstance(m, Monitor):
            raise TypeError(f"`monitors[{i}]`: expected a healthmon monitor instance, got {m!r}.")
    kinds = [type(m).__name__ for m in checked]
    duplicates = sorted({k for k in kinds if kinds.count(k) > 1})
    if duplicates:
        raise ValueError(f"`monitors`: expected at most one monitor of each kind, got two of {duplicates}.")
    return checked


def bundle_driver(
    *,
    on_alert: OnAlert = "warn",
    fail_on: Severity = "warning",
    monitors: Sequence[Monitor] | None = None,
    log_every_n_steps: int | None = None,
    overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET,
    report: bool = True,
    summary: bool = True,
) -> Driver:
    """A driver over a bundle of monitors (checked), with the bundle's policy and outputs."""
    policy = AlertPolicy(on_alert, fail_on)
    _checks.optional_positive_int(log_every_n_steps, "log_every_n_steps")
    _checks.boolean(report, "report")
    budget = _checks.optional_fraction(overhead_budget, "overhead_budget")
    _checks.boolean(summary, "summary")
    bundled = checked_monitors(monitors)
    for m in bundled:
        m._bundled = True
    return Driver(
        bundled,
        policy,
        log_every_n_steps=log_every_n_steps,
        overhead_budget=budget,
        write_report=report,
        print_summary=summary,
    )


def bundle_config(driver: Driver) -> dict[str, object]:
    """The settings of a bundle, as recorded in the report and TensorBoard's configuration text."""
    return {
        "on_alert": driver.policy.on_alert,
        "fail_on": driver.policy.fail_on,
        "monitors": {type(m).__name__: m.config() for m in driver.monitors},
    }


class BundleResults:
    """What every integration's object offers the user about its run (``self.driver`` behind it)."""

    driver: Driver

    @property
    def alerts(self) -> list[Alert]:
        """Alerts in the order detected, de-duplicated by (code, where) with counts."""
        return self.driver.alerts

    @property
    def report_path(self) -> str | None:
        """The JSON report beside the TensorBoard event files (rank zero, written at the end)."""
        return self.driver.report_path

    @property
    def log_dir(self) -> str | None:
        """Where the TensorBoard event files and the report are written (rank zero)."""
        return self.driver.log_dir

    @property
    def monitors(self) -> list[Monitor]:
        """The monitors the driver runs (forward-pass interceptors last)."""
        return list(self.driver.monitors)

    def monitor(self, kind: type[Monitor]) -> Monitor | None:
        """The bundled monitor of a given class, if any."""
        return next((m for m in self.driver.monitors if isinstance(m, kind)), None)
