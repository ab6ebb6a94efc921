"""Lightning Fabric seen from :func:`healthmon.watch`: unwrap what ``fabric.setup`` returned.

``fabric.setup(model, optimizer)`` hands back a ``_FabricModule`` (around the strategy's wrapper,
``DistributedDataParallel`` under DDP) and a ``_FabricOptimizer``. healthmon names parameters after
the user's own module and hooks the torch optimizer inside; the ``GradScaler`` of fp16 mixed
precision, the ranks and the precision come from the ``Fabric`` object. Classes are recognised by
name, so both ``lightning.fabric`` and the standalone ``lightning_fabric`` package work, and
nothing here imports Fabric.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def _has_class(obj: Any, name: str) -> bool:
    return any(cls.__name__ == name for cls in type(obj).__mro__)


def is_fabric(obj: Any) -> bool:
    """Whether ``obj`` is a ``lightning.fabric.Fabric`` (or ``lightning_fabric.Fabric``)."""
    return _has_class(obj, "Fabric") and hasattr(obj, "strategy")


def is_fabric_module(obj: Any) -> bool:
    """Whether ``obj`` is the module ``fabric.setup`` returned."""
    return _has_class(obj, "_FabricModule")


def is_fabric_optimizer(obj: Any) -> bool:
    """Whether ``obj`` is the optimizer ``fabric.setup`` (or ``setup_optimizers``) returned."""
    return _has_class(obj, "_FabricOptimizer")


def original_module(fabric_module: Any) -> torch.nn.Module:
    """The module the user passed to ``fabric.setup`` (its parameter names carry no wrapper prefix)."""
    return fabric_module._original_module


def precision_plugin(fabric: Any) -> Any:
    """Fabric's precision plugin (autocast, the ``GradScaler``, gradient unscaling)."""
    return fabric.strategy.precision


def fabric_scaler(fabric: Any) -> Any:
    """The enabled ``GradScaler`` of Fabric's fp16 mixed precision, or None."""
    scaler = getattr(precision_plugin(fabric), "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    return scaler


def precision_name(fabric: Any) -> str:
    """Fabric's precision setting ("32-true", "16-mixed", "bf16-mixed", ...)."""
    return str(getattr(precision_plugin(fabric), "precision", "") or "")


def tensorboard_experiment(fabric: Any) -> Any:
    """The ``SummaryWriter`` of Fabric's ``TensorBoardLogger``, if the user gave Fabric one."""
    for logger in getattr(fabric, "loggers", None) or []:
        if _has_class(logger, "TensorBoardLogger"):
            return logger.experiment
    return None


def _no_hook(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def direct_forward(fabric_module: Any) -> Iterator[None]:
    """Replays through the ``_FabricModule``, bypassing the strategy's wrapper and Fabric's backward check.

    The ``_FabricModule`` still converts inputs and runs the forward under the precision's autocast,
    as in the loop. The strategy's wrapper (``DistributedDataParallel``) is bypassed: a replay
    on one rank must not start DDP's collectives or prepare a gradient reduction that never comes.
    Outputs get no Fabric backward hook (the check that backward goes through ``fabric.backward``):
    Hessian products differentiate with ``torch.autograd.grad``, which that hook refuses under mixed
    precision and DDP. Reentrant.
    """
    modules = fabric_module._modules
    wrapped = modules.get("_forward_module")
    own = vars(fabric_module)
    hook = own.get("_register_backward_hook")
    modules["_forward_module"] = original_module(fabric_module)
    own["_register_backward_hook"] = _no_hook
    try:
        yield
    finally:
        modules["_forward_module"] = wrapped
        if hook is None:
            own.pop("_register_backward_hook", None)
        else:
            own["_register_backward_hook"] = hook
