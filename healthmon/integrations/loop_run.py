"""LoopRun: the :class:`~healthmon.engine.run.Run` of a hand-written PyTorch or Fabric loop.

A plain loop has no ``Trainer`` to read: :class:`~healthmon.integrations.loop.Watch` counts the
optimizer steps itself and keeps this object up to date. What a replay needs comes from the loop
too: the user's step function (the function handed to ``hm.step``) computes the loss of a batch,
and the autocast state seen when it last ran is the one a replay runs under.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from healthmon.engine.isolation import isolated
from healthmon.engine.run import Run, distributed, loss_of
from healthmon.engine.writer import Writer
from healthmon.integrations import loop_fabric

#: Where the event files and the report go when the user names neither a writer nor a folder.
DEFAULT_LOG_DIR = "runs/healthmon"

StepFn = Callable[[Any], Any]


def unwrap_module(model: torch.nn.Module) -> torch.nn.Module:
    """The user's own module inside ``DistributedDataParallel``, ``torch.compile`` or Fabric's wrapper."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        if loop_fabric.is_fabric_module(model):
            model = loop_fabric.original_module(model)
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(compiled := getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile
            model = compiled
    return model


@contextlib.contextmanager
def direct_ddp(ddp: torch.nn.Module) -> Iterator[None]:
    """Calls of a ``DistributedDataParallel`` wrapper go straight to its module.

    A replay on one rank must not broadcast buffers or prepare a gradient reduction that never comes.
    """
    own = vars(ddp)
    before = own.get("forward")
    own["forward"] = ddp.module
    try:
        yield
    finally:
        if before is None:
            own.pop("forward", None)
        else:
            own["forward"] = before


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Fabric's ``_FabricOptimizer`` (hooks go on the inner one)."""
    return optimizer.optimizer if loop_fabric.is_fabric_optimizer(optimizer) else optimizer


def dtype_precision(model: torch.nn.Module) -> str:
    """Return "16-true", "bf16-true" or "32-true" after the dtype of the model's floating parameters."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {torch.float16: "16-true", torch.bfloat16: "bf16-true"}.get(dtype, "32-true")


class LoopRun(Run):
    """A :class:`Run` that a :class:`~healthmon.integrations.loop.Watch` keeps up to date.

    Args:
        model: the module as the loop calls it (``DistributedDataParallel``, Fabric's wrapper or
            the plain module); parameters are named after the user's module inside.
        optimizers: the torch optimizers (unwrapped).
        step_fn: the function computing the loss of a batch, if known before the first step.
        scaler: the enabled ``GradScaler`` of fp16 mixed precision, or None.
        writer: a ``SummaryWriter`` to write through, or None.
        log_dir: the folder for healthmon's own event files and the report, or None.
        fabric: the ``Fabric`` object of a Fabric loop, or None.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: list[Any],
        *,
        step_fn: StepFn | None = None,
        scaler: Any = None,
        writer: Any = None,
        log_dir: str | None = None,
        accumulate_grad_batches: int = 1,
        total_steps: int | None = None,
        log_every_n_steps: int = 50,
        fabric: Any = None,
    ) -> None:
        super().__init__(unwrap_module(model), optimizers)
        self.wrapper = model if loop_fabric.is_fabric_module(model) else None
        self.ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
        self.step_fn = step_fn
        self.scaler = scaler
        self.writer = writer
        self.log_dir = log_dir
        self.fabric = fabric
        self.accumulate_grad_batches = accumulate_grad_batches
        self.total_steps = math.inf if total_steps is None else float(total_steps)
        self.log_every_n_steps = log_every_n_steps
        #: where gradients are measured relative to the loop's clipping: "unknown" while the
        #: checks run in the optimizer's step pre-hook (after any clipping the loop does),
        #: "before clipping" once they ran from gradients_ready, GradScaler.unscale_ or
        #: fabric.clip_gradients.
        self.clipping = "unknown"
        self.autocast: tuple[str, bool, torch.dtype] | None = None
        # kept, not looked up each step (a walk over every module): the optimizers hold the same
        # parameter objects, so the loop cannot replace them while it trains
        self._first_param: Tensor | None = next(iter(self.model.parameters()), None)
        self._replaying = False  # inside replay_context: loss_on runs under the loop's autocast
        if fabric is not None:
            self.world_size = int(fabric.world_size)
            self.is_global_zero = bool(fabric.is_global_zero)
            self.precision = loop_fabric.precision_name(fabric) or dtype_precision(self.model)
            self.strategy = type(fabric.strategy).__name__
        else:
            import torch.distributed as dist

            self.world_size = dist.get_world_size() if distributed() else 1
            self.is_global_zero = self.rank == 0
            self.precision = "16-mixed" if scaler is not None else dtype_precision(self.model)
            wrapped = model is not self.model
            self.strategy = type(model).__name__ if wrapped else ("ddp" if distributed() else "single_device")

    @property
    @override
    def root_device(self) -> torch.device:
        """The device of the model's first parameter (read from the parameter kept at the start)."""
        param = self._first_param
        return param.device if param is not None else torch.device("cpu")

    # ---- what the loop tells -------------------------------------------------------------------
    def capture_autocast(self) -> None:
        """Remember the autocast state the step function runs under (replays run under it too)."""
        device = self.root_device.type
        enabled = torch.is_autocast_enabled(device)
        self.autocast = (device, enabled, torch.get_autocast_dtype(device))
        if enabled and self.fabric is None and self.precision.endswith("-true"):
            dtype = self.autocast[2]
            self.precision = "bf16-mixed" if dtype == torch.bfloat16 else "16-mixed"

    # ---- replays -------------------------------------------------------------------------------
    @override
    def loss_on(self, batch: Any, batch_idx: int) -> Tensor | None:
        """The step function's loss on ``batch``, around ``DistributedDataParallel`` or Fabric's wrapper.

        Every replay calls this. Inside :meth:`replay_context` (the replays of a step) it runs under
        the loop's autocast; outside it (the Hessian's products, called from ``hm.step``, possibly
        inside the user's ``torch.autocast``) with autocast off, in float32, as Lightning calls
        ``training_step`` there: fp16 autocast's kernels cannot be differentiated twice.
        """
        if self.step_fn is None:
            return super().loss_on(batch, batch_idx)
        with self._as_in_the_loop(autocast=self._replaying):
            return loss_of(self.step_fn(batch))

    @override
    def replay_blocker(self) -> str | None:
        if self.step_fn is not None:
            return None
        return "healthmon knows no step function yet (call hm.step(fn, batch), or pass loss_fn=...)"

    @contextlib.contextmanager
    @override
    def replay_context(self) -> Iterator[None]:
        """Every state restored; the loop's autocast; under Fabric, around the strategy's wrapper."""
        with isolated(self.model), self._as_in_the_loop():
            self._replaying = True
            try:
                yield
            finally:
                self._replaying = False

    @contextlib.contextmanager
    def _as_in_the_loop(self, *, autocast: bool = True) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.wrapper is not None:
                stack.enter_context(loop_fabric.direct_forward(self.wrapper))
            if self.ddp is not None:
                stack.enter_context(direct_ddp(self.ddp))
            if self.autocast is not None:  # the loop's autocast, or autocast off
                device, enabled, dtype = self.autocast
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled and autocast))
            yield

    # ---- output --------------------------------------------------------------------------------
    @override
    def open_writer(self) -> Writer | None:
        from healthmon.sinks.tensorboard import TensorBoardSink

        if self.writer is not None:
            return TensorBoardSink.standalone(self.writer)
        if self.log_dir is None and self.fabric is not None:
            experiment = loop_fabric.tensorboard_experiment(self.fabric)
            if experiment is not None:
                return TensorBoardSink.standalone(experiment)
        return TensorBoardSink.standalone(self.log_dir or DEFAULT_LOG_DIR)
