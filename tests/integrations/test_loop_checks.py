"""The argument checks of ``healthmon.watch``: exact messages, and what the checks hand back.

The same checks seen through ``healthmon.watch`` are in tests/integrations/test_loop.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from healthmon.integrations.loop_checks import (
    check_fabric,
    check_model,
    check_optimizers,
    check_scaler,
    check_writer,
)


def test_the_model_must_be_a_module_with_parameters() -> None:
    check_model(nn.Linear(2, 2), "model")
    with pytest.raises(
        TypeError, match=r"^`model`: expected the torch.nn.Module the loop trains, got 'net'\.$"
    ):
        check_model("net", "model")
    with pytest.raises(
        ValueError, match=r"^`model`: expected a module with parameters, got ReLU with none\.$"
    ):
        check_model(nn.ReLU(), "model")


def test_optimizers_one_or_a_list_without_repeats() -> None:
    model = nn.Linear(2, 2)
    a = torch.optim.SGD(model.parameters(), lr=0.1)
    b = torch.optim.Adam(model.parameters())
    assert check_optimizers(a) == [a]
    assert check_optimizers((a, b)) == [a, b]
    with pytest.raises(ValueError, match="non-empty list of them, got"):
        check_optimizers([])
    with pytest.raises(
        TypeError, match=r"^`optimizer_or_list`: expected a torch.optim.Optimizer, got 'sgd'\.$"
    ):
        check_optimizers("sgd")
    with pytest.raises(TypeError, match=r"^`optimizer_or_list\[1\]`: expected a torch.optim.Optimizer"):
        check_optimizers([a, "adam"])
    with pytest.raises(ValueError, match=r"^`optimizer_or_list\[1\]`: the same optimizer is listed twice\.$"):
        check_optimizers([a, a])


def test_an_enabled_scaler_is_kept_and_a_disabled_one_dropped() -> None:
    enabled = torch.amp.GradScaler("cpu")
    assert check_scaler(enabled) is enabled
    assert check_scaler(torch.amp.GradScaler("cpu", enabled=False)) is None
    assert check_scaler(None) is None
    with pytest.raises(
        TypeError, match=r"^`scaler`: expected a torch.amp.GradScaler \(methods scale, unscale_"
    ):
        check_scaler(object())


def test_a_writer_or_a_folder_not_both(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    check_writer(writer, None)
    check_writer(None, tmp_path)
    check_writer(None, None)
    with pytest.raises(ValueError, match=r"^`log_dir`: expected None when `writer` is given"):
        check_writer(writer, str(tmp_path))
    with pytest.raises(TypeError, match=r"^`writer`: expected a SummaryWriter"):
        check_writer(object(), None)
    with pytest.raises(
        TypeError, match=r"^`log_dir`: expected a folder path \(str or os.PathLike\), got 5\.$"
    ):
        check_writer(None, 5)
    writer.close()


def test_fabric_must_be_a_fabric() -> None:
    with pytest.raises(TypeError, match=r"^`fabric`: expected a lightning.fabric.Fabric"):
        check_fabric(object(), nn.Linear(2, 2), None)


def test_under_fabric_the_model_is_the_one_setup_returned_and_the_scaler_fabrics_own() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = nn.Linear(2, 2)
    with pytest.raises(
        ValueError, match=r"^`model`: expected the module fabric.setup\(...\) returned .* Linear\.$"
    ):
        check_fabric(fabric, model, None)
    wrapped, _ = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert check_fabric(fabric, wrapped, None) is None  # 32-bit: no scaler
    scaler = torch.amp.GradScaler("cpu")
    assert check_fabric(fabric, wrapped, scaler) is scaler
