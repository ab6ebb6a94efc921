"""Fabric unwrapped by class name: a real ``Fabric``, what ``fabric.setup`` returns, its precision and logger.

Full Fabric loops under ``healthmon.watch`` are tests/integrations/test_fabric.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from torch import nn

from healthmon.integrations.loop_fabric import (
    direct_forward,
    fabric_scaler,
    is_fabric,
    is_fabric_module,
    is_fabric_optimizer,
    original_module,
    precision_name,
    tensorboard_experiment,
)


def test_setup_returns_are_recognised_and_unwrapped() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, wrapped_opt = fabric.setup(model, opt)
    assert is_fabric(fabric)
    assert not is_fabric(model)
    assert is_fabric_module(wrapped)
    assert not is_fabric_module(model)
    assert is_fabric_optimizer(wrapped_opt)
    assert not is_fabric_optimizer(opt)
    assert original_module(wrapped) is model
    assert precision_name(fabric) == "32-true"
    assert fabric_scaler(fabric) is None
    assert tensorboard_experiment(fabric) is None


def test_the_tensorboard_loggers_writer(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path))
    fabric = Fabric(accelerator="cpu", devices=1, loggers=[logger])
    assert tensorboard_experiment(fabric) is logger.experiment


def test_direct_forward_bypasses_the_wrapper_and_restores_it() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = nn.Linear(3, 2)
    wrapped, _ = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = wrapped._modules["_forward_module"]
    had_hook = "_register_backward_hook" in vars(wrapped)
    x = torch.randn(4, 3)
    with direct_forward(wrapped):
        assert wrapped._modules["_forward_module"] is model
        with direct_forward(wrapped):  # reentrant
            out = wrapped(x)
        assert wrapped._modules["_forward_module"] is model
    assert torch.equal(out, model(x))
    assert wrapped._modules["_forward_module"] is before
    assert ("_register_backward_hook" in vars(wrapped)) == had_hook
