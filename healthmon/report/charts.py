"""The charts of the HTML report: matplotlib figures as base64 PNGs.

Each chart reads its series through :class:`~healthmon.report.run_data.RunData` with the tags
and families of :mod:`healthmon.tags` (``tags.REPORT_CHARTS`` lists what each chart reads), so a
renamed tag cannot silently empty a chart. A chart whose tags the run did not record returns
``None`` (the page says so). matplotlib is imported lazily: ``healthmon check`` never pays for it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from healthmon import tags
from healthmon.alerts import Alert, severity_rank
from healthmon.report.errors import MissingDependencyError
from healthmon.report.events import Series
from healthmon.report.run_data import RunData
from healthmon.tags import Family

#: Fraction panels: (panel title, families tried in order; the first one recorded is drawn).
FRACTIONS: tuple[tuple[str, tuple[Family, ...]], ...] = (
    ("zero gradients", (tags.ZERO_FRACTION_DTYPE, tags.ZERO_FRACTION_LAYER)),
    ("subnormal gradients", (tags.SUBNORMAL_FRACTION_DTYPE, tags.SUBNORMAL_FRACTION_LAYER)),
    ("flushed to zero", (tags.FLUSHED_FRACTION_DTYPE, tags.FLUSHED_FRACTION_LAYER)),
    ("stale updates", (tags.STALE_FRACTION_DTYPE, tags.STALE_FRACTION_LAYER)),
    ("dead units", (tags.DEAD_UNITS,)),
)
SEVERITY_COLORS = {"error": "#c62828", "warning": "#ef6c00", "info": "#1565c0"}
MAX_LINES = 12  # lines per chart before the rest are summarised in the legend


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(
            "the HTML report needs matplotlib: pip install 'healthmon[report]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _xy(series: Series) -> tuple[list[int], list[float]]:
    return [s for s, _ in series], [v for _, v in series]


def _positive(series: Series) -> bool:
    return any(v > 0 for _, v in series)


def _plot_many(ax: Any, named: dict[str, Series], *, log: bool) -> None:
    names = list(named)
    for name in names[:MAX_LINES]:
        x, y = _xy(named[name])
        ax.plot(x, y, label=name, linewidth=1.2, marker="." if len(x) < 30 else None)
    if len(names) > MAX_LINES:
        ax.plot([], [], " ", label=f"(+{len(names) - MAX_LINES} more not drawn)")
    if log and all(_positive(s) for s in named.values()):
        ax.set_yscale("log")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def _mark_alerts(ax: Any, alerts: Sequence[Alert]) -> None:
    for a in alerts:
        ax.axvline(a.step, color=SEVERITY_COLORS.get(a.severity, "grey"), alpha=0.45, linestyle="--", lw=1)


def _chart_norm_loss(plt: Any, run: RunData) -> str | None:
    norm, loss = run.series(tags.GRAD_NORM), run.series(tags.LOSS)
    if not norm and not loss:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.4))
    handles = []
    if norm:
        handles += ax.plot(*_xy(norm), color="#1f77b4", lw=1.3, label="gradient norm (before clipping)")
        clipped = run.series(tags.GRAD_NORM_CLIPPED)
        if clipped:
            handles += ax.plot(*_xy(clipped), color="#17becf", lw=1, ls=":", label="gradient norm (clipped)")
        if _positive(norm):
            ax.set_yscale("log")
        ax.set_ylabel("gradient L2 norm", color="#1f77b4")
    if loss:
        ax2 = ax.twinx() if norm else ax
        handles += ax2.plot(*_xy(loss), color="#d62728", lw=1.3, label="loss")
        ax2.set_ylabel("loss", color="#d62728")
    _mark_alerts(ax, run.alerts)
    ax.set_xlabel("global step")
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
    ax.grid(alpha=0.3)
    return _png(fig)


def _chart_lines(
    plt: Any, named: dict[str, Series], *, ylabel: str, log: bool, hline: float | None = None
) -> str | None:
    if not named:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.2))
    _plot_many(ax, named, log=log)
    if hline is not None:
        ax.axhline(hline, color="grey", ls="--", lw=1)
    ax.set_xlabel("global step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _png(fig)


def _chart_fractions(plt: Any, run: RunData) -> str | None:
    panels = []
    for title, families in FRACTIONS:
        for family in families:
            named = run.prefixed(family)
            if named:
                panels.append((title, named))
                break
    if not panels:
        return None
    cols = min(len(panels), 3)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.7 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, named) in zip(flat, panels, strict=False):
        for name in list(named)[:MAX_LINES]:
            x, y = _xy(named[name])
            ax.plot(x, y, label=name, lw=1.2, marker="." if len(x) < 30 else None)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("global step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    for row in axes:
        row[0].set_ylabel("fraction")
    fig.tight_layout()
    return _png(fig)


def _chart_hessian(plt: Any, run: RunData) -> str | None:
    hess = run.prefixed(tags.HESSIAN)
    lam_max = hess.get("lambda_max")
    if not lam_max:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.4))
    ax.plot(*_xy(lam_max), color="#1f77b4", marker="o", ms=4, lw=1.3, label="lambda_max")
    if hess.get("lambda_min"):
        ax.plot(*_xy(hess["lambda_min"]), color="#9467bd", marker="v", ms=4, lw=1, label="lambda_min")
    limits = [(n, s) for n, s in hess.items() if "limit" in n and "precond" not in n]
    limits += [(n, s) for n, s in hess.items() if n == "two_over_lr"]
    labels: dict[tuple[tuple[int, float], ...], list[str]] = {}
    for name, series in limits:  # SGD without momentum: the limit is 2/lr, one line for both
        labels.setdefault(tuple(series), []).append(
            "2/lr" if name == "two_over_lr" else name.replace("_", " ")
        )
    for (key, names), ls in zip(labels.items(), ["--", ":", "-.", "--"], strict=False):
        ax.plot(*_xy(list(key)), color="#d62728", ls=ls, lw=1.5, label=" = ".join(names))
    if hess.get("preconditioned_sharpness"):
        ax.plot(
            *_xy(hess["preconditioned_sharpness"]),
            color="#2ca02c",
            marker="s",
            ms=3,
            label="P^-1 H sharpness",
        )
        if hess.get("preconditioned_limit"):
            ax.plot(*_xy(hess["preconditioned_limit"]), color="#2ca02c", ls="--", label="Adam limit")
    values = [v for s in hess.values() for _, v in s]
    if all(v > 0 for _, v in lam_max) and all(v > 0 for n, s in limits for _, v in s) and min(values) > 0:
        ax.set_yscale("log")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("global step")
    ax.set_ylabel("eigenvalue")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _png(fig)


def _chart_timeline(plt: Any, run: RunData) -> str | None:
    if not run.alerts:
        return None
    alerts = sorted(run.alerts, key=lambda a: (a.step, -severity_rank(a.severity)))[:40]
    height = 0.9 + 0.32 * len(alerts)
    fig, ax = plt.subplots(figsize=(9, height))
    last = max([a.last_step for a in alerts] + [run.last_step(), 1])
    for i, a in enumerate(alerts):
        color = SEVERITY_COLORS.get(a.severity, "grey")
        ax.plot(
            [a.step, max(a.last_step, a.step)], [i, i], color=color, lw=5, alpha=0.35, solid_capstyle="round"
        )
        ax.plot([a.step], [i], "o", color=color, ms=7)
    ax.set_yticks(range(len(alerts)))
    ax.set_yticklabels([_label(a) for a in alerts], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(-0.02 * last, last * 1.03 + 1)
    ax.set_xlabel("global step (dot: first seen, bar: until last seen)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _label(a: Alert) -> str:
    where = f" @ {a.where}" if a.where else ""
    text = f"{a.code}{where}"
    return text if len(text) <= 60 else text[:57] + "..."


def _chart_layer_norms(plt: Any, run: RunData) -> str | None:
    return _chart_lines(plt, run.prefixed(tags.GRAD_LAYER), ylabel="gradient L2 norm", log=True)


def _chart_update_ratio(plt: Any, run: RunData) -> str | None:
    ratio = run.prefixed(tags.UPDATE_RATIO)
    return _chart_lines(plt, ratio, ylabel="update / weight", log=True, hline=1e-3)


def _chart_logits(plt: Any, run: RunData) -> str | None:
    return _chart_lines(plt, run.prefixed(tags.LOGITS), ylabel="count", log=False)


@dataclass(frozen=True)
class Chart:
    """One chart of a run's section.

    Attributes:
        key: what it reads, a key of ``tags.REPORT_CHARTS``; ``None`` for the alert timeline.
        title: its heading.
        caption: what it shows and how to read it.
        draw: ``draw(plt, run)``, the PNG (base64) or ``None`` when the run recorded none of it.
    """

    key: str | None
    title: str
    caption: str
    draw: Callable[[Any, RunData], str | None]


TIMELINE_TITLE = "Alert timeline"
CHARTS: tuple[Chart, ...] = (
    Chart(
        "norm_loss",
        "Gradient norm vs loss",
        "The seed's figure: the global gradient L2 norm (log scale, before clipping) and the "
        "loss over the steps. Dashed lines mark the steps where alerts first fired.",
        _chart_norm_loss,
    ),
    Chart(
        "layer_norms",
        "Per-layer gradient norms",
        "L2 norm of each layer's gradient: vanishing gradients decay toward the first layers, "
        "exploding ones spike.",
        _chart_layer_norms,
    ),
    Chart(
        "update_ratio",
        "Update / weight ratio per layer",
        "||update|| / ||weight|| per optimizer step; around 1e-3 (dashed) is typical, far "
        "below means the layer barely learns, far above means it is thrashing.",
        _chart_update_ratio,
    ),
    Chart(
        "fractions",
        "Zero, underflow and stale fractions",
        "Share of gradient entries exactly zero, subnormal or flushed to zero, of sampled "
        "weights an optimizer step left unchanged, and of dead ReLU units.",
        _chart_fractions,
    ),
    Chart(
        "hessian",
        "Sharpness: lambda_max against 2/lr",
        "Top Hessian eigenvalue against the optimizer's stability limit: above the red line, "
        "gradient descent oscillates and diverges along the top eigenvector.",
        _chart_hessian,
    ),
    Chart(
        "logits",
        "Logits checks",
        "Softmax/log/loss calls inspected on sampled steps, and call sites that fired.",
        _chart_logits,
    ),
    Chart(
        None,
        TIMELINE_TITLE,
        "Each alert from the step it was first seen to the last; colour is severity.",
        _chart_timeline,
    ),
)
