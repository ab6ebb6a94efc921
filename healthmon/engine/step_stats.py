"""Per-step gradient statistics, computed once per optimizer step and shared by the monitors.

One fused norm kernel and one host synchronisation per checked optimizer step: the per-tensor
norms, the loss handed to backward, the loss scale and every value a monitor deferred are fetched
together; global, per-layer and per-group norms are then sums of squares on the host. A step the
:class:`~healthmon.schedules.CheckBudget` leaves unchecked costs one synchronisation of the loss
(and the deferred values) and no pass over the gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from healthmon.engine.run import Run
from healthmon.numerics.gradients import (
    combined_norm,
    combined_norms_by_group,
    reduce_sharded_norms,
    tensor_norms,
)
from healthmon.schedules import CheckBudget, LogCadence


def layer_of(param_name: str) -> str:
    """The module path that owns a parameter.

    >>> layer_of("net.0.weight"), layer_of("scale")
    ('net.0', '(root)')
    """
    head, _, _ = param_name.rpartition(".")
    return head or "(root)"


class ParamIndex:
    """Names of a module's parameters and the layer each belongs to, in registration order."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.names: dict[int, str] = {}
        self.layers: list[str] = []
        self.layer_of: dict[int, int] = {}
        layer_ids: dict[str, int] = {}
        for name, param in module.named_parameters():
            self.names[id(param)] = name
            layer = layer_of(name)
            if layer not in layer_ids:
                layer_ids[layer] = len(self.layers)
                self.layers.append(layer)
            self.layer_of[id(param)] = layer_ids[layer]

    def name(self, param: Tensor) -> str:
        """The parameter's name in the model (``<unnamed (shape)>`` for a tensor it does not own)."""
        return self.names.get(id(param), f"<unnamed {tuple(param.shape)}>")


@dataclass
class GradStep:
    """Gradient statistics of one optimizer step, shared by the monitors.

    ``per_tensor`` stays on the device (``per_tensor_host`` is its copy); the floats were fetched
    with one host synchronisation. Norms are measured after AMP unscaling and before gradient
    clipping. ``loss`` is the loss handed to backward since the previous optimizer step (the
    user's loss: AMP scaling undone), summed over accumulated micro-batches, which the loops
    divide by their number: their mean. ``skipped``: a ``GradScaler`` is active and the gradients
    are non-finite, so the scaler will skip this step (``loss_scale`` is the scale it used).
    ``optimizer_index`` is the optimizer's position in ``run.optimizers``; ``logged`` says whether
    scalars are written at this step (``layer_norms``/``group_norms`` are then set).
    """

    step: int
    params: list[Tensor]
    per_tensor: Tensor
    per_tensor_host: list[float]
    norm: float
    loss: float | None
    layer_norms: dict[str, float] | None
    group_norms: list[float] | None
    optimizer_index: int = 0
    logged: bool = False
    skipped: bool = False
    loss_scale: float | None = None


def optimizer_params_with_grad(optimizer: Any) -> tuple[list[Tensor], list[int]]:
    """The optimizer's parameters that have a gradient this step, and each one's group index."""
    params, groups = [], []
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                groups.append(gi)
    return params, groups


def optimizer_index(run: Run, optimizer: Any) -> int:
    """The position of ``optimizer`` in ``run.optimizers`` (0 when it is not found there)."""
    for i, candidate in enumerate(run.optimizers):
        if candidate is optimizer or getattr(candidate, "optimizer", None) is optimizer:
            return i
    return 0


def scale_tensor(scaler: Any) -> Tensor | None:
    """The ``GradScaler``'s current scale as a device tensor (no host sync), or None."""
    scale = getattr(scaler, "_scale", None) if scaler is not None else None
    return scale if isinstance(scale, Tensor) else None


