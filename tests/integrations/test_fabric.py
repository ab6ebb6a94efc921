"""healthmon.watch in a Lightning Fabric loop (fabric.backward, fabric.clip_gradients, DDP).

The Lightning tests' bugs and codes, the user's parameter names, outputs and the observer effect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.plugins import MixedPrecision
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from loop_models import BatchNormDropout, batches, line_of, mlp, scalars

import healthmon
from healthmon.cli import main as cli
from healthmon.monitors import GradientUnderflowMonitor, HessianEigenMonitor
from healthmon.monitors.bundle import default_monitors

SCRIPT = os.path.join(os.path.dirname(__file__), "fabric_ddp_script.py")


def classify(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    def loss_fn(batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    return loss_fn


def fabric_loop(
    watch: dict[str, Any] | None,
    model: nn.Module,
    steps: int,
    *,
    lr: float = 0.05,
    momentum: float = 0.0,
    loss: Callable[[nn.Module], Callable[[Any], torch.Tensor]] = classify,
    fabric: Fabric | None = None,
    data: Any = None,
    max_norm: float | None = None,
) -> tuple[Any, nn.Module, list[float], list[float]]:
    """A Fabric loop as a user writes it, watched with ``watch`` (None: not watched).

    ``watch``: healthmon.watch's keyword arguments. Returns (the watch, the model, losses,
    clip_gradients' totals).
    """
    fabric = fabric or Fabric(accelerator="cpu", devices=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model, optimizer = fabric.setup(model, optimizer)
    step_fn = loss(model)
    hm = None if watch is None else healthmon.watch(model, optimizer, fabric=fabric, **watch)
    losses: list[float] = []
    totals: list[float] = []
    data = data if data is not None else batches()
    for _ in range(steps):
        batch = next(data)
        value = hm.step(step_fn, batch) if hm is not None else step_fn(batch)
        losses.append(float(value.detach()))
        fabric.backward(value)
        if max_norm is not None:
            totals.append(float(fabric.clip_gradients(model, optimizer, max_norm=max_norm)))
        optimizer.step()
        optimizer.zero_grad()
        if hm is not None and hm.should_stop:
            break
    if hm is not None:
        hm.close()
    return hm, model, losses, totals


def quiet(tmp_path: Any, **kwargs: Any) -> dict[str, Any]:
    return {"log_dir": tmp_path, "summary": False, **kwargs}


def serious(hm: Any) -> list[str]:
    return [a.line() for a in hm.alerts if a.severity != "info"]


def test_healthy_fabric_run_with_clip_gradients(tmp_path: Any) -> None:
    hm, _, losses, totals = fabric_loop(quiet(tmp_path, log_every_n_steps=10), mlp(), 260, max_norm=100.0)
    assert serious(hm) == [] and hm.global_step == 260
    assert hm.run.clipping == "before clipping" and hm.run.strategy == "SingleDeviceStrategy"
    assert sorted(hm.driver.params.names.values()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    tags = scalars(str(tmp_path))
    for tag in (
        "healthmon/loss",
        "healthmon/grad/norm",
        "healthmon/grad/layer/0",
        "healthmon/update_ratio/2",
    ):
        assert tag in tags, tag
    for step in (0, 10, 250):  # checked inside clip_gradients, before clipping
        assert tags["healthmon/loss"][step] == pytest.approx(losses[step], rel=1e-6)
        assert tags["healthmon/grad/norm"][step] == pytest.approx(totals[step], rel=1e-5)
    report = json.loads(Path(hm.report_path).read_text())
    assert report["run"]["status"] == "completed" and report["config"]["loop"]["integration"] == "fabric"
    assert cli(["check", str(tmp_path)]) == 0


def test_fabric_fp16_mixed_precision_uses_fabrics_grad_scaler(tmp_path: Any) -> None:
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[fp16])
    hm, _, losses, _ = fabric_loop(
        quiet(tmp_path, log_every_n_steps=1), mlp(), 30, fabric=fabric, max_norm=100.0
    )
    assert hm.run.scaler is fp16.scaler and hm.run.precision == "16-mixed"
    assert serious(hm) == [] and hm.monitor(HessianEigenMonitor).estimates >= 1
    tags = scalars(str(tmp_path))
    assert tags["healthmon/amp/loss_scale"][0] == 65536.0
    for step in (0, 29):  # the user's loss, not the scaled one
        assert tags["healthmon/loss"][step] == pytest.approx(losses[step], rel=1e-6)
    assert "unscale_gradients" not in vars(fabric.strategy.precision) and "unscale_" not in vars(fp16.scaler)


def test_a_fabric_tensorboard_logger_gets_the_charts(tmp_path: Any) -> None:
    from lightning.fabric.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="fabric")
    fabric = Fabric(accelerator="cpu", devices=1, loggers=logger)
    hm, *_ = fabric_loop({"summary": False, "log_every_n_steps": 1}, mlp(), 3, fabric=fabric)
    assert hm.log_dir == logger.log_dir
    assert "healthmon/grad/norm" in scalars(logger.log_dir)


def test_softmax_into_cross_entropy(tmp_path: Any) -> None:
    with pytest.warns(UserWarning, match="logits.probabilities"):
        hm, *_ = fabric_loop(quiet(tmp_path), mlp(softmax=True), 10, lr=0.5)
    assert next(a for a in hm.alerts if a.code == "logits.probabilities").severity == "error"


def log_of_softmax(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    def loss_fn(batch: Any) -> torch.Tensor:
        x, y = batch
        p = F.softmax(model(x) * 100, dim=1)
        return F.nll_loss(torch.log(p), y)  # BUG: log

    return loss_fn


def test_nan_from_log_of_zero_is_named_at_the_users_line(tmp_path: Any) -> None:
    hm, model, *_ = fabric_loop(quiet(tmp_path, on_alert="stop"), mlp(), 3, loss=log_of_softmax, lr=0.1)
    found = [a for a in hm.alerts if a.code == "activation.nonfinite"]
    assert len(found) == 1, [a.line() for a in hm.alerts]
    assert found[0].where == line_of(__file__, "log")
    assert hm.should_stop and all(torch.isfinite(p).all() for p in model.parameters())


def test_learning_rate_100x_too_high_diverges(tmp_path: Any) -> None:
    hm, *_ = fabric_loop(quiet(tmp_path), mlp(), 80, lr=10.0)
    assert {a.code for a in hm.alerts} & {"loss.divergence", "grad.explosion"}


def test_fp16_true_without_loss_scaling_underflows(tmp_path: Any) -> None:
    monitors = [m for m in default_monitors() if not isinstance(m, GradientUnderflowMonitor)]
    monitors.append(GradientUnderflowMonitor(every_n_steps=2))
    fabric = Fabric(accelerator="cpu", devices=1, precision="16-true")
    hm, *_ = fabric_loop(quiet(tmp_path, monitors=monitors), mlp(64, 64), 4, lr=0.01, fabric=fabric)
    assert hm.run.precision == "16-true"
    assert "grad.underflow" in {a.code for a in hm.alerts}, [a.line() for a in hm.alerts]


def test_weights_and_buffers_are_bit_identical_with_every_monitor_on(tmp_path: Any) -> None:
    from test_loop import every_check_every_step

    states = []
    for watch in (None, quiet(tmp_path, monitors=every_check_every_step(), log_every_n_steps=1)):
        torch.manual_seed(7)
        hm, model, *_ = fabric_loop(
            watch, BatchNormDropout(), 12, lr=0.1, momentum=0.9, data=batches(seed=3), max_norm=1.0
        )
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    plain, watched = states
    assert plain.keys() == watched.keys() and "net.1.running_mean" in plain  # the user's names
    for name in plain:
        assert torch.equal(plain[name], watched[name]), name
    assert hm.monitor(HessianEigenMonitor).estimates >= 3


def test_fabric_arguments_are_checked(tmp_path: Any) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fabric.setup"):
        healthmon.watch(model, optimizer, fabric=fabric)
    wrapped, fabric_optimizer = fabric.setup(model, optimizer)
    with pytest.raises(ValueError, match="`fabric`"):
        healthmon.watch(wrapped, fabric_optimizer)


# ---- DDP under Fabric: two CPU processes (gloo) ----------------------------------------------------
@pytest.mark.slow
def test_ddp_under_fabric_norms_stop_and_raise(tmp_path: Any) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # timeout guards against a hang (the failure this test exists to catch), it is not a speed limit
    proc = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for mode in ("norms", "stop", "raise"):
        for rank in (0, 1):
            path = os.path.join(str(tmp_path), f"{mode}_rank{rank}.json")
            assert os.path.exists(path), (
                f"{mode} rank {rank}: no result; rc={proc.returncode}\n{proc.stderr[-3000:]}"
            )
            results[mode, rank] = json.loads(Path(path).read_text())
    # norms: the user's names, only rank 0 writes, the same norms as one process on the global batch
    norms0, norms1 = results["norms", 0], results["norms", 1]
    assert norms0["names"] == ["0.bias", "0.weight", "2.bias", "2.weight"] and norms0["world_size"] == 2
    assert norms0["report_path"] and norms1["report_path"] is None and norms0["alerts"] == []
    sys.path.insert(0, os.path.dirname(__file__))
    from fabric_ddp_script import STEPS, shard

    torch.manual_seed(0)
    fabric_loop(
        quiet(tmp_path / "single", log_every_n_steps=1),
        mlp(),
        STEPS,
        lr=0.1,
        data=iter(shard(0, 1)),
        max_norm=100.0,
    )
    single = scalars(str(tmp_path / "single"))["healthmon/grad/norm"]
    ddp = scalars(os.path.dirname(norms0["report_path"]))["healthmon/grad/norm"]
    assert sorted(ddp) == sorted(single) == list(range(STEPS))
    for step in single:
        assert ddp[step] == pytest.approx(single[step], rel=1e-5)
    # stop: an alert on rank 1 stops both ranks at the same step and reaches rank 0's report
    stop0, stop1 = results["stop", 0], results["stop", 1]
    assert stop0["global_step"] == stop1["global_step"] <= 4
    assert stop0["weights_finite"] and stop1["weights_finite"]
    rank0 = {a["code"]: a for a in stop0["alerts"]}
    assert "loss.nonfinite" in rank0 and "[rank 1]" in rank0["loss.nonfinite"]["message"]
    report = json.loads(Path(stop0["report_path"]).read_text())
    assert report["run"]["status"] == "stopped" and report["run"]["world_size"] == 2
    # raise: every rank raises, none hangs
    assert results["raise", 1]["raised"] == "activation.nonfinite"
    assert results["raise", 0]["raised"] is not None
    assert results["raise", 0]["weights_finite"] and results["raise", 1]["weights_finite"]
