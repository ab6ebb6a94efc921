"""The bundle: default monitors, argument checks, one driver with its policy, and what results expose.

The same checks seen through each integration's constructor are tests/test_bad_config.py.
"""

from __future__ import annotations

import warnings

import pytest
from torch import nn

from healthmon.engine.run import Run
from healthmon.monitors.bundle import (
    BundleResults,
    bundle_config,
    bundle_driver,
    checked_monitors,
    default_monitors,
)
from healthmon.monitors.gradient_norm import GradientNormMonitor
from healthmon.monitors.hessian import HessianEigenMonitor
from healthmon.monitors.logits import LogitsCheck
from healthmon.monitors.nonfinite import NonFiniteMonitor
from healthmon.monitors.underflow import GradientUnderflowMonitor

DEFAULT_KINDS = [
    NonFiniteMonitor,
    GradientNormMonitor,
    GradientUnderflowMonitor,
    HessianEigenMonitor,
    LogitsCheck,
]


def test_default_monitors_are_fresh_instances_of_the_five_kinds() -> None:
    first, second = default_monitors(), default_monitors()
    assert [type(m) for m in first] == DEFAULT_KINDS
    assert all(a is not b for a, b in zip(first, second, strict=True))
    assert [type(m) for m in checked_monitors(None)] == DEFAULT_KINDS


def test_checked_monitors_keeps_the_users_monitors_in_order() -> None:
    given = (GradientNormMonitor(), NonFiniteMonitor())
    checked = checked_monitors(given)
    assert isinstance(checked, list)
    assert all(a is b for a, b in zip(checked, given, strict=True))
    assert checked_monitors([]) == []


def test_checked_monitors_rejects_other_objects_and_two_of_a_kind() -> None:
    with pytest.raises(TypeError, match=r"`monitors\[1\]`: expected a healthmon monitor instance"):
        checked_monitors([NonFiniteMonitor(), "grad_norm"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"got two of \['GradientNormMonitor', 'LogitsCheck'\]"):
        checked_monitors([LogitsCheck(), GradientNormMonitor(), LogitsCheck(), GradientNormMonitor()])


def test_bundle_driver_marks_its_monitors_and_carries_policy_and_outputs() -> None:
    norm = GradientNormMonitor()
    driver = bundle_driver(
        on_alert="raise", fail_on="error", monitors=[norm], log_every_n_steps=5, report=False, summary=False
    )
    assert driver.monitors == [norm]
    assert norm._bundled
    assert norm.driver is driver
    assert (driver.policy.on_alert, driver.policy.fail_on) == ("raise", "error")
    assert driver.stats.log_every_n_steps == 5
    assert (driver.output.write_report, driver.output.print_summary) == (False, False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"on_alert": "ignore"}, ValueError, "`on_alert`"),
        ({"log_every_n_steps": 0}, ValueError, "`log_every_n_steps`: expected an integer >= 1"),
        ({"report": 1}, TypeError, "`report`: expected True or False"),
        ({"summary": None}, TypeError, "`summary`: expected True or False"),
    ],
)
def test_bundle_driver_checks_its_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        bundle_driver(monitors=[], **kwargs)


def test_bundle_config_names_the_policy_and_each_monitors_settings() -> None:
    norm, logits = GradientNormMonitor(), LogitsCheck()
    config = bundle_config(bundle_driver(on_alert="stop", monitors=[norm, logits]))
    assert config["on_alert"] == "stop"
    assert config["fail_on"] == "warning"
    assert config["monitors"] == {"GradientNormMonitor": norm.config(), "LogitsCheck": logits.config()}


class Results(BundleResults):
    def __init__(self, **kwargs: object) -> None:
        self.driver = bundle_driver(summary=False, **kwargs)  # type: ignore[arg-type]


def test_bundle_results_read_through_to_the_driver() -> None:
    results = Results(monitors=[LogitsCheck(), GradientNormMonitor()])
    assert results.monitors == results.driver.monitors
    assert results.monitors is not results.driver.monitors  # a copy
    assert isinstance(results.monitor(GradientNormMonitor), GradientNormMonitor)
    assert results.monitor(NonFiniteMonitor) is None
    assert (results.log_dir, results.report_path) == (None, None)  # no writer opened yet
    run = Run(nn.Linear(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results.driver.alert(run, "grad.explosion", "jump", where="net.0")
        results.driver.alert(run, "grad.explosion", "jump", where="net.0")
    (alert,) = results.alerts
    assert (alert.code, alert.where, alert.count) == ("grad.explosion", "net.0", 2)
