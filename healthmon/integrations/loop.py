"""healthmon in a hand-written PyTorch or Lightning Fabric loop: :func:`watch`.

Three lines in the user's loop::

    hm = healthmon.watch(model, optimizer, log_dir="runs/x")   # or: with healthmon.watch(...) as hm:
    for batch in loader:
        loss = hm.step(compute_loss, batch)                      # was: loss = compute_loss(batch)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
    hm.close()                                                   # the report and the summary

:class:`Watch` drives the same :class:`~healthmon.engine.driver.Driver` and the same monitors as
the Lightning callback. ``hm.step`` is the micro-batch: ``batch_start``, the user's function (its
loss), ``before_backward``; the function is also what replays call (the NaN origin, Hessian
products), as Lightning calls ``training_step``. The optimizer's step pre-hook is the gradient
check (``before_optimizer_step``), its post-hook the end of the step (``global_step += 1``,
``batch_end``). Where gradients are unscaled or clipped before the step, the check runs right
there instead: after ``GradScaler.unscale_`` (healthmon wraps the scaler it was given),
inside ``fabric.clip_gradients`` before clipping, or at :meth:`Watch.gradients_ready`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from healthmon import _checks
from healthmon.alerts import OnAlert, Severity
from healthmon.integrations import loop_fabric
from healthmon.integrations.loop_checks import (
    check_fabric,
    check_model,
    check_optimizers,
    check_scaler,
    check_writer,
)
from healthmon.integrations.loop_run import LoopRun, StepFn
from healthmon.integrations.loop_watch import WATCHED, Watch
from healthmon.monitors.base import Monitor
from healthmon.schedules import DEFAULT_OVERHEAD_BUDGET

__all__ = ["Watch", "watch"]


def watch(
    model: Any,
    optimizer_or_list: Any,
    *,
    loss_fn: StepFn | None = None,
    scaler: Any = None,
    writer: Any = None,
    log_dir: str | None = None,
    accumulate_grad_batches: int = 1,
    total_steps: int | None = None,
    fabric: Any = None,
    on_alert: OnAlert = "warn",
    fail_on: Severity = "warning",
    monitors: Sequence[Monitor] | None = None,
    log_every_n_steps: int | None = None,
    overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET,
    report: bool = True,
    summary: bool = True,
) -> Watch:
    """Watch the numerical health of a plain PyTorch or Fabric training loop.

    Args:
        model: the module the loop trains (``DistributedDataParallel``-wrapped, compiled, or the
            module ``fabric.setup`` returned: parameters are named after the module inside).
        optimizer_or_list: its optimizer, or a list of them (Fabric's wrappers are accepted).
        loss_fn: the function computing the loss of a batch, ``loss_fn(batch) -> loss`` (or a dict
            with "loss", or an object with ``.loss``); with it ``hm.step(batch)`` is enough.
            ``hm.step(fn, batch)`` makes ``fn`` the step function instead.
        scaler: the ``GradScaler`` the loop uses (fp16 mixed precision); under Fabric, Fabric's own.
        writer: a ``SummaryWriter`` to write healthmon's charts into (left open).
        log_dir: else the folder of healthmon's own event files (default ``runs/healthmon``, or
            Fabric's ``TensorBoardLogger`` when it has one). The JSON report goes beside them.
        accumulate_grad_batches: micro-batches (``hm.step`` calls) per optimizer step.
        total_steps: the planned number of optimizer steps (paces the Hessian monitor's budget).
        fabric: the ``Fabric`` object of a Fabric loop (call ``fabric.setup`` first).
        on_alert: "warn", "raise" (``NumericalHealthError`` out of ``hm.step`` or the optimizer
            step) or "stop" (the offending step changes nothing and ``hm.should_stop`` is True).
        fail_on: lowest severity that raises or stops ("info", "warning" or "error").
        monitors: the monitors to run; default ``default_monitors()``, as ``HealthMonitor``.
        log_every_n_steps: how often scalars are written (default 50).
        overhead_budget: the share of the step time the checks may take (default 0.01); see
            :class:`~healthmon.monitors.health.HealthMonitor`.
        report: write the JSON report at :meth:`Watch.close`.
        summary: print the summary at :meth:`Watch.close` (rank zero).

    Returns:
        The :class:`Watch`; close it (or use it as a context manager) to write the report.
    """
    from healthmon.monitors.bundle import bundle_driver

    check_model(model, "model")
    optimizers = check_optimizers(optimizer_or_list)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"`loss_fn`: expected a function batch -> loss, or None, got {loss_fn!r}.")
    scaler = check_scaler(scaler)
    check_writer(writer, log_dir)
    _checks.positive_int(accumulate_grad_batches, "accumulate_grad_batches")
    if total_steps is not None:
        _checks.positive_int(total_steps, "total_steps")
    if fabric is not None:
        scaler = check_fabric(fabric, model, scaler)
    elif loop_fabric.is_fabric_module(model):
        raise ValueError(
            "`fabric`: the model was set up by Fabric; pass the Fabric object too: "
            "healthmon.watch(model, optimizer, fabric=fabric)."
        )
    busy = [i for i, opt in enumerate(optimizers) if opt in WATCHED]
    if busy:
        raise RuntimeError(
            f"`optimizer_or_list`: optimizer {busy[0]} is already watched by an open healthmon.watch; "
            "close that watch first (hm.close(), or use `with healthmon.watch(...) as hm:`)."
        )
    driver = bundle_driver(
        on_alert=on_alert,
        fail_on=fail_on,
        monitors=monitors,
        log_every_n_steps=log_every_n_steps,
        overhead_budget=overhead_budget,
        report=report,
        summary=summary,
    )
    run = LoopRun(
        model,
        optimizers,
        step_fn=loss_fn,
        scaler=scaler,
        writer=writer,
        log_dir=None if log_dir is None else str(log_dir),
        accumulate_grad_batches=accumulate_grad_batches,
        total_steps=total_steps,
        log_every_n_steps=log_every_n_steps or 50,
        fabric=fabric,
    )
    return Watch(run, driver)
