"""Bad constructor arguments fail at construction, naming the argument, the value and what is allowed."""

from __future__ import annotations

from typing import Any

import pytest

from healthmon import GradientUnderflowMonitor, HealthMonitor, HessianEigenMonitor, LogitsCheck
from healthmon.monitors import GradientNormMonitor, NonFiniteMonitor

NAN = float("nan")

# (callable, kwargs, the argument named, text of what is allowed)
CASES: list[tuple[Any, dict[str, Any], str, str]] = [
    (
        HealthMonitor,
        {"on_alert": "explode"},
        "on_alert",
        "expected one of 'warn', 'raise', 'stop', got 'explode'",
    ),
    (
        HealthMonitor,
        {"fail_on": "fatal"},
        "fail_on",
        "expected one of 'info', 'warning', 'error', got 'fatal'",
    ),
    (HealthMonitor, {"log_every_n_steps": 0}, "log_every_n_steps", "expected an integer >= 1, got 0"),
    (HealthMonitor, {"monitors": [object()]}, "monitors[0]", "expected a healthmon monitor instance"),
    (HealthMonitor, {"report": "yes"}, "report", "expected True or False, got 'yes'"),
    (
        HealthMonitor,
        {"monitors": [LogitsCheck(), LogitsCheck()]},
        "monitors",
        "at most one monitor of each kind",
    ),
    (GradientNormMonitor, {"every_n_steps": 0}, "every_n_steps", "expected an integer >= 1 or a callable"),
    (GradientNormMonitor, {"every_n_steps": 2.5}, "every_n_steps", "got 2.5"),
    (GradientNormMonitor, {"every_n_steps": True}, "every_n_steps", "got True"),
    (GradientNormMonitor, {"spike_factor": 0.5}, "spike_factor", "expected a finite number > 1.0, got 0.5"),
    (GradientNormMonitor, {"blowup_factor": NAN}, "blowup_factor", "expected a finite number > 1.0, got nan"),
    (GradientNormMonitor, {"divergence_window": 2}, "divergence_window", "expected an integer >= 3, got 2"),
    (GradientNormMonitor, {"update_ratios": "no"}, "update_ratios", "expected True or False"),
    (GradientNormMonitor, {"update_ratio_limit": 0.0}, "update_ratio_limit", "got 0.0"),
    (GradientNormMonitor, {"sensitivity_limit": NAN}, "sensitivity_limit", "got nan"),
    (GradientNormMonitor, {"on_alert": "halt"}, "on_alert", "got 'halt'"),
    (NonFiniteMonitor, {"max_replays": -1}, "max_replays", "expected an integer >= 0, got -1"),
    (NonFiniteMonitor, {"find_module": "yes"}, "find_module", "expected True or False"),
    (
        GradientUnderflowMonitor,
        {"underflow_fraction": 1.5},
        "underflow_fraction",
        "expected a number in (0, 1], got 1.5",
    ),
    (GradientUnderflowMonitor, {"zero_fraction": 0}, "zero_fraction", "expected a number in (0, 1], got 0"),
    (GradientUnderflowMonitor, {"stale_samples": 0}, "stale_samples", "expected an integer >= 1, got 0"),
    (GradientUnderflowMonitor, {"min_depth": 1}, "min_depth", "expected an integer >= 2, got 1"),
    (GradientUnderflowMonitor, {"histogram_every_n_steps": -5}, "histogram_every_n_steps", "got -5"),
    (LogitsCheck, {"first_steps": -1}, "first_steps", "expected an integer >= 0, got -1"),
    (LogitsCheck, {"every_n_steps": "10"}, "every_n_steps", "got '10'"),
    (HessianEigenMonitor, {"top_k": 0}, "top_k", "expected an integer >= 1, got 0"),
    (HessianEigenMonitor, {"solver": "qr"}, "solver", "expected one of 'lanczos', 'power', got 'qr'"),
    (HessianEigenMonitor, {"hvp": "finite"}, "hvp", "got 'finite'"),
    (HessianEigenMonitor, {"tol": 0.0}, "tol", "got 0.0"),
    (HessianEigenMonitor, {"tol": 2.0}, "tol", "expected a number in (0, 1), got 2.0"),
    (HessianEigenMonitor, {"top_k": 5, "max_products": 3}, "max_products", "expected an integer >= 5, got 3"),
    (HessianEigenMonitor, {"negative_ratio": 0}, "negative_ratio", "got 0"),
]


@pytest.mark.parametrize(
    ("make", "kwargs", "name", "allowed"), CASES, ids=[f"{c[0].__name__}-{c[2]}" for c in CASES]
)
def test_bad_argument_is_named_with_value_and_allowed(
    make: Any, kwargs: dict[str, Any], name: str, allowed: str
) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        make(**kwargs)
    message = str(info.value)
    assert message.startswith(f"`{name}`: "), message
    assert allowed in message, message
