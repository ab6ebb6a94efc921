"""The optimizer's stability limit on the sharpness, and Adam's preconditioner (pure torch)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from healthmon.numerics.eigensolvers import MatVec


@dataclass(frozen=True)
class StabilityLimit:
    """The sharpness above which the optimizer's iteration is unstable on a quadratic.

    Attributes:
        kind: "sgd" (plain or momentum), "adam" (preconditioned sharpness) or "unknown".
        limit: the threshold on ``lambda_max`` (SGD) or on ``lambda_max(P^-1 H)`` (Adam);
            ``inf`` when unknown.
        lr: the largest learning rate over the parameter groups (the most restrictive one).
        two_over_lr: ``2 / lr``.
        formula: the formula used, for messages.
    """

    kind: str
    limit: float
    lr: float
    two_over_lr: float
    formula: str


def stability_limit(optimizer: torch.optim.Optimizer) -> StabilityLimit:
    """Read the learning rate and momentum from the optimizer now and give its stability limit.

    * SGD: ``2/lr``. Heavy-ball momentum ``beta`` (dampening ``d``): ``(2 + 2 beta) / ((1 - d) lr)``;
      Nesterov: ``(2 + 2 beta) / ((1 + 2 beta)(1 - d) lr)`` (Cohen et al. 2021, *Gradient
      descent on neural networks typically occurs at the edge of stability*, App. A).
    * Adam-type (a ``betas`` hyper-parameter): the preconditioned sharpness
      ``lambda_max(P^-1 H)`` against ``(2 + 2 beta1) / ((1 - beta1) lr)`` (Cohen et al. 2022,
      *Adaptive gradient methods at the edge of stability*), ``P`` from :func:`adam_preconditioner`.
    * Anything else: "unknown" (the sharpness alert is skipped).

    With several parameter groups the largest learning rate is used (the lowest limit).

    >>> w = [torch.nn.Parameter(torch.zeros(1))]
    >>> stability_limit(torch.optim.SGD(w, lr=0.5)).limit  # 2/lr
    4.0
    >>> stability_limit(torch.optim.SGD(w, lr=0.5, momentum=0.5)).limit  # (2 + 2*0.5)/lr
    6.0
    >>> round(stability_limit(torch.optim.Adam(w, lr=1e-3)).limit)  # (2 + 2*0.9)/(0.1*lr)
    38000
    """
    groups = optimizer.param_groups
    lr = max(float(g.get("lr", math.nan)) for g in groups)
    two = 2.0 / lr if lr > 0 else math.inf
    first = groups[0]
    if "betas" in first:
        beta1 = float(first["betas"][0])
        limit = (2 + 2 * beta1) / ((1 - beta1) * lr) if lr > 0 and beta1 < 1 else math.inf
        return StabilityLimit("adam", limit, lr, two, f"(2 + 2*beta1)/((1 - beta1)*lr), beta1={beta1:g}")
    if isinstance(optimizer, torch.optim.SGD) or "momentum" in first and "dampening" in first:
        beta = float(first.get("momentum", 0.0))
        damp = float(first.get("dampening", 0.0)) if beta > 0 else 0.0
        if lr <= 0 or damp >= 1:
            return StabilityLimit("sgd", math.inf, lr, two, "2/lr")
        if beta == 0:
            return StabilityLimit("sgd", two, lr, two, "2/lr")
        if first.get("nesterov", False):
            limit = (2 + 2 * beta) / ((1 + 2 * beta) * (1 - damp) * lr)
            return StabilityLimit(
                "sgd", limit, lr, two, f"(2 + 2*beta)/((1 + 2*beta)*lr), Nesterov beta={beta:g}"
            )
        limit = (2 + 2 * beta) / ((1 - damp) * lr)
        return StabilityLimit("sgd", limit, lr, two, f"(2 + 2*beta)/lr, heavy-ball beta={beta:g}")
    return StabilityLimit("unknown", math.inf, lr, two, "unknown optimizer")


#: Adam steps before its second moment is taken as a preconditioner (see :func:`adam_preconditioner`).
ADAM_MIN_STEPS = 4


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Tensor | None:
    """Adam's current diagonal preconditioner ``P = sqrt(v_hat) + eps`` as one flat vector.

    ``v_hat`` is the bias-corrected second moment (``max_exp_avg_sq`` under AMSGrad). Parameters
    the optimizer does not update get ``inf`` (``P^-1 = 0``: they cannot destabilise it), and so
    do entries whose second moment is still exactly 0: they never had a gradient (a LoRA ``A``
    while ``B = 0``), so Adam has no scale for them yet, and ``eps`` alone would make their
    curvature look a million times sharper than the step Adam will take there. None until Adam
    has taken :data:`ADAM_MIN_STEPS` steps: a second moment of one to three squared gradients is
    noise, and its smallest entries (where a gradient happened to be tiny) make any curvature look
    sharp (a ConvNeXt at step 1: 1.4x the limit, well below it from step 4). The preconditioned
    sharpness is the top eigenvalue of ``P^-1/2 H P^-1/2``, similar to ``P^-1 H`` (see
    :func:`preconditioned`).
    """
    hyper: dict[int, Mapping[str, Any]] = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    seen = False
    for p in params:
        group, state = hyper.get(id(p)), optimizer.state.get(p, {})
        v = state.get("max_exp_avg_sq", state.get("exp_avg_sq")) if group is not None else None
        if group is None or v is None or "step" not in state:
            parts.append(torch.full((p.numel(),), math.inf, dtype=p.dtype, device=p.device))
            continue
        step = float(state["step"])
        if step < ADAM_MIN_STEPS:
            parts.append(torch.full((p.numel(),), math.inf, dtype=p.dtype, device=p.device))
            continue
        seen = True
        beta2 = float(group["betas"][1])
        v_hat = v.reshape(-1).to(p.dtype) / (1 - beta2**step)
        scale = v_hat.sqrt() + float(group.get("eps", 1e-8))
        parts.append(scale.masked_fill_(v_hat == 0, math.inf))
    return torch.cat(parts) if seen else None


class _Preconditioned:
    """``v -> d * H(d * v)``, with the ``n``, ``dtype`` and ``device`` the solvers read off an operator."""

    def __init__(self, matvec: MatVec, d: Tensor) -> None:
        self.matvec, self.d = matvec, d
        self.n, self.dtype, self.device = d.numel(), d.dtype, d.device

    def __call__(self, v: Tensor) -> Tensor:
        return self.d * self.matvec(self.d * v)


def preconditioned(matvec: MatVec, precond: Tensor) -> MatVec:
    """``v -> P^-1/2 H P^-1/2 v``: symmetric, with the eigenvalues of ``P^-1 H``."""
    return _Preconditioned(matvec, precond.rsqrt())


def clip_factor(grad_norm: float | None, max_norm: float | None) -> float:
    """How much clipping by global norm scales a step down: ``min(1, max_norm / grad_norm)``.

    A clipped step moves ``lr * c * g``: the iteration is that of a learning rate ``c * lr``,
    so the stability limit on the sharpness grows by ``1 / c``. Adam-type optimizers see it
    differently but with the same result: their second moment is built from clipped gradients,
    so the preconditioner measured from the optimizer state is ``c`` times the unclipped one and
    ``lambda_max(P^-1 H)`` reads ``1 / c`` too high. Either way the sharpness to compare with the
    limit is ``c`` times the measured one.

    >>> clip_factor(10.0, 1.0), clip_factor(0.5, 1.0), clip_factor(10.0, None)
    (0.1, 1.0, 1.0)
    """
    if max_norm is None or grad_norm is None or not math.isfinite(grad_norm) or grad_norm <= max_norm:
        return 1.0
    return max_norm / grad_norm