class StepStatistics:
    """The parameter index, the accumulated loss and the per-step gradient statistics of a run."""

    def __init__(self, log_every_n_steps: int | None = None, overhead_budget: float | None = None) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.budget = CheckBudget(overhead_budget)
        self.unchecked_step = -1  # the last step whose loss was finite and whose gradients were not checked
        self.params: ParamIndex | None = None
        self.scaler: Any = None
        self.amp_skipped_steps = 0
        self._loss_sum: Tensor | None = None
        self._cache: dict[int, GradStep] = {}
        self._cache_step = -1
        self._deferred: list[tuple[Tensor, Callable[[list[float]], None]]] = []
        self._log_cadence: dict[int, LogCadence] = {}
        self._optimizer_steps: dict[int, int] = {}  # optimizer index -> its steps so far
        self._last_checked: dict[int, int] = {}  # optimizer index -> the count of its last checked step
        self._current = (0, 0)  # the optimizer index and count of the step asked about last
        self.on_stride = True  # the last step asked about was on the budget's stride

    def setup(self, run: Run) -> None:
        """Index the parameters and find the scaler; once per fit."""
        self.params = ParamIndex(run.model)
        self.scaler = run.scaler
        self.budget.reset()
        self.unchecked_step = -1
        if run.world_size > 1 or self.scaler is not None:
            # ranks must agree on the checked steps, and every step of a GradScaler can overflow
            self.budget.every_step()
        self._loss_sum = None
        self._cache.clear()
        self._cache_step = -1
        self._log_cadence.clear()
        self._optimizer_steps.clear()
        self._last_checked.clear()
        self._current = (0, 0)

    def is_log_step(self, run: Run, optimizer_index: int | None = None) -> bool:
        """Whether scalars are written at this step.

        Every ``log_every_n_steps`` global steps; with ``optimizer_index``, also when that
        optimizer has not logged for that many steps (under manual optimisation each optimizer
        step is a global step, so a second optimizer may never step on a multiple).
        """
        every = self.log_every(run)
        if optimizer_index is None:
            return run.global_step % every == 0
        return self._log_cadence.setdefault(optimizer_index, LogCadence()).due(run.global_step, every)

    def next_checked_step(self, run: Run, due_by: float, due: Callable[[int], bool] | None = None) -> int:
        """The first global step after this one at which a run's one optimizer will be checked.

        That is the stride's next step (``stride`` steps after the last checked one), the next
        log step, ``due_by`` (the first step the monitors' own cadences name) or a step ``due``
        names (the cadences known only step by step), whichever comes first: at most ``stride``
        steps ahead. Nothing is counted.
        """
        step, count = run.global_step, self._optimizer_steps.get(0, 0)  # count: the next step's
        on_stride = step + 1 + self.budget.next_check(count, self._last_checked.get(0)) - count
        found = min(on_stride, self._next_log_step(step, run), due_by)
        if due is not None:
            found = next((s for s in range(step + 1, int(found)) if due(s)), found)
        return int(found)

    def _next_log_step(self, step: int, run: Run) -> int:
        """The first global step after ``step`` at which the one optimizer logs."""
        cadence = self._log_cadence.get(0)
        if cadence is None or cadence.last is None:
            return step + 1  # the first step asked always logs
        every = self.log_every(run)
        return min((step // every + 1) * every, max(cadence.last + every, step + 1))

    def count_unchecked(self) -> None:
        """Count a step of the run's one optimizer known in advance not to be checked."""
        count = self._optimizer_steps.get(0, 0)
        self._optimizer_steps[0] = count + 1
        self._current = (0, count)

    def checks(self, run: Run, optimizer: Any) -> bool:
        """Whether this step of ``optimizer`` gets the gradient checks (the budget's or a log step).

        The budget's stride counts each optimizer's own steps: under manual optimization two
        optimizers take turns on the global step, and each is checked at least every k-th of its
        steps. A step checked for another reason (a log step, a monitor's own cadence, a NaN
        loss: :meth:`mark_checked`) starts the count again, so the stride adds checks only where
        the others leave a gap of ``stride`` steps.
        """
        index = optimizer_index(run, optimizer) if len(run.optimizers) > 1 else 0
        count = self._optimizer_steps.get(index, 0)
        self._optimizer_steps[index] = count + 1
        self._current = (index, count)
        self.on_stride = self.budget.checks(count, self._last_checked.get(index))
        return self.on_stride or self._logs_at(index, run.global_step, run)

    def mark_checked(self) -> None:
        """The step asked about last was checked (for whatever reason): the stride counts from it."""
        index, count = self._current
        self._last_checked[index] = count

    def _logs_at(self, index: int, step: int, run: Run) -> bool:
        """Whether optimizer ``index`` logs at global ``step`` (its first step always does)."""
        cadence = self._log_cadence.get(index)
        return cadence is None or cadence.would_log(step, self.log_every(run))

    def log_every(self, run: Run) -> int:
        """The logging interval: the monitors' ``log_every_n_steps``, else the loop's."""
        return self.log_every_n_steps or max(int(run.log_every_n_steps), 1)

    def add_loss(self, loss: Tensor, *, scaled: bool = True) -> None:
        """Accumulate the (accumulation-normalised) loss handed to backward; no host sync.

        Under fp16 mixed precision the loss reaching backward is multiplied by the
        ``GradScaler``'s scale; dividing by the scale tensor on the device gives back the user's
        loss (exactly: the scale is a power of two). ``scaled=False``: the loss is the user's
        already (the loop hands it over before scaling), nothing is divided.
        """
        scale = scale_tensor(self.scaler) if scaled and self.scaler is not None else None
        if scale is None and self._loss_sum is None:
            self._loss_sum = loss  # one micro-batch: kept as handed over, detached when it is read
            return
        loss = loss.detach().float()
        if scale is not None:
            loss = loss / scale.to(loss.device)
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum.detach().float() + loss

    def end_step(self) -> None:
        """Forget the accumulated loss once every monitor has seen this optimizer step.

        The next optimizer step, of the same or of another optimizer, then gets only its own loss.
        """
        self._loss_sum = None

    def grad_step(self, run: Run, optimizer: Any) -> GradStep:
        """Gradient statistics of this optimizer step, computed once and shared."""
        step = run.global_step
        if step != self._cache_step:
            self._cache.clear()
            self._cache_step = step
        cached = self._cache.get(id(optimizer))
        if cached is not None:
            return cached
        params, groups = optimizer_params_with_grad(optimizer)
        grads, sharded = run.local_gradients([p.grad for p in params if p.grad is not None])
        per_tensor = tensor_norms(grads)
        if sharded:
            per_tensor = reduce_sharded_norms(per_tensor)
        device, dtype = per_tensor.device, per_tensor.dtype
        loss = self._loss_sum
        parts = [per_tensor]
        if loss is not None:
            parts.append(loss.detach().to(device=device, dtype=dtype).reshape(1))
        scale = scale_tensor(self.scaler)
        if scale is not None:
            parts.append(scale.detach().to(device=device, dtype=dtype).reshape(1))
        host = self._fetch(parts)
        norms = host[: len(params)]
        index = optimizer_index(run, optimizer)
        norm = combined_norm(norms)  # = the norm of the concatenated gradient
        # The scaler skips the step exactly when the unscaled gradients hold NaN/Inf.
        skipped = self.scaler is not None and not math.isfinite(norm)
        self.amp_skipped_steps += int(skipped)
        layer_norms: dict[str, float] | None = None
        group_norms: list[float] | None = None
        logged = self.is_log_step(run, index)
        if logged and self.params is not None and params:
            index_ = self.params
            layers = [index_.layers[index_.layer_of.get(id(p), 0)] for p in params]
            layer_norms = combined_norms_by_group(norms, layers)
            by_group = combined_norms_by_group(norms, groups)
            group_norms = [by_group.get(g, 0.0) for g in range(len(optimizer.param_groups))]
        result = GradStep(
            step=step,
            params=params,
            per_tensor=per_tensor,
            per_tensor_host=norms,
            norm=norm,
            loss=None if loss is None else host[len(params)],
            layer_norms=layer_norms,
            group_norms=group_norms,
            optimizer_index=index,
            logged=logged,
            skipped=skipped,
            loss_scale=host[len(params) + (loss is not None)] if scale is not None else None,
        )
        self._cache[id(optimizer)] = result
        return result

    def _fetch(self, parts: list[Tensor]) -> list[float]:
        """``parts`` and the deferred values in one host synchronisation; run the deferred callbacks.

        Returns the values of ``parts``, concatenated.
        """
        device, dtype = parts[0].device, parts[0].dtype
        deferred, self._deferred = self._deferred, []
        parts.extend(t.detach().reshape(-1).to(device=device, dtype=dtype) for t, _ in deferred)
        host = (torch.cat(parts) if len(parts) > 1 else parts[0]).tolist()  # the one host sync
        end = len(host)
        for t, callback in reversed(deferred):
            start = end - t.numel()
            callback(host[start:end])
            end = start
        return host[:end]

    def fetch_loss(self, run: Run) -> float | None:
        """The loss of an unchecked step (and the deferred values), in one host synchronisation.

        No pass over the gradients. Returns None when no loss was handed to backward. A finite
        loss marks the step as :attr:`unchecked_step`: if its update corrupts the weights, the
        next step says its gradients were not checked.
        """
        loss = self._loss_sum
        if loss is None:
            self.flush_deferred()
            return None
        value = loss.item() if not self._deferred else self._fetch([loss.detach().float().reshape(1)])[0]
        if math.isfinite(value):
            self.unchecked_step = run.global_step
        return value

    @property
    def has_deferred(self) -> bool:
        """Whether values wait for the next synchronisation (their callbacks run with it)."""
        return bool(self._deferred)

    def defer(self, values: Tensor, callback: Callable[[list[float]], None]) -> None:
        """Fetch device ``values`` with the next step's synchronisation and hand them to ``callback``.

        Lets a monitor log numbers computed after the optimizer step (update ratios, clipped norms)
        without a synchronisation of its own.
        """
        self._deferred.append((values, callback))

    def flush_deferred(self) -> None:
        """Fetch what is still deferred (end of training)."""
        deferred, self._deferred = self._deferred, []
        for values, callback in deferred:
            callback(values.detach().reshape(-1).float().tolist())
