"""StepStatistics: norms against the norm of the concatenated gradient, the unscaled loss, deferral."""

from __future__ import annotations

import pytest
import torch

from healthmon.engine.run import Run
from healthmon.engine.step_stats import ParamIndex, StepStatistics, layer_of


def _model_with_grads() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    opt = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}], lr=0.1
    )
    model(torch.randn(11, 5)).pow(2).mean().backward()
    return model, opt


def test_norms_equal_the_norm_of_the_concatenated_gradient() -> None:
    model, opt = _model_with_grads()
    run = Run(model, [opt])
    stats = StepStatistics(log_every_n_steps=1)
    stats.setup(run)
    step = stats.grad_step(run, opt)
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert step.norm == pytest.approx(flat.norm().item(), rel=1e-6)
    assert step.logged and step.layer_norms is not None and step.group_norms is not None
    for layer, name in ((model[0], "0"), (model[2], "2")):
        expected = torch.cat([p.grad.reshape(-1) for p in layer.parameters()]).norm().item()
        assert step.layer_norms[name] == pytest.approx(expected, rel=1e-6)
    assert step.group_norms[1] == pytest.approx(step.layer_norms["2"], rel=1e-6)
    assert stats.grad_step(run, opt) is step  # computed once per step and optimizer


def test_the_loss_is_accumulated_and_unscaled_on_the_device() -> None:
    model, opt = _model_with_grads()
    run = Run(model, [opt])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    run.scaler = scaler
    stats = StepStatistics()
    stats.setup(run)
    for loss in (torch.tensor(0.75), torch.tensor(0.5)):
        stats.add_loss(scaler.scale(loss))  # what backward receives under fp16 AMP
    step = stats.grad_step(run, opt)
    assert step.loss == 1.25 and step.loss_scale == 2.0**10 and not step.skipped
    stats.end_step()
    run.global_step = 1
    assert stats.grad_step(run, opt).loss is None


def test_a_non_finite_gradient_under_a_scaler_is_a_skipped_step() -> None:
    model, opt = _model_with_grads()
    run = Run(model, [opt])
    run.scaler = torch.amp.GradScaler("cpu")
    stats = StepStatistics()
    stats.setup(run)
    model[0].weight.grad[0, 0] = float("inf")
    step = stats.grad_step(run, opt)
    assert step.skipped and stats.amp_skipped_steps == 1


def test_deferred_values_arrive_with_the_next_synchronisation() -> None:
    model, opt = _model_with_grads()
    run = Run(model, [opt])
    stats = StepStatistics()
    stats.setup(run)
    got: list[list[float]] = []
    stats.defer(torch.tensor([1.0, 2.0]), got.append)
    stats.defer(torch.tensor([3.0]), got.append)
    assert got == []
    stats.grad_step(run, opt)
    assert sorted(got) == [[1.0, 2.0], [3.0]]
    stats.defer(torch.tensor([4.0]), got.append)
    stats.flush_deferred()
    assert got[-1] == [4.0]


def test_log_steps_follow_the_cadence_and_each_optimizer() -> None:
    model, opt = _model_with_grads()
    run = Run(model, [opt])
    stats = StepStatistics(log_every_n_steps=10)
    logged = []
    for step in range(25):
        run.global_step = step
        logged.append(stats.is_log_step(run))
    assert [s for s, ok in enumerate(logged) if ok] == [0, 10, 20]
    run.global_step = 3  # an optimizer that never logged logs at once
    assert stats.is_log_step(run, optimizer_index=1)


def test_parameters_are_named_by_layer() -> None:
    model, _ = _model_with_grads()
    index = ParamIndex(model)
    assert index.layers == ["0", "2"]
    assert index.name(model[2].bias) == "2.bias"
    assert index.name(torch.zeros(2, 3)) == "<unnamed (2, 3)>"
    assert layer_of("encoder.layer.0.weight") == "encoder.layer.0"
