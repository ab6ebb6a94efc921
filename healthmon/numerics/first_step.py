"""First-step explosions: one optimizer step's measured update turned into ratios and a finding.

Why: before the spike rule has a running level (its warm-up), an exploded gradient or a learning
rate far too large shows only in the size of one step. :mod:`healthmon.numerics.update_size`
measures and judges the per-layer sizes; this module keeps what the step needs between the two
hooks (:class:`MeasuredStep`), derives the logged update ratios, and words the worst layer as a
finding whose hint names the likely cause: a recurrent layer's initialisation, an exploded
gradient, or a learning rate too large. Pure torch and Python; the monitor turns it into alerts.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from healthmon.alerts import CLIP_HOW
from healthmon.numerics.findings import Finding
from healthmon.numerics.gradients import combined_norms_by_group
from healthmon.numerics.update_size import OversizedStep, judge_update_sizes

HINT_RECURRENT = (
    "Clip gradients " + CLIP_HOW + " and check the recurrent weights' "
    "initialisation: a recurrent matrix with spectral radius well above 1 explodes "
    "through time (use an orthogonal init or a gain of at most 1)."
)
HINT_EXPLODED = (
    "Clip gradients " + CLIP_HOW + " and check this layer's initialisation "
    "and inputs (unnormalised features, a scale far from 1); then lower the learning rate."
)
HINT_LEARNING_RATE = (
    "Lower the learning rate (or warm it up from a small value); clipping "
    + CLIP_HOW
    + " also bounds the step."
)


@dataclass
class MeasuredStep:
    """What the post-step hook needs to measure and judge the update of one optimizer step."""

    step: int
    log_ratios: bool  # a logged step: write the update ratios
    judge: bool  # a first step (the spike rule has no level yet): judge the update's size
    layer_index: list[int]
    numels: list[int]
    grad_norms: dict[int, float]  # per layer, from the driver's per-tensor norms
    loss: float | None

    @property
    def present(self) -> list[int]:
        """The layers this step's parameters belong to, in layer order."""
        return sorted(set(self.layer_index))


def in_first_steps(spike: Any, skipped: bool) -> bool:
    """Whether a step's update size is judged.

    It is while the spike rule has no running level yet (its warm-up), unless the step was skipped
    (a step the GradScaler skips has no update).
    """
    return spike.seen < spike.warmup and not skipped


def measure_step(
    step: int,
    params: Sequence[Tensor],
    layer_of: Mapping[int, int],
    per_tensor_norms: Any,
    loss: float | None,
    *,
    log_ratios: bool,
    judge: bool,
) -> MeasuredStep:
    """What to keep of a step before its update.

    Each parameter's layer (``layer_of`` by ``id``, layer 0 when unknown), sizes, and when judged
    the per-layer gradient norms combined from the per-tensor ones (host floats).
    """
    layer_index = [layer_of.get(id(p), 0) for p in params]
    return MeasuredStep(
        step=step,
        log_ratios=log_ratios,
        judge=judge,
        layer_index=layer_index,
        numels=[p.numel() for p in params],
        grad_norms=combined_norms_by_group(per_tensor_norms, layer_index) if judge else {},
        loss=loss,
    )


def update_ratios(
    measured: MeasuredStep, layers: Sequence[str], updates: Sequence[float], weights: Sequence[float]
) -> dict[str, float]:
    """||update|| / ||weight|| of each layer the step touched, by layer name (weights floored at tiny)."""
    tiny = torch.finfo(torch.float32).tiny
    return {layers[i]: updates[i] / max(weights[i], tiny) for i in measured.present}


def judge_measured_step(
    measured: MeasuredStep,
    layers: Sequence[str],
    updates: Sequence[float],
    weights: Sequence[float],
    *,
    ratio_limit: float,
    sensitivity_limit: float,
    scale_invariant: Collection[str] = (),
) -> list[OversizedStep]:
    """The oversized layers of a measured step, worst first (see :func:`judge_update_sizes`).

    ``scale_invariant``: the layers judged by their sensitivity only (their output is normalised).
    """
    present = measured.present
    layer_numel = [0] * len(layers)
    for i, n in zip(measured.layer_index, measured.numels, strict=True):
        layer_numel[i] += n
    return judge_update_sizes(
        [layers[i] for i in present],
        [updates[i] for i in present],
        [weights[i] for i in present],
        [measured.grad_norms.get(i, 0.0) for i in present],
        [layer_numel[i] for i in present],
        measured.loss,
        ratio_limit=ratio_limit,
        sensitivity_limit=sensitivity_limit,
        scale_invariant=scale_invariant,
    )


def is_recurrent(module: torch.nn.Module | None) -> bool:
    """An RNN/LSTM/GRU (or cell): its explosions come through time, from the recurrent init."""
    return isinstance(module, (torch.nn.RNNBase, torch.nn.RNNCellBase))


def first_step_hint(worst: OversizedStep, *, recurrent: bool) -> str:
    """The fix for an oversized first step, by cause: recurrent init, exploded gradient, or lr."""
    if recurrent:
        return HINT_RECURRENT
    return HINT_EXPLODED if worst.exploded else HINT_LEARNING_RATE


def first_step_finding(
    found: Sequence[OversizedStep],
    step: int,
    *,
    ratio_limit: float,
    sensitivity_limit: float,
    recurrent: bool,
) -> Finding:
    """Word the worst of ``found`` (non-empty, worst first); ``recurrent``: its layer is an RNN."""
    worst = found[0]
    what = []
    if worst.rewritten:
        what.append(
            f"the update was {worst.update_ratio:.3g}x the layer's weights "
            f"(||update|| {worst.update_norm:.3g}, ||weight|| {worst.weight_norm:.3g})"
        )
    if worst.exploded:
        what.append(
            f"its gradient norm {worst.grad_norm:.3g} gives a loss sensitivity ||g||*||w||/|loss| of "
            f"{worst.sensitivity:.3g}: the gradient exploded"
        )
    else:
        what.append(
            f"its gradient norm {worst.grad_norm:.3g} is ordinary for its weights: the learning rate "
            "is too large for this layer"
        )
    others = (
        f" {len(found) - 1} more layer(s) too: {', '.join(f.layer for f in found[1:4])}."
        if len(found) > 1
        else ""
    )
    return Finding(
        "grad.explosion",
        where=worst.layer,
        message=f"Optimizer step {step}, layer {worst.layer}: {'; '.join(what)} (first-step limits, before "
        f"any running level exists: update {ratio_limit:g}x the weights, sensitivity "
        f"{sensitivity_limit:g}).{others}",
        hint=first_step_hint(worst, recurrent=recurrent),
        value=worst.update_ratio if worst.rewritten else worst.sensitivity,
    )
