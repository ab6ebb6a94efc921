"""How much one optimizer step changes each layer: sampled update norms and a history-free judge.

The spike rule (``trends.SpikeRule``) needs a running level, so it cannot see an explosion at the
first steps of a run. Two per-layer quantities need no history:

- the update ratio ||w_after - w_before|| / ||w_before||: an SGD-type step that rewrites a layer
  (a gradient of 1e8 times a learning rate of 1e-2) shows here at once. The denominator is floored
  at ``weight_rms_floor * sqrt(numel)`` so that zero- or tiny-initialised parameters (LoRA's B,
  biases, LayerNorm shifts, and what Adam's first ``lr * sign(g)``-like steps make of them) are
  judged against a unit-scale layer instead of their own near-zero size;
- the loss sensitivity ||g|| * ||w|| / |loss|: how many times faster the loss changes than the
  weights, relatively, along the gradient. An adaptive optimizer (Adam-type) normalises its first
  update to about ``lr`` per entry whatever the gradient, so only this one shows a gradient
  explosion under Adam. It is invariant to the loss's scale (sum or mean reduction) and zero for
  zero-initialised parameters. For a squared-error loss it grows like 1/sqrt(loss): a regression
  that starts within 1e-4 of a perfect fit reaches ~3e3 (at step 0: digits MLP 0.9, LoRA 0.7,
  a small transformer 0.4, a tanh RNN at gain 1 14),
  so 1e5 is reached only by a start within ~3e-6 of perfect, or by an exploded gradient (a tanh
  RNN with recurrent gain 5 over 50 steps: 4e6).

Measuring ||w_after - w_before|| needs the weights from before the step. Instead of a full copy,
:class:`UpdateSampler` keeps up to ``max_entries`` entries of each tensor (all of a small tensor,
so small models are exact) and scales the sampled squared update to the tensor's size.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from healthmon.numerics.gradients import grouped_norms, tensor_norms
from healthmon.numerics.underflow import sample_indices

#: Update ratio (against the floored weight norm) at which one step rewrote a layer.
UPDATE_RATIO_LIMIT = 10.0
#: RMS weight entry below which a layer is judged as if its entries had this size.
WEIGHT_RMS_FLOOR = 1e-2
#: ||g|| * ||w|| / |loss| at which a layer's gradient has exploded.
SENSITIVITY_LIMIT = 1e5
#: Entries of a tensor kept before the step (a tensor this small or smaller is kept whole).
SAMPLED_ENTRIES = 4096


def _local(p: Tensor) -> Tensor:
    """The detached weights this process holds (a sharded ``DTensor``'s local shard)."""
    w = p.detach()
    to_local = getattr(w, "to_local", None)
    return to_local() if callable(to_local) else w


class UpdateSampler:
    """Sampled weights before ``optimizer.step`` and the estimated update norms after it.

    Entries are drawn once per tensor with a private generator (the run's RNG is untouched) and
    reused; ||update||^2 of a sampled tensor is estimated as ``numel / k`` times the sum over
    its ``k`` sampled entries (unbiased for a uniform sample); a tensor of at most
    ``max_entries`` entries is kept whole and measured exactly. Weight norms are exact (a fused
    norm of the weights in place, no copy). A sharded parameter is measured on this rank's shard.
    """

    def __init__(self, max_entries: int = SAMPLED_ENTRIES, seed: int = 0) -> None:
        self.max_entries = max_entries
        self._generator = torch.Generator().manual_seed(seed)
        self._indices: dict[int, Tensor | None] = {}
        self._params: list[Tensor] = []
        self._before: list[Tensor] = []
        self._scale: Tensor | None = None
        self.weight_norms: Tensor | None = None

    def _index(self, p: Tensor, w: Tensor) -> Tensor | None:
        key = id(p)
        if key not in self._indices:
            n = w.numel()
            self._indices[key] = (
                None if n <= self.max_entries else sample_indices(n, self.max_entries, self._generator)
            )
        idx = self._indices[key]
        if idx is not None and idx.device != w.device:
            idx = self._indices[key] = idx.to(w.device)
        return idx

    def before(self, params: Sequence[Tensor]) -> None:
        """Keep the sampled entries and the weight norms of ``params`` (call before the step)."""
        self._params = list(params)
        kept, scale, weights = [], [], []
        for p in self._params:
            w = _local(p)
            weights.append(w)
            idx = self._index(p, w)
            if idx is None:
                kept.append(w.clone())
                scale.append(1.0)
            else:
                kept.append(torch.take(w, idx))
                scale.append(w.numel() / idx.numel())
        self._before = kept
        self.weight_norms = tensor_norms(weights) if weights else None
        device = self.weight_norms.device if self.weight_norms is not None else None
        self._scale = torch.tensor(scale, dtype=torch.float32, device=device)

    def update_norms(self) -> Tensor | None:
        """Estimated per-tensor ||w_after - w_before|| (call after the step); None if not armed."""
        params, before = self._params, self._before
        self._params, self._before = [], []
        if not params or self._scale is None:
            return None
        after = []
        for p in params:
            w = _local(p)
            idx = self._index(p, w)
            after.append(w if idx is None else torch.take(w, idx))
        diffs = torch._foreach_sub(after, before)
        squares = tensor_norms(diffs).square()
        return (squares * self._scale.to(squares.dtype)).sqrt()

    def disarm(self) -> None:
        """Forget the samples (the step was skipped, e.g. by the GradScaler)."""
        self._params, self._before = [], []

    @property
    def armed(self) -> bool:
        """Whether weights were sampled by :meth:`before` (:meth:`update_norms` has a reference)."""
        return bool(self._params)


def layer_update_table(
    update_norms: Tensor, weight_norms: Tensor, layer_index: Tensor, num_layers: int
) -> Tensor:
    """Per-layer [||update||, ||weight before||] as one (2, num_layers) device tensor."""
    return torch.stack(
        [
            grouped_norms(update_norms, layer_index, num_layers),
            grouped_norms(weight_norms.to(update_norms.dtype), layer_index, num_layers),
        ]
    )


@dataclass
class OversizedStep:
    """A layer that one optimizer step changed far more than a healthy step can."""

    layer: str
    update_ratio: float  # ||update|| / ||weight|| (not floored: the value to show)
    sensitivity: float | None  # ||g|| * ||w|| / |loss|, None when the loss is unknown
    grad_norm: float
    weight_norm: float
    update_norm: float
    rewritten: bool  # the update criterion fired
    exploded: bool  # the sensitivity criterion fired

    @property
    def severity_key(self) -> float:
        """Orders findings: the most extreme layer first."""
        return max(
            self.update_ratio if self.rewritten else 0.0,
            (self.sensitivity or 0.0) / SENSITIVITY_LIMIT * UPDATE_RATIO_LIMIT if self.exploded else 0.0,
        )


def judge_update_sizes(
    layers: Sequence[str],
    update_norms: Sequence[float],
    weight_norms: Sequence[float],
    grad_norms: Sequence[float],
    numels: Sequence[int],
    loss: float | None,
    *,
    ratio_limit: float = UPDATE_RATIO_LIMIT,
    weight_rms_floor: float = WEIGHT_RMS_FLOOR,
    sensitivity_limit: float = SENSITIVITY_LIMIT,
    scale_invariant: Collection[str] = (),
) -> list[OversizedStep]:
    """Layers whose one step was far too large, worst first (host floats, no history needed).

    A layer is reported when its update exceeds ``ratio_limit`` times
    ``max(||w||, weight_rms_floor * sqrt(numel))`` (the step rewrote it), or when its loss
    sensitivity ||g|| * ||w|| / |loss| exceeds ``sensitivity_limit`` (the gradient exploded;
    the only sign under Adam-type optimizers, whose first update is about ``lr`` per entry).
    Layers with a non-finite value are left to the non-finite checks. The layers named in
    ``scale_invariant`` (their output goes straight into a normalisation,
    :mod:`~healthmon.numerics.scale_invariance`) are judged by their sensitivity only: the loss
    does not depend on their scale, so a step many times their (small) weights only grows
    ``||w||``, which lowers their effective learning rate by itself; their sensitivity does not
    depend on the scale.
    """
    found = []
    loss_size = abs(loss) if loss is not None and math.isfinite(loss) and loss != 0.0 else None
    for name, du, w, g, n in zip(layers, update_norms, weight_norms, grad_norms, numels, strict=True):
        if n <= 0 or not all(map(math.isfinite, (du, w, g))):
            continue
        scale = max(w, weight_rms_floor * math.sqrt(n))
        rewritten = du > ratio_limit * scale and name not in scale_invariant
        sensitivity = g * w / loss_size if loss_size is not None else None
        exploded = sensitivity is not None and sensitivity > sensitivity_limit
        if rewritten or exploded:
            ratio = du / w if w > 0 else math.inf
            found.append(OversizedStep(name, ratio, sensitivity, g, w, du, rewritten, exploded))
    return sorted(found, key=lambda f: f.severity_key, reverse=True)
