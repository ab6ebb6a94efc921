"""Watch: one watched plain-PyTorch or Fabric loop, driving healthmon's driver from the loop's calls.

``hm.step`` is the micro-batch (``batch_start``, the user's function, ``before_backward``); the
optimizer's step pre-hook is the gradient check (``before_optimizer_step``) and its post-hook the
end of the step (``global_step += 1``, ``batch_end``), as Lightning's hooks are under the
``Trainer``. Where gradients are unscaled or clipped before the step, the check runs right there:
after ``GradScaler.unscale_`` (the scaler given to :func:`~healthmon.integrations.loop.watch` is
wrapped on the instance), inside ``fabric.clip_gradients`` before clipping (Fabric's
``unscale_gradients``), or at :meth:`Watch.gradients_ready`. Everything is removed at
:meth:`Watch.close`.
"""

from __future__ import annotations

import weakref
from typing import Any, Literal

import torch
from torch import Tensor

from healthmon.engine.driver import Driver
from healthmon.engine.run import loss_of
from healthmon.integrations import loop_fabric
from healthmon.integrations.loop_run import LoopRun, unwrap_optimizer
from healthmon.monitors.bundle import BundleResults, bundle_config

#: Torch optimizers under an open watch (a second watch would check every step twice).
WATCHED: weakref.WeakSet[Any] = weakref.WeakSet()
_NO_BATCH = object()


