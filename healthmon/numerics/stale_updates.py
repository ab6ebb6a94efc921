"""Lost updates: sampled weights the optimizer step left bit-identical although it was asked to move them.

``w + update == w`` when the update is below half a unit in the last place of ``w`` (bfloat16 or
float16 weights with a small learning rate). :class:`StaleSampler` reads a fixed random sample of
elements of each parameter right before ``optimizer.step`` (in ``on_before_optimizer_step``, once
the gradients are final) and again right after it (the optimizer's step post-hook); the model is
never copied. Only updates the optimizer asked for count (:func:`asks_for_updates`). The
``[stale, eligible]`` counts stay on the device until the monitor's next host synchronisation;
:func:`stale_summary` then gives the shares per dtype and per layer and the ``update.stale``
finding.

This module is pure torch: no Lightning, no logging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from healthmon.numerics.findings import Finding
from healthmon.numerics.precision import dtype_name, stale_counts
from healthmon.numerics.underflow import grouped_counts, sample_indices

#: A scheduled learning rate below this share of its base asks for no update.
SCHEDULE_FLOOR = 0.01


def learning_rate(group: Mapping[str, Any], *, exact: bool = True) -> float:
    """A parameter group's learning rate (groups of optimizers without one count as moving).

    A learning rate held in a device tensor (capturable optimizers) is read only when ``exact``:
    reading it is a host synchronisation, which the every-step bookkeeping does not pay.
    """
    lr = group.get("lr", 1.0)
    if isinstance(lr, Tensor):
        return float(lr) if exact or lr.device.type == "cpu" else 1.0
    return float(lr) if isinstance(lr, (int, float)) else 1.0


def asks_for_updates(group: Mapping[str, Any]) -> bool:
    """Whether the optimizer asks this group's weights to move by more than a schedule's rounding.

    A learning rate of 0 asks for nothing (the first step of a warm-up from 0, the end of a cosine
    schedule). Below :data:`SCHEDULE_FLOOR` of the scheduler's base learning rate
    (``initial_lr``, set by every ``torch.optim.lr_scheduler``), the schedule itself asks for
    vanishing updates: float32 rounds away updates of 1e-9, which is the last steps of an
    annealing to 0 doing what they were designed to, not a precision bug.
    """
    lr = learning_rate(group)
    base = group.get("initial_lr")
    if isinstance(base, (int, float, Tensor)) and float(base) > 0.0:
        return lr >= SCHEDULE_FLOOR * float(base)
    return lr > 0.0


@dataclass
class StaleSample:
    """The ``[stale, eligible]`` counts of one sampled optimizer step, per parameter tensor.

    ``counts`` is an ``(n, 2)`` float32 device tensor until fetched; ``layer_index`` and
    ``dtypes`` (dtype names) describe its rows.
    """

    step: int
    layer_index: list[int] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    counts: Tensor | None = None


class StaleSampler:
    """Sampled weights and gradients before ``optimizer.step``, compared after it.

    Args:
        samples: elements sampled per parameter tensor (all of a smaller tensor).
        seed: seed of the private generator that picks them (the run's RNG is untouched).
    """

    def __init__(self, samples: int, seed: int = 0) -> None:
        self.samples = samples
        self._generator = torch.Generator().manual_seed(seed)
        self._indices: dict[int, Tensor] = {}
        self._before: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._step = -1

    def _index(self, p: Tensor) -> Tensor:
        idx = self._indices.get(id(p))
        if idx is None or idx.device != p.device:
            idx = sample_indices(p.numel(), self.samples, self._generator).to(p.device)
            self._indices[id(p)] = idx
        return idx

    def before(self, optimizer: torch.optim.Optimizer, step: int, *, resample: bool = False) -> None:
        """Read the sampled weights and gradients of the groups that ask for updates."""
        self._step = step
        if resample:
            self._indices.clear()
        self._before = []
        for group in optimizer.param_groups:
            if not asks_for_updates(group):
                continue
            for p in group["params"]:
                g = p.grad
                if g is None or g.is_sparse or g.layout != torch.strided or not p.is_floating_point():
                    continue
                idx = self._index(p)
                self._before.append((p, idx, torch.take(p.detach(), idx), torch.take(g, idx)))

    def disarm(self) -> None:
        """Forget the sample (a step the ``GradScaler`` skipped never reaches :meth:`after`)."""
        self._before = []

    @property
    def armed(self) -> bool:
        """Whether :meth:`before` sampled weights that :meth:`after` will compare."""
        return bool(self._before)

    def after(self, layer_of: Mapping[int, int]) -> StaleSample | None:
        """The counts of the step armed by :meth:`before` (None when nothing was sampled)."""
        if not self._before:
            return None
        sample = StaleSample(self._step)
        rows = []
        for p, idx, before, grad in self._before:
            rows.append(stale_counts(before, torch.take(p.detach(), idx), grad))
            sample.layer_index.append(layer_of.get(id(p), 0))
            sample.dtypes.append(dtype_name(p.dtype))
        self._before = []
        sample.counts = torch.stack(rows)
        return sample


@dataclass(frozen=True)
class StaleSummary:
    """Stale shares of one sampled step: per dtype name, per layer name, and the finding if any."""

    by_dtype: dict[str, float]
    by_layer: dict[str, float]
    finding: Finding | None


def stale_summary(
    sample: StaleSample, counts: Tensor, layers: Sequence[str], *, min_samples: int, fraction: float
) -> StaleSummary:
    """Shares of sampled, nonzero-gradient weights left bit-identical, and ``update.stale``.

    Args:
        sample: the sampled step.
        counts: its fetched ``(n, 2)`` ``[stale, eligible]`` counts (host).
        layers: layer names, indexed by ``sample.layer_index``.
        min_samples: eligible samples a layer needs to be judged.
        fraction: the stale share that is reported (the worst layer is named).
    """
    counts = counts.to(torch.float64).reshape(-1, 2)
    layer_idx, kinds = sample.layer_index, sample.dtypes
    names = sorted(set(kinds))
    by_layer = grouped_counts(counts, layer_idx, len(layers)).tolist()
    by_dtype = grouped_counts(counts, [names.index(k) for k in kinds], len(names)).tolist()
    dtype_shares = {name: s / e for name, (s, e) in zip(names, by_dtype, strict=True) if e > 0}
    layer_shares: dict[str, float] = {}
    worst, worst_frac, n_bad = -1, -1.0, 0
    for li in sorted(set(layer_idx)):
        s, e = by_layer[li]
        if e <= 0:
            continue
        layer_shares[layers[li]] = s / e
        if e >= min_samples and s / e >= fraction:
            n_bad += 1
            if s / e > worst_frac:
                worst, worst_frac = li, s / e
    finding = None
    if worst >= 0:
        kinds_worst = sorted({k for k, li in zip(kinds, layer_idx, strict=True) if li == worst})
        finding = Finding(
            "update.stale",
            f"The optimizer step left {worst_frac:.0%} of the sampled {'/'.join(kinds_worst)} weights of "
            f"{layers[worst]} bit-identical although their gradient was nonzero (step {sample.step}); "
            f"{n_bad} layer(s) affected.",
            where=layers[worst],
            value=worst_frac,
        )
    return StaleSummary(dtype_shares, layer_shares, finding)
