"""Run: what the monitors read from the training loop that drives them.

A monitor never talks to a particular trainer. It reads the step, the optimizers, the ranks, the
``GradScaler`` and the user's loss on a batch from a :class:`Run`, which each integration fills
in: :class:`~healthmon.integrations.lightning.LightningRun` from a Lightning ``Trainer``, the
plain-PyTorch and Fabric watchers from the loop they observe, the Hugging Face callback from the
``Trainer``'s state. The defaults here describe a single-process loop that replays nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from healthmon.engine.writer import Writer

try:
    from torch.distributed.tensor import DTensor

    HAS_DTENSOR = True
except ImportError:  # torch built without distributed support
    HAS_DTENSOR = False


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is running."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Run:
    """The facts of one training run that monitors read, refreshed by the integration at each hook.

    Attributes:
        model: the module being trained (parameters are named after it).
        global_step: optimizer steps taken so far (the step being prepared inside a step's hooks).
        current_epoch: the epoch, where the loop has epochs (else 0).
        optimizers: the run's optimizers, in a stable order (their index names per-optimizer tags).
        world_size: processes taking part; ``is_global_zero``: this process writes files.
        accumulate_grad_batches: micro-batches per optimizer step.
        batches_per_epoch: micro-batches in an epoch (``inf`` when unknown or streamed).
        log_every_n_steps: the loop's logging cadence, used when the monitors set none.
        clips_gradients: gradients are clipped between the hooks' measurement and the step.
        clip_norm: the global-norm threshold of that clipping when the loop says it (None:
            no clipping, clipping by value, or a threshold healthmon cannot see).
        total_steps: the planned number of optimizer steps (``inf`` when unknown).
        scaler: the enabled ``GradScaler`` of fp16 mixed precision, or None.
        precision: the precision setting, for the report ("32-true", "16-mixed", ...).
        strategy: the distribution strategy's name, for the report.
        automatic_optimization: the loop calls backward and step itself (False: the user's step
            function steps optimizers, so it must not be replayed with gradients).
        stop_requested: set by :meth:`request_stop`; the integration ends the loop.
    """

    def __init__(self, model: torch.nn.Module, optimizers: list[Any] | None = None) -> None:
        self.model = model
        self.global_step = 0
        self.current_epoch = 0
        self.optimizers: list[Any] = list(optimizers or [])
        self.world_size = 1
        self.is_global_zero = True
        self.accumulate_grad_batches = 1
        self.batches_per_epoch = math.inf
        self.log_every_n_steps = 50
        self.clips_gradients = False
        self.clip_norm: float | None = None
        self.total_steps = math.inf
        self.scaler: Any = None
        self.precision = "32-true"
        self.strategy = "single_device"
        self.automatic_optimization = True
        self.stop_requested = False

    # ---- control -----------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to end after this step (the ``stop`` policy)."""
        self.stop_requested = True

    # ---- ranks -------------------------------------------------------------------------------
    @property
    def root_device(self) -> torch.device:
        """The device collectives run on: the model's first parameter's device."""
        param = next(iter(self.model.parameters()), None)
        return param.device if param is not None else torch.device("cpu")

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (one all-reduce under DDP)."""
        if not distributed():
            return flag
        import torch.distributed as dist

        value = torch.tensor([float(flag)], device=self.root_device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def max_over_ranks(self, value: int) -> int:
        """The largest ``value`` over the ranks (so that all ranks agree on a schedule)."""
        if not distributed():
            return value
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], device=self.root_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order (None in a single process)."""
        if not distributed():
            return None
        import torch.distributed as dist

        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered

    @property
    def rank(self) -> int:
        """This process's global rank (0 in a single process)."""
        if not distributed():
            return 0
        import torch.distributed as dist

        return dist.get_rank()

    def local_gradients(self, grads: list[Tensor]) -> tuple[list[Tensor], bool]:
        """This rank's part of each gradient, and whether the parts are shards of a larger one.

        Replicated gradients (plain DDP: every rank holds the whole averaged gradient) have local
        norms. Sharded ``DTensor`` gradients need one all-reduce of squared local norms
        (:func:`~healthmon.numerics.gradients.reduce_sharded_norms`).
        """
        sharded = False
        if not HAS_DTENSOR or not any(isinstance(g, DTensor) for g in grads):
            return grads, sharded
        local = []
        for g in grads:
            if isinstance(g, DTensor):
                sharded = sharded or any(p.is_shard() for p in g.placements)
                g = g.to_local()
            local.append(g)
        return local, sharded

    # ---- replays -----------------------------------------------------------------------------
    def loss_on(self, batch: Any, batch_idx: int) -> Tensor | None:
        """The user's loss on ``batch``, computed the way the loop computes it (no backward).

        Replays (Hessian products, the NaN origin) call it inside :meth:`replay_context`. The
        base class cannot compute a loss: :meth:`replay_blocker` says so.
        """
        raise NotImplementedError("this loop gave healthmon no way to compute the loss of a batch")

    def replay_blocker(self) -> str | None:
        """Why computing the loss again could change the run or is impossible, or None."""
        return "no loss function was given to healthmon (pass loss_fn=... to replay a step)"

    @contextlib.contextmanager
    def replay_context(self) -> Iterator[None]:
        """The context a replayed loss runs in: the loop's autocast, every state restored."""
        from healthmon.engine.isolation import isolated

        with isolated(self.model):
            yield

    # ---- output ------------------------------------------------------------------------------
    def open_writer(self) -> Writer | None:
        """The writer for this run's scalars and texts (called on global rank zero only)."""
        return None


LossFn = Callable[[Any], Any]


def loss_of(output: Any) -> Any:
    """The loss inside what a step function returned.

    Accepted: a tensor, a dict with "loss", or an object with a ``loss`` attribute (Hugging Face
    model outputs).
    """
    if isinstance(output, dict):
        return output.get("loss")
    return getattr(output, "loss", output)
