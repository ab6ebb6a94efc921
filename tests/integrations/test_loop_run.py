"""LoopRun: the Run of ``healthmon.watch``, read from the model, optimizers and options of a plain loop.

Whole loops under ``healthmon.watch`` are tests/integrations/test_loop.py (and test_fabric.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from healthmon.integrations.loop_run import (
    LoopRun,
    dtype_precision,
    unwrap_module,
    unwrap_optimizer,
)


def test_unwrap_module_finds_the_users_module() -> None:
    model = nn.Linear(3, 2)
    assert unwrap_module(model) is model
    assert unwrap_module(torch.compile(model)) is model  # compiled lazily: nothing is compiled here
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, wrapped_opt = Fabric(accelerator="cpu", devices=1).setup(model, opt)
    assert unwrap_module(wrapped) is model
    assert unwrap_optimizer(wrapped_opt) is opt
    assert unwrap_optimizer(opt) is opt


@pytest.mark.parametrize(
    ("dtype", "name"), [(torch.float32, "32-true"), (torch.float16, "16-true"), (torch.bfloat16, "bf16-true")]
)
def test_dtype_precision_follows_the_parameters(dtype: torch.dtype, name: str) -> None:
    assert dtype_precision(nn.Linear(2, 2).to(dtype)) == name


def test_a_module_without_parameters_is_32_bit() -> None:
    assert dtype_precision(nn.ReLU()) == "32-true"


def test_a_plain_single_process_loop() -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = LoopRun(model, [opt], accumulate_grad_batches=2, total_steps=10, log_every_n_steps=5)
    assert run.model is model
    assert run.optimizers == [opt]
    assert (run.world_size, run.is_global_zero) == (1, True)
    assert (run.precision, run.strategy) == ("32-true", "single_device")
    assert (run.accumulate_grad_batches, run.total_steps, run.log_every_n_steps) == (2, 10.0, 5)
    assert run.clipping == "unknown"
    assert LoopRun(model, [opt]).total_steps == float("inf")
    assert LoopRun(model, [opt], scaler=torch.amp.GradScaler("cpu")).precision == "16-mixed"
    assert LoopRun(torch.compile(model), [opt]).strategy == "OptimizedModule"


def test_without_a_step_function_there_is_no_replay() -> None:
    run = LoopRun(nn.Linear(3, 2), [])
    assert "hm.step(fn, batch)" in (run.replay_blocker() or "")
    with pytest.raises(NotImplementedError):
        run.loss_on(torch.zeros(1, 3), 0)


def test_the_step_functions_loss_replayed_under_the_loops_autocast() -> None:
    model = nn.Linear(3, 2)
    dtypes: list[torch.dtype] = []

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = model(x)
        dtypes.append(logits.dtype)
        return {"loss": F.cross_entropy(logits.float(), y)}

    run = LoopRun(model, [], step_fn=step)
    assert run.replay_blocker() is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run.capture_autocast()
    assert run.precision == "bf16-mixed"
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    with run.replay_context():
        loss = run.loss_on((x, y), 0)
    assert dtypes == [torch.bfloat16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(model(x).float(), y)
    assert torch.equal(loss, expected)


def test_the_hessians_loss_is_float32_outside_autocast_as_under_lightning() -> None:
    # Lightning's Hessian estimate calls training_step outside the precision plugin's autocast; the
    # loop's must too: fp16 autocast's kernels cannot be differentiated twice (the monitor was skipped)
    model = nn.Linear(3, 2)
    dtypes: list[torch.dtype] = []

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        dtypes.append(logits.dtype)
        return F.cross_entropy(logits, y)

    run = LoopRun(model, [], step_fn=step)
    with torch.autocast("cpu", dtype=torch.float16):
        run.capture_autocast()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    with torch.autocast("cpu", dtype=torch.float16):  # the Hessian runs in hm.step, in the user's autocast
        loss = run.loss_on((x, y), 0)
    (grad,) = torch.autograd.grad(loss, model.weight, create_graph=True)
    (hvp,) = torch.autograd.grad(grad, model.weight, torch.ones_like(grad))  # twice differentiable
    assert dtypes == [torch.float32] and hvp.dtype == torch.float32
    with run.replay_context():
        run.loss_on((x, y), 0)
    assert dtypes[-1] == torch.float16  # the replays of the step keep the loop's autocast


def test_the_writer_is_the_users_or_a_folder(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path / "user"))
    through = LoopRun(nn.Linear(2, 2), [], writer=writer).open_writer()
    assert through is not None
    assert through.log_dir == str(tmp_path / "user")
    through.close()
    writer.close()
    own = LoopRun(nn.Linear(2, 2), [], log_dir=str(tmp_path / "own")).open_writer()
    assert own is not None
    assert own.log_dir == str(tmp_path / "own")
    own.close()
