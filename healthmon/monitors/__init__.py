"""Lightning callbacks: thin adapters that pick hooks and cadence and call ``healthmon.numerics``."""

from healthmon.monitors.base import Monitor
from healthmon.monitors.bundle import default_monitors
from healthmon.monitors.gradient_norm import GradientNormMonitor
from healthmon.monitors.health import HealthMonitor
from healthmon.monitors.hessian import HessianEigenMonitor, log_then_every
from healthmon.monitors.logits import LogitsCheck
from healthmon.monitors.nonfinite import NonFiniteMonitor
from healthmon.monitors.underflow import GradientUnderflowMonitor

__all__ = [
    "GradientNormMonitor",
    "GradientUnderflowMonitor",
    "HealthMonitor",
    "HessianEigenMonitor",
    "LogitsCheck",
    "Monitor",
    "NonFiniteMonitor",
    "default_monitors",
    "log_then_every",
]
