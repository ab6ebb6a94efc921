"""healthmon: watch the numerical health of a training run (Lightning, Fabric, plain PyTorch).

``Alert`` and ``NumericalHealthError`` load eagerly (pure Python). The callbacks and
:func:`watch` (plain PyTorch and Fabric loops) load lazily on first access (PEP 562), so
``import healthmon.numerics`` or the CLI never import Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from healthmon.alerts import CODES, Alert, NumericalHealthError

__version__ = "0.1.0"

_LAZY = {
    "HealthMonitor": "healthmon.monitors.health",
    "GradientNormMonitor": "healthmon.monitors.gradient_norm",
    "NonFiniteMonitor": "healthmon.monitors.nonfinite",
    "GradientUnderflowMonitor": "healthmon.monitors.underflow",
    "LogitsCheck": "healthmon.monitors.logits",
    "HessianEigenMonitor": "healthmon.monitors.hessian",
    "watch": "healthmon.integrations.loop",
    "Watch": "healthmon.integrations.loop_watch",
}

__all__ = ["CODES", "Alert", "NumericalHealthError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'healthmon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
