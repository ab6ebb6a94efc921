"""Argument checks of :func:`healthmon.watch`: each error names the argument, the value and the fix."""

from __future__ import annotations

import os
from typing import Any

import torch

from healthmon.integrations import loop_fabric
from healthmon.integrations.loop_run import unwrap_optimizer

_SCALER_METHODS = ("scale", "unscale_", "step", "update")


def check_model(model: Any, name: str) -> None:
    """Raise unless ``model`` is a ``torch.nn.Module`` with parameters (``name``: the argument)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`{name}`: expected the torch.nn.Module the loop trains, got {model!r}.")
    if not any(True for _ in model.parameters()):
        raise ValueError(
            f"`{name}`: expected a module with parameters, got {type(model).__name__} with none."
        )


def check_optimizers(optimizer_or_list: Any) -> list[Any]:
    """The torch optimizers (inside Fabric's wrappers), one or a list of them, without repeats."""
    items = list(optimizer_or_list) if isinstance(optimizer_or_list, (list, tuple)) else [optimizer_or_list]
    if not items:
        raise ValueError(
            "`optimizer_or_list`: expected a torch optimizer or a non-empty list of them, got []."
        )
    optimizers: list[torch.optim.Optimizer] = []
    for i, item in enumerate(items):
        opt = unwrap_optimizer(item)
        if not isinstance(opt, torch.optim.Optimizer):
            where = "optimizer_or_list" if len(items) == 1 else f"optimizer_or_list[{i}]"
            raise TypeError(f"`{where}`: expected a torch.optim.Optimizer, got {item!r}.")
        if any(opt is seen for seen in optimizers):
            raise ValueError(f"`optimizer_or_list[{i}]`: the same optimizer is listed twice.")
        optimizers.append(opt)
    return optimizers


def check_scaler(scaler: Any) -> Any:
    """The scaler if it is an enabled ``GradScaler`` (a disabled one, ``enabled=False``: None)."""
    if scaler is None:
        return None
    missing = [m for m in _SCALER_METHODS if not callable(getattr(scaler, m, None))]
    if missing:
        raise TypeError(
            f"`scaler`: expected a torch.amp.GradScaler (methods {', '.join(_SCALER_METHODS)}), "
            f"got {scaler!r}."
        )
    return scaler if getattr(scaler, "is_enabled", lambda: True)() else None


def check_writer(writer: Any, log_dir: Any) -> None:
    """Raise unless ``writer`` is a SummaryWriter and ``log_dir`` a folder path, not both given."""
    if writer is not None and log_dir is not None:
        raise ValueError(
            f"`log_dir`: expected None when `writer` is given (healthmon writes beside the writer's "
            f"event files), got {log_dir!r}."
        )
    if writer is not None and not (
        callable(getattr(writer, "add_scalar", None)) and hasattr(writer, "add_text")
    ):
        raise TypeError(f"`writer`: expected a SummaryWriter (torch.utils.tensorboard), got {writer!r}.")
    if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"`log_dir`: expected a folder path (str or os.PathLike), got {log_dir!r}.")


def check_fabric(fabric: Any, model: Any, scaler: Any) -> Any:
    """Check a Fabric loop's arguments; returns the ``GradScaler`` in use (Fabric's)."""
    if not loop_fabric.is_fabric(fabric):
        raise TypeError(f"`fabric`: expected a lightning.fabric.Fabric, got {fabric!r}.")
    if not loop_fabric.is_fabric_module(model):
        raise ValueError(
            "`model`: expected the module fabric.setup(...) returned (call model, optimizer = "
            f"fabric.setup(model, optimizer) first), got a plain {type(model).__name__}."
        )
    own = loop_fabric.fabric_scaler(fabric)
    if scaler is not None and own is not None and scaler is not own:
        raise ValueError(
            "`scaler`: Fabric's precision plugin has its own GradScaler; leave `scaler` out under Fabric."
        )
    return own if own is not None else scaler
