"""The gradient-norm and loss trend rules of one optimizer, and their verdicts as findings.

Why: the monitor only feeds each step's norm and loss and turns findings into alerts; which rule
fires, and the sentence that says why, live here (pure Python over :mod:`healthmon.numerics.trends`)
so they can be tested without a Trainer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from healthmon.numerics.findings import Finding
from healthmon.numerics.trends import CollapseRule, DivergenceRule, OpposingTrendRule, SpikeRule

#: The rule names, in the order they judge a step.
RULES = ("spike", "collapse", "divergence", "opposing")


def trend_rules(
    *, spike_factor: float, warmup: int, collapse_orders: float, blowup: float, window: int, rise: float
) -> dict[str, Any]:
    """Fresh spike, collapse, divergence and opposing-trend rules of one optimizer's series."""
    return {
        "spike": SpikeRule(factor=spike_factor, warmup=warmup),
        "collapse": CollapseRule(orders=collapse_orders, warmup=warmup),
        "divergence": DivergenceRule(blowup=blowup, window=window, rise=rise),
        "opposing": OpposingTrendRule(),
    }


def judge_trends(
    rules: Mapping[str, Any], norm: float, loss: float | None, where: str | None = None
) -> Iterator[Finding]:
    """Feed one step's gradient norm and loss to the rules, yielding what fires.

    A generator: each rule is updated only when the previous finding has been consumed, so a
    caller that raises on a finding leaves the later rules untouched, as if judged inline.

    Args:
        rules: the rules from :func:`trend_rules`.
        norm: the step's global gradient norm.
        loss: the step's loss (None: the divergence and opposing rules are not fed).
        where: the optimizer's name when there are several (named in the messages).
    """
    of = f" ({where})" if where else ""
    ratio = rules["spike"].update(norm, loss)
    if ratio is not None:
        yield Finding(
            "grad.explosion",
            f"Gradient norm{of} {norm:.3g} is {ratio:.3g}x its running level, and {rules['spike'].reason}.",
            value=norm,
        )
    drop = rules["collapse"].update(norm, loss)
    if drop is not None:
        yield Finding(
            "grad.vanishing",
            f"Gradient norm{of} {norm:.3g} collapsed {drop:.1f} orders of magnitude below its peak "
            "while the loss is still high.",
            value=norm,
        )
    if loss is None:
        return
    diverged = judge_loss(rules, loss, norm, where)
    if diverged is not None:
        yield diverged
    trend = rules["opposing"].update(norm, loss)
    if trend is not None:
        yield Finding(
            "grad.norm_rising",
            f"Over the last {rules['opposing'].window} steps the gradient norm{of} rose "
            f"(correlation {trend[0]:.2f}) while the loss fell ({trend[1]:.2f}).",
        )


def judge_loss(
    rules: Mapping[str, Any], loss: float, norm: float | None = None, where: str | None = None
) -> Finding | None:
    """Feed one step's loss to the divergence rule (with its gradient norm when it was measured).

    A step whose gradients were not checked (the overhead budget's stride) still has its loss:
    the divergence rule sees every step's loss, the norm rules the checked steps' norms. Returns
    the finding when the loss diverges at this step, else None (every step: kept cheap).
    """
    reason = rules["divergence"].update(loss, norm)
    if reason is None:
        return None
    of = f" ({where})" if where else ""
    return Finding("loss.divergence", f"The loss{of} {reason}.", value=loss)
