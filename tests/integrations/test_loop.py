"""healthmon.watch in a plain PyTorch loop: the Lightning tests' bugs, codes, outputs and guarantees."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from loop_models import BatchNormDropout, batches, line_of, mlp, scalars, train

import healthmon
from healthmon import NumericalHealthError
from healthmon.cli import main as cli
from healthmon.monitors import (
    GradientNormMonitor,
    GradientUnderflowMonitor,
    HessianEigenMonitor,
    LogitsCheck,
    NonFiniteMonitor,
)
from healthmon.monitors.bundle import default_monitors


def classify(model: nn.Module) -> Any:
    def loss_fn(batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)

    return loss_fn


def serious(hm: Any) -> list[str]:
    return [a.line() for a in hm.alerts if a.severity != "info"]


def test_healthy_run_has_no_alert_and_writes_report_tags_and_check(tmp_path: Any) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    norms: dict[int, float] = {}

    def record(optimizer: Any, args: Any, kwargs: Any) -> None:  # the reference norm, before the step
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        norms[len(norms)] = float(torch.linalg.vector_norm(grads))

    opt.register_step_pre_hook(record)
    with healthmon.watch(model, opt, log_dir=tmp_path / "run", summary=False, log_every_n_steps=10) as hm:
        losses = train(hm, opt, classify(model), 260)
    assert serious(hm) == [] and hm.global_step == 260
    assert hm.monitor(HessianEigenMonitor).estimates >= 1  # type: ignore[union-attr]
    report = json.loads(Path(hm.report_path).read_text())  # type: ignore[arg-type]
    assert report["run"]["status"] == "completed" and report["run"]["global_step"] == 260
    assert report["config"]["loop"]["integration"] == "pytorch"
    tags = scalars(str(tmp_path / "run"))
    for tag in (
        "healthmon/loss",
        "healthmon/grad/norm",
        "healthmon/grad/layer/0",
        "healthmon/update_ratio/2",
    ):
        assert tag in tags, tag
    for step in (0, 10, 250):  # the user's loss and the norm of the concatenated gradient
        assert tags["healthmon/loss"][step] == pytest.approx(losses[step], rel=1e-6)
        assert tags["healthmon/grad/norm"][step] == pytest.approx(norms[step], rel=1e-5)
    assert cli(["check", str(tmp_path / "run")]) == 0
    assert cli(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report.html")]) == 0
    assert os.path.getsize(tmp_path / "report.html") > 0


def test_a_users_summary_writer_gets_the_charts_and_stays_open(tmp_path: Any) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with healthmon.watch(model, opt, writer=writer, summary=False, log_every_n_steps=1) as hm:
        train(hm, opt, classify(model), 3)
    writer.add_scalar("mine", 1.0, 0)  # still open
    writer.close()
    assert hm.report_path == os.path.join(str(tmp_path / "tb"), "healthmon_report.json")
    tags = scalars(str(tmp_path / "tb"))
    assert "healthmon/grad/norm" in tags and "mine" in tags


def test_softmax_into_cross_entropy(tmp_path: Any) -> None:
    model = mlp(softmax=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with (
        pytest.warns(UserWarning, match="logits.probabilities"),
        healthmon.watch(model, opt, log_dir=tmp_path, summary=False) as hm,
    ):
        train(hm, opt, classify(model), 10)
    alert = next(a for a in hm.alerts if a.code == "logits.probabilities")
    assert alert.severity == "error"
    assert cli(["check", str(tmp_path)]) != 0


def test_nan_from_log_of_zero_is_named_at_the_users_line(tmp_path: Any) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(batch: Any) -> torch.Tensor:
        x, y = batch
        p = F.softmax(model(x) * 100, dim=1)
        return F.nll_loss(torch.log(p), y)  # BUG: log

    with healthmon.watch(model, opt, log_dir=tmp_path, on_alert="stop", summary=False) as hm:
        train(hm, opt, loss_fn, 3)
    found = [a for a in hm.alerts if a.code == "activation.nonfinite"]
    assert len(found) == 1, [a.line() for a in hm.alerts]
    assert found[0].where == line_of(__file__, "log")
    assert hm.should_stop and all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads(Path(hm.report_path).read_text())["run"]["status"] == "stopped"  # type: ignore[arg-type]


def test_learning_rate_100x_too_high_diverges(tmp_path: Any) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    with healthmon.watch(model, opt, log_dir=tmp_path, summary=False) as hm:
        train(hm, opt, classify(model), 80)
    assert {a.code for a in hm.alerts} & {"loss.divergence", "grad.explosion"}


def test_fp16_weights_without_loss_scaling_underflow(tmp_path: Any) -> None:
    bundle = [m for m in default_monitors() if not isinstance(m, GradientUnderflowMonitor)]
    model = mlp(64, 64, dtype=torch.float16)  # examples/bugs/grad_underflow.py's model
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitors = [*bundle, GradientUnderflowMonitor(every_n_steps=2)]
    with healthmon.watch(model, opt, log_dir=tmp_path, monitors=monitors, summary=False) as hm:
        train(hm, opt, classify(model), 4)
    assert hm.run.precision == "16-true"
    assert "grad.underflow" in {a.code for a in hm.alerts}, [a.line() for a in hm.alerts]


def _amp_loop(
    tmp_path: Any, *, init_scale: float, clip: bool, steps: int
) -> tuple[Any, list[float], list[Any]]:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    seen: list[Any] = []  # (scale before the step, pre-clip norm) as the user sees them

    def loss_fn(batch: Any) -> torch.Tensor:
        x, y = batch
        with torch.autocast("cpu", dtype=torch.float16):
            return F.cross_entropy(model(x), y)

    def clip_and_record() -> None:
        seen.append((scaler.get_scale(), float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))))

    with healthmon.watch(
        model, opt, scaler=scaler, log_dir=tmp_path, summary=False, log_every_n_steps=1
    ) as hm:
        losses = train(hm, opt, loss_fn, steps, scaler=scaler, clip=clip_and_record if clip else None)
    assert vars(scaler).get("unscale_") is None  # healthmon's wrapper is gone
    return hm, losses, seen


def test_user_held_grad_scaler_logs_the_users_loss_and_pre_clip_norm(tmp_path: Any) -> None:
    hm, losses, seen = _amp_loop(tmp_path, init_scale=2.0**16, clip=True, steps=30)
    assert serious(hm) == [] and hm.run.scaler is not None and hm.run.clipping == "before clipping"
    tags = scalars(str(tmp_path))
    for step in (0, 5, 29):
        assert tags["healthmon/loss"][step] == pytest.approx(losses[step], rel=1e-6)
        finite = seen[step][1] < float("inf")
        if finite:  # checked after unscale_, before clipping: the norm clip_grad_norm_ returned
            assert tags["healthmon/grad/norm"][step] == pytest.approx(seen[step][1], rel=1e-5)
    assert tags["healthmon/amp/loss_scale"][0] == 2.0**16


def test_steps_the_grad_scaler_skips_are_counted(tmp_path: Any) -> None:
    # a scale of 2**40 overflows the float16 activations' gradients: the scaler skips steps, halving it
    hm, losses, _ = _amp_loop(tmp_path, init_scale=2.0**40, clip=False, steps=40)
    skipped = hm.driver.amp_skipped_steps
    assert 5 <= skipped < 40 and hm.global_step == 40
    assert "loss.nonfinite" not in {a.code for a in hm.alerts}
    tags = scalars(str(tmp_path))
    assert tags["healthmon/amp/skipped_steps"][39] == skipped
    assert tags["healthmon/loss"][3] == pytest.approx(losses[3], rel=1e-6)


def test_gradients_ready_measures_before_clipping(tmp_path: Any) -> None:
    results = {}
    for ready in (False, True):
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        totals: list[float] = []

        def clip(model: nn.Module = model, totals: list[float] = totals) -> None:
            totals.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)))

        with healthmon.watch(
            model, opt, log_dir=tmp_path / str(ready), summary=False, log_every_n_steps=1
        ) as hm:
            train(hm, opt, classify(model), 5, clip=clip, gradients_ready=ready)
        results[ready] = (scalars(str(tmp_path / str(ready)))["healthmon/grad/norm"], totals, hm.run.clipping)
    norms, totals, clipping = results[True]
    assert clipping == "before clipping" and norms[3] == pytest.approx(totals[3], rel=1e-5)
    norms, totals, clipping = results[False]  # the pre-step hook sees the clipped gradient
    assert clipping == "unknown" and norms[3] == pytest.approx(0.1, rel=1e-4) and totals[3] > 0.1


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Any) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kw = {"log_dir": tmp_path, "summary": False, "log_every_n_steps": 1, "accumulate_grad_batches": 3}
    with healthmon.watch(model, opt, **kw) as hm:
        losses = train(hm, opt, classify(model), 4, accumulate=3)
    assert hm.global_step == 4 and serious(hm) == []
    logged = scalars(str(tmp_path))["healthmon/loss"]
    assert logged[2] == pytest.approx(sum(losses[6:9]) / 3, rel=1e-5)  # the step's mean loss


# ---- the observer effect ------------------------------------------------------------------------
def every_check_every_step() -> list[Any]:
    return [
        NonFiniteMonitor(),
        GradientNormMonitor(),
        GradientUnderflowMonitor(every_n_steps=1, histogram_every_n_steps=2),
        LogitsCheck(every_n_steps=1),
        HessianEigenMonitor(every_n_steps=3, top_k=2),
    ]


def _observed(tmp_path: Any, watched: bool) -> tuple[dict[str, torch.Tensor], Any]:
    torch.manual_seed(7)
    model = BatchNormDropout()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def clip() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    hm = None
    if watched:
        hm = healthmon.watch(
            model,
            opt,
            log_dir=tmp_path,
            monitors=every_check_every_step(),
            summary=False,
            log_every_n_steps=1,
        )
    train(hm, opt, classify(model), 12, data=batches(seed=3), clip=clip, gradients_ready=True)
    if hm is not None:
        hm.close()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, hm


def test_weights_and_buffers_are_bit_identical_with_every_monitor_on(tmp_path: Any) -> None:
    plain, _ = _observed(tmp_path / "plain", False)
    watched, hm = _observed(tmp_path / "watched", True)
    assert plain.keys() == watched.keys()
    for name in plain:
        assert torch.equal(plain[name], watched[name]), name
    assert hm.monitor(HessianEigenMonitor).estimates >= 3  # the estimates really ran


# ---- policies, lifecycle, arguments ---------------------------------------------------------------
def nan_from_step(model: nn.Module, step: int, watch: dict[str, Any]) -> Any:
    """A loss that turns NaN from optimizer step ``step`` on.

    The step is read from the watch, like a LightningModule reads ``self.global_step``: replays of
    earlier steps stay finite.
    """

    def loss_fn(batch: Any) -> torch.Tensor:
        x, y = batch
        h = model(x)
        if watch["hm"].global_step >= step:
            h = h * float("nan")  # BUG: nan
        return F.cross_entropy(h, y)

    return loss_fn


def test_raise_policy_raises_from_the_step_and_reports_the_exception(tmp_path: Any) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    holder: dict[str, Any] = {}

    def watched_training() -> None:
        with healthmon.watch(model, opt, log_dir=tmp_path, on_alert="raise", summary=False) as hm:
            holder["hm"] = hm
            train(hm, opt, nan_from_step(model, 2, holder), 6)

    with pytest.raises(NumericalHealthError) as info:
        watched_training()
    hm = holder["hm"]
    assert info.value.alert.step == 2 and info.value.alert.where == line_of(__file__, "nan")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    report = json.loads(Path(hm.report_path).read_text())
    assert report["run"]["status"] == "exception"
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_close_removes_every_hook_and_a_new_watch_works(tmp_path: Any) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hm = healthmon.watch(model, opt, log_dir=tmp_path / "a", summary=False)
    with pytest.raises(RuntimeError, match="already watched"):
        healthmon.watch(model, opt, log_dir=tmp_path / "b")
    train(hm, opt, classify(model), 2)
    hm.close()
    hm.close()  # twice is fine
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="closed"):
        hm.step(classify(model), next(batches()))
    with healthmon.watch(model, opt, log_dir=tmp_path / "c", summary=False, loss_fn=classify(model)) as again:
        for _, batch in zip(range(2), batches(), strict=False):
            again.step(batch).backward()  # hm.step(batch) with loss_fn
            opt.step()
            opt.zero_grad()
    assert again.global_step == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"on_alert": "panic"}, ValueError, "`on_alert`"),
        ({"accumulate_grad_batches": 0}, ValueError, "`accumulate_grad_batches`"),
        ({"total_steps": -1}, ValueError, "`total_steps`"),
        ({"log_every_n_steps": 0}, ValueError, "`log_every_n_steps`"),
        ({"loss_fn": 3}, TypeError, "`loss_fn`"),
        ({"scaler": object()}, TypeError, "`scaler`"),
        ({"writer": object()}, TypeError, "`writer`"),
        ({"log_dir": 5}, TypeError, "`log_dir`"),
        ({"fabric": object()}, TypeError, "`fabric`"),
        ({"report": "yes"}, TypeError, "`report`"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], error: type, match: str) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error, match=match):
        healthmon.watch(model, opt, **kwargs)
    assert not opt._optimizer_step_pre_hooks


def test_bad_model_and_optimizer_name_the_argument() -> None:
    model = mlp()
    with pytest.raises(TypeError, match="`model`"):
        healthmon.watch("net", torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="`optimizer_or_list`"):
        healthmon.watch(model, "sgd")
    with pytest.raises(ValueError, match="`optimizer_or_list`"):
        healthmon.watch(model, [])


def test_a_ddp_wrapped_model_keeps_the_users_names_and_replays_bypass_ddp(
    tmp_path: Any, monkeypatch: Any
) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    calls = {"n": 0}
    forward = DDP.forward

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DDP, "forward", counted)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    try:
        model = DDP(mlp())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def loss_fn(batch: Any) -> torch.Tensor:
            x, y = batch
            p = F.softmax(model(x) * 100, dim=1)
            return F.nll_loss(torch.log(p), y)  # BUG: ddp log

        with healthmon.watch(model, opt, log_dir=tmp_path, on_alert="stop", summary=False) as hm:
            losses = train(hm, opt, loss_fn, 3)
    finally:
        dist.destroy_process_group()
    assert sorted(hm.driver.params.names.values()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert hm.run.strategy == "DistributedDataParallel"
    found = next(a for a in hm.alerts if a.code == "activation.nonfinite")
    assert found.where == line_of(__file__, "ddp log")  # found by a replay (and the step-0 Hessian tried)
    assert calls["n"] == len(losses)  # the loop's forwards only: replays went around DDP


def test_amp_with_a_grad_scaler_is_bit_identical_with_and_without_the_watch(tmp_path: Any) -> None:
    states = []
    for watched in (False, True):
        torch.manual_seed(7)
        model = BatchNormDropout()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)  # skips a few steps first

        def loss_fn(batch: Any, model: nn.Module = model) -> torch.Tensor:
            x, y = batch
            with torch.autocast("cpu", dtype=torch.float16):
                return F.cross_entropy(model(x), y)

        def clip(model: nn.Module = model) -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

        kw = {"log_dir": tmp_path / str(watched), "monitors": every_check_every_step(), "summary": False}
        hm = healthmon.watch(model, opt, scaler=scaler, **kw) if watched else None
        train(hm, opt, loss_fn, 12, data=batches(seed=3), scaler=scaler, clip=clip)
        if hm is not None:
            hm.close()
            assert hm.driver.amp_skipped_steps >= 1 and hm.global_step == 12
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
