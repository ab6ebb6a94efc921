"""Run: the single-process defaults every integration starts from, and ``loss_of``.

The rank helpers are checked in a single process without a process group (the multi-process
reduction is tests/numerics/test_sharded_norms.py and tests/integration/test_ddp.py).
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from healthmon.engine.run import Run, distributed, loss_of


def test_defaults_describe_one_process_that_replays_nothing() -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    given = [opt]
    run = Run(model, given)
    assert run.model is model
    assert run.optimizers == [opt]
    assert run.optimizers is not given  # a copy: the caller's list is not shared
    assert (run.global_step, run.current_epoch) == (0, 0)
    assert (run.world_size, run.is_global_zero, run.rank) == (1, True, 0)
    assert run.accumulate_grad_batches == 1
    assert math.isinf(run.batches_per_epoch)
    assert math.isinf(run.total_steps)
    assert run.log_every_n_steps == 50
    assert run.clips_gradients is False
    assert run.scaler is None
    assert (run.precision, run.strategy) == ("32-true", "single_device")
    assert run.automatic_optimization is True
    assert run.stop_requested is False
    assert Run(model).optimizers == []


def test_request_stop_sets_the_flag() -> None:
    run = Run(nn.Linear(2, 2))
    run.request_stop()
    assert run.stop_requested is True


def test_root_device_is_the_first_parameters_device_or_cpu() -> None:
    assert Run(nn.Linear(2, 2)).root_device == torch.device("cpu")
    assert Run(nn.ReLU()).root_device == torch.device("cpu")  # no parameters at all


def test_rank_helpers_are_identities_without_a_process_group() -> None:
    run = Run(nn.Linear(2, 2))
    assert distributed() is False
    assert run.any_rank(True) is True
    assert run.any_rank(False) is False
    assert run.max_over_ranks(7) == 7
    assert run.max_over_ranks(-3) == -3
    assert run.gather_objects({"a": 1}) is None


def test_local_gradients_of_plain_tensors_are_the_tensors_themselves() -> None:
    grads = [torch.randn(4, 3), torch.randn(3)]
    local, sharded = Run(nn.Linear(3, 4)).local_gradients(grads)
    assert sharded is False
    assert len(local) == 2
    assert all(a is b for a, b in zip(local, grads, strict=True))


def test_the_base_run_cannot_replay_and_opens_no_writer() -> None:
    run = Run(nn.Linear(2, 2))
    blocker = run.replay_blocker()
    assert blocker is not None
    assert "loss_fn" in blocker
    with pytest.raises(NotImplementedError, match="compute the loss"):
        run.loss_on(torch.zeros(1, 2), 0)
    assert run.open_writer() is None


def test_replay_context_restores_random_streams_modes_and_gradients() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    model.train()
    model(torch.randn(2, 3)).sum().backward()
    grad = model[0].weight.grad
    values = grad.clone()
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    with Run(model).replay_context():
        model.eval()
        model.zero_grad(set_to_none=True)
        model(torch.randn(2, 3)).sum().backward()  # a replay's backward makes new gradients
        torch.randn(5)
        random.random()
    assert model.training
    assert model[0].weight.grad is grad
    assert torch.equal(grad, values)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state


def test_loss_of_a_tensor_a_dict_and_a_model_output() -> None:
    loss = torch.tensor(1.5)
    assert loss_of(loss) is loss
    assert loss_of({"loss": loss, "logits": torch.zeros(2)}) is loss
    assert loss_of({"logits": torch.zeros(2)}) is None
    assert loss_of(SimpleNamespace(loss=loss, logits=None)) is loss