class Watch(BundleResults):
    """One watched loop: call :meth:`step` per micro-batch, :meth:`close` at the end.

    Attributes:
        run: the :class:`LoopRun` the monitors read.
        driver: the driver of the monitors (the same as ``HealthMonitor``'s).
    """

    def __init__(self, run: LoopRun, driver: Driver) -> None:
        self.run = run
        self.driver = driver
        self._handles: list[Any] = []
        self._patches: list[tuple[Any, str, Any]] = []
        self._checked: set[int] = set()  # optimizers whose gradients were checked this step
        self._batch: Any = None
        self._batch_idx = -1
        self._closed = False
        self.driver.config.update(bundle_config(driver))
        self.driver.config["loop"] = self._loop_config()
        self.driver.setup(run)
        try:
            self.driver.start(run)  # the monitors' own optimizer hooks first: they fire before ours
            for opt in run.optimizers:
                self._handles.append(opt.register_step_pre_hook(self._pre_step))
                self._handles.append(opt.register_step_post_hook(self._post_step))
                WATCHED.add(opt)
            if run.scaler is not None:
                self._call_after(run.scaler, "unscale_")
            if run.fabric is not None:
                self._call_after(loop_fabric.precision_plugin(run.fabric), "unscale_gradients")
        except BaseException:
            self._release()
            self.driver.teardown(run)  # close the writer the setup opened
            raise

    # ---- the loop's side -----------------------------------------------------------------------
    def step(self, fn: Any, batch: Any = _NO_BATCH) -> Any:
        """One micro-batch: ``fn(batch)``, watched. Returns what ``fn`` returned (the loss).

        ``fn`` returns the micro-batch's own loss (not divided by ``accumulate_grad_batches``, not
        scaled by a ``GradScaler``): ``healthmon/loss`` is then the step's mean loss.

        ``hm.step(batch)`` uses the ``loss_fn`` given to :func:`watch`. ``fn`` must compute the loss
        without stepping an optimizer: healthmon calls it again on saved batches (the NaN origin,
        Hessian products), with every state it could change restored afterwards.
        """
        self._ensure_open()
        if batch is _NO_BATCH:
            if self.run.step_fn is None:
                raise TypeError(
                    "`hm.step`: expected hm.step(fn, batch), or hm.step(batch) with "
                    "healthmon.watch(..., loss_fn=fn)."
                )
            fn, batch = self.run.step_fn, fn
        elif not callable(fn):
            raise TypeError(f"`fn`: expected a function batch -> loss, got {fn!r}.")
        self._settle()
        run = self.run
        run.step_fn = fn
        run.capture_autocast()
        self._batch_idx += 1
        self._batch = batch
        # outside the user's autocast, as Lightning's batch start is outside the precision plugin's:
        # the Hessian's products there are float32 (fp16 autocast cannot be differentiated twice)
        if run.autocast is not None and run.autocast[1]:
            with torch.autocast(run.autocast[0], enabled=False):
                self.driver.batch_start(run, batch, self._batch_idx)
        else:  # no autocast to leave: no context manager on every step
            self.driver.batch_start(run, batch, self._batch_idx)
        output = fn(batch)
        loss = loss_of(output)
        if isinstance(loss, Tensor):
            # Lightning hands backward the loss divided by the micro-batches of a step (their sum
            # is then the step's mean loss) and scaled by the GradScaler: here the user's own loss
            k = run.accumulate_grad_batches
            self.driver.before_backward(run, loss / k if k > 1 else loss, scaled=False)
        return output

    def gradients_ready(self, optimizer: Any = None) -> None:
        """Check the gradients now, before the loop clips them (all optimizers, or ``optimizer``).

        Call it after ``backward`` (after ``scaler.unscale_(optimizer)`` with a ``GradScaler``) and
        before ``clip_grad_norm_``; the optimizer step then does not check again. Not needed
        without clipping, nor around ``fabric.clip_gradients`` (healthmon checks inside it).
        """
        self._ensure_open()
        run = self.run
        targets = run.optimizers if optimizer is None else [self._ours(optimizer, "optimizer")]
        for opt in targets:
            if run.scaler is not None and not _unscaled(run.scaler, opt):
                raise RuntimeError(
                    "`hm.gradients_ready`: the GradScaler has not unscaled this optimizer's gradients "
                    "yet; call scaler.unscale_(optimizer) first (healthmon then checks there)."
                )
            run.clipping = "before clipping"
            self._check(opt)

    @property
    def should_stop(self) -> bool:
        """True once an alert stopped the run (``on_alert="stop"``): end the loop."""
        return self.driver.stop_requested or self.run.stop_requested

    @property
    def global_step(self) -> int:
        """Optimizer steps counted so far (steps the ``GradScaler`` skipped included)."""
        return self.run.global_step

    def close(self, error: BaseException | None = None) -> None:
        """End the run: write the report and the summary, and remove every hook. Safe to call twice.

        The report's status is "completed", "stopped", or "exception" with ``error``.
        """
        if self._closed:
            return
        run = self.run
        try:
            if error is None:
                try:
                    self._settle()
                    self.driver.train_end(run)
                except BaseException as raised:
                    error = raised
                    raise
        finally:
            self._closed = True
            self.driver.config["loop"] = self._loop_config()
            try:
                self.driver.end(run, error)
            finally:
                self._release()
                self.driver.teardown(run)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        self.close(exc)
        return False

    # ---- hooks ---------------------------------------------------------------------------------
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._closed:
            self._check(optimizer)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._closed:
            self._end_step()

    def _check(self, optimizer: Any) -> None:
        """The driver's gradient check for ``optimizer``, once per step."""
        if id(optimizer) in self._checked:
            return
        self._checked.add(id(optimizer))
        self.driver.before_optimizer_step(self.run, optimizer)

    def _end_step(self) -> None:
        """An optimizer step is over (taken, or skipped by the GradScaler): count it."""
        self._checked.clear()
        self.run.global_step += 1
        self.driver.batch_end(self.run, self._batch, max(self._batch_idx, 0))

    def _settle(self) -> None:
        """End a step whose gradients were checked but whose optimizer never stepped.

        The GradScaler found inf/NaN and skipped ``optimizer.step``: the step ends here, at the next
        micro-batch.
        """
        if self._checked:
            self._end_step()

    def _call_after(self, obj: Any, name: str) -> None:
        """Wrap ``obj.name(optimizer, ...)`` (on the instance) to check gradients right after it.

        Used for ``GradScaler.unscale_`` and Fabric's ``unscale_gradients`` (before clipping).
        """
        original = getattr(obj, name)
        before = vars(obj).get(name)

        def call_then_check(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(optimizer, *args, **kwargs)
            inner = unwrap_optimizer(optimizer)
            if not self._closed and any(inner is opt for opt in self.run.optimizers):
                self.run.clipping = "before clipping"
                self._check(inner)
            return result

        vars(obj)[name] = call_then_check
        self._patches.append((obj, name, before))

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for obj, name, before in reversed(self._patches):
            if before is None:
                vars(obj).pop(name, None)
            else:
                vars(obj)[name] = before
        self._patches.clear()
        for opt in self.run.optimizers:
            WATCHED.discard(opt)

    # ---- helpers -------------------------------------------------------------------------------
    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError("This healthmon watch is closed; create a new one with healthmon.watch(...).")

    def _ours(self, optimizer: Any, name: str) -> Any:
        inner = unwrap_optimizer(optimizer)
        for opt in self.run.optimizers:
            if opt is inner:
                return opt
        raise ValueError(f"`{name}`: expected one of the watched optimizers, got {optimizer!r}.")

    def _loop_config(self) -> dict[str, Any]:
        run = self.run
        return {
            "integration": "fabric" if run.fabric is not None else "pytorch",
            "accumulate_grad_batches": run.accumulate_grad_batches,
            "grad_scaler": run.scaler is not None,
            "clipping": run.clipping,
        }


def _unscaled(scaler: Any, optimizer: Any) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` ran since the scaler's last ``update``."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict):
        return True  # another scaler implementation: trust the caller
    state = states.get(id(optimizer))  # .get: the defaultdict must not grow
    stage = state.get("stage") if isinstance(state, dict) else None
    return getattr(stage, "name", "") == "UNSCALED"
