"""A self-contained HTML health report (``healthmon report PATH --out report.html``).

One file, no network: charts are PNGs inlined as base64 ``data:`` URIs, the style sheet is inline
and there is no JavaScript. It is meant to be uploaded as a CI artifact and opened by someone
asking "is this run healthy, and if not, what do I change?".

Inputs: a run folder / folder of runs / report JSON, read with :func:`healthmon.sinks.reader.load_runs`
(alerts) and TensorBoard's ``EventAccumulator`` (scalars from the event files beside each report).
Charts are drawn only for tags the run recorded; a chart whose tags are absent says so.

matplotlib is an optional dependency (``pip install 'healthmon[report]'``); it is imported lazily
so that ``healthmon check`` never pays for it. No torch import.
"""

from __future__ import annotations

import base64
import html
import io
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from healthmon.alerts import CODES, Alert, severity_rank
from healthmon.sinks.console import count_text
from healthmon.sinks.reader import EVENT_PREFIX, load_runs
from healthmon.sinks.report import REPORT_NAME, ReportError, read_report, write_text_atomic

TAG_LOSS = "healthmon/loss"
TAG_NORM = "healthmon/grad/norm"
TAG_NORM_CLIPPED = "healthmon/grad/norm_clipped"
PREFIX_LAYER = "healthmon/grad/layer/"
PREFIX_UPDATE_RATIO = "healthmon/update_ratio/"
PREFIX_HESSIAN = "healthmon/hessian/"
PREFIX_LOGITS = "healthmon/logits/"
#: Fraction charts: (panel title, tag prefixes tried in order; the first one recorded is drawn).
FRACTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("zero gradients", ("healthmon/grad/zero_fraction/dtype/", "healthmon/grad/zero_fraction/layer/")),
    (
        "subnormal gradients",
        ("healthmon/grad/subnormal_fraction/dtype/", "healthmon/grad/subnormal_fraction/layer/"),
    ),
    ("flushed to zero", ("healthmon/grad/flushed_fraction/dtype/", "healthmon/grad/flushed_fraction/layer/")),
    ("stale updates", ("healthmon/update/stale_fraction/dtype/", "healthmon/update/stale_fraction/layer/")),
    ("dead units", ("healthmon/grad/dead_units/",)),
)
NOT_RECORDED = "not recorded in this run"
SEVERITY_COLORS = {"error": "#c62828", "warning": "#ef6c00", "info": "#1565c0"}
MAX_LINES = 12  # lines per chart before the rest are summarised in the legend


class MissingDependencyError(ReportError):
    """The HTML report needs matplotlib (the ``healthmon[report]`` extra)."""


Series = list[tuple[int, float]]


@dataclass
class RunData:
    """What the report shows for one run: its alerts, scalar series and run metadata."""

    source: str
    alerts: list[Alert]
    status: str | None = None
    scalars: dict[str, Series] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    event_dir: str | None = None

    def prefixed(self, prefix: str) -> dict[str, Series]:
        """Series whose tag starts with ``prefix``, keyed by the rest of the tag."""
        return {t[len(prefix) :]: s for t, s in sorted(self.scalars.items()) if t.startswith(prefix) and s}


# ---- reading -------------------------------------------------------------------------------------
def read_scalars(folder: str) -> dict[str, Series]:
    """All ``healthmon/`` scalar series in a folder's event files, sorted by step.

    Every event is kept (``size_guidance`` 0); when a step was written twice (a resumed run) the
    last value wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 1, "histograms": 1, "images": 1})
    acc.Reload()
    out: dict[str, Series] = {}
    for tag in acc.Tags().get("scalars", []):
        if not tag.startswith("healthmon/"):
            continue
        by_step = {int(e.step): float(e.value) for e in acc.Scalars(tag)}
        out[tag] = sorted(by_step.items())
    return out


def _event_dir(source: str, run: dict[str, Any]) -> str | None:
    """The folder holding a run's event files: beside the report, else the report's ``log_dir``."""
    folder = source if os.path.isdir(source) else os.path.dirname(source) or "."
    candidates = [folder]
    if run.get("log_dir"):
        candidates.append(str(run["log_dir"]))
    for c in candidates:
        if os.path.isdir(c) and any(f.startswith(EVENT_PREFIX) for f in os.listdir(c)):
            return c
    return None


def load_run_data(path: str) -> list[RunData]:
    """Alerts, scalars and metadata of every run under ``path`` (see ``load_runs``).

    Raises:
        ReportError: missing, unreadable or corrupt input, or no healthmon data.
    """
    runs = []
    for r in load_runs(path):
        run: dict[str, Any] = {}
        if os.path.isfile(r.source) and not os.path.basename(r.source).startswith(EVENT_PREFIX):
            run = dict(read_report(r.source).get("run", {}))
        folder = _event_dir(r.source, run)
        scalars = read_scalars(folder) if folder else {}
        runs.append(RunData(r.source, list(r.alerts), r.status, scalars, run, folder))
    return runs


# ---- charts ---------------------------------------------------------------------------------------
def _require_matplotlib() -> Any:
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
    norm, loss = run.scalars.get(TAG_NORM), run.scalars.get(TAG_LOSS)
    if not norm and not loss:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.4))
    handles = []
    if norm:
        handles += ax.plot(*_xy(norm), color="#1f77b4", lw=1.3, label="gradient norm (before clipping)")
        clipped = run.scalars.get(TAG_NORM_CLIPPED)
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
    for title, prefixes in FRACTIONS:
        for prefix in prefixes:
            named = run.prefixed(prefix)
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
    hess = run.prefixed(PREFIX_HESSIAN)
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
    last = max([a.last_step for a in alerts] + [s for ser in run.scalars.values() for s, _ in ser[-1:]] + [1])
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


# ---- HTML ---------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f6f7f9;
color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px} h3{font-size:15px;margin:18px 0 6px}
.meta{color:#5b6473;font-size:13px}
.verdict{padding:14px 18px;border-radius:8px;font-size:17px;font-weight:600;margin:14px 0}
.verdict.healthy{background:#e6f4ea;color:#1e6b34;border:1px solid #a8d5b5}
.verdict.info{background:#e8f0fe;color:#1a4fa0;border:1px solid #b3c9f5}
.verdict.warning{background:#fff4e5;color:#8a4b00;border:1px solid #f5c98a}
.verdict.error{background:#fdecea;color:#8e1c1c;border:1px solid #f1a9a0}
section.run{background:#fff;border:1px solid #e1e4ea;border-radius:10px;padding:18px 22px;margin:18px 0}
figure{margin:8px 0 14px} figure img{max-width:100%;height:auto;border:1px solid #eceef2;border-radius:4px}
figcaption{color:#5b6473;font-size:13px;margin:4px 0}
.missing{color:#8a93a3;font-style:italic;font-size:13px;border:1px dashed #d5d9e0;padding:10px;
border-radius:4px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;vertical-align:top;padding:6px 8px;border-bottom:1px solid #eceef2}
th{background:#f1f3f6} td.num{text-align:right;white-space:nowrap} code{font-size:12px}
.sev{font-weight:700;text-transform:uppercase;font-size:11px;padding:2px 6px;border-radius:4px;color:#fff}
.sev.error{background:#c62828}.sev.warning{background:#ef6c00}.sev.info{background:#1565c0}
.fix{color:#1e6b34;min-width:200px} .seed{color:#5b6473;font-style:italic} .why{color:#5b6473;margin-top:3px}
td.msg{min-width:300px} td.where{word-break:break-all;max-width:220px}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _worst(alerts: Sequence[Alert]) -> str | None:
    if not alerts:
        return None
    return max(alerts, key=lambda a: severity_rank(a.severity)).severity


def _verdict_html(alerts: Sequence[Alert]) -> str:
    worst = _worst(alerts)
    if worst is None:
        return '<div class="verdict healthy" id="verdict">Healthy: no numerical problems detected.</div>'
    parts = count_text(alerts)
    head = "Notes only: the run looks healthy" if worst == "info" else "Not healthy"
    return f'<div class="verdict {worst}" id="verdict">{head}: {len(alerts)} alert(s) ({_e(parts)}).</div>'


def _figure(title: str, caption: str, png: str | None, chart_id: str) -> str:
    body = (
        f'<img class="chart" id="{chart_id}" alt="{_e(title)}" src="data:image/png;base64,{png}">'
        if png
        else f'<div class="missing" id="{chart_id}-missing">{_e(title)}: {NOT_RECORDED}.</div>'
    )
    return f"<figure><h3>{_e(title)}</h3><figcaption>{_e(caption)}</figcaption>{body}</figure>"


def _alert_rows(alerts: Sequence[Alert]) -> str:
    rows = []
    for a in sorted(alerts, key=lambda a: (-severity_rank(a.severity), a.step)):
        info = CODES.get(a.code)
        explanation = info.explanation if info else ""
        seed = f'<div class="seed">Idea: {_e(info.seed)}</div>' if info and info.seed else ""
        steps = str(a.step) if a.last_step == a.step else f"{a.step}&ndash;{a.last_step}"
        rows.append(
            f'<tr class="alert-row" data-code="{_e(a.code)}" data-severity="{_e(a.severity)}">'
            f'<td><span class="sev {_e(a.severity)}">{_e(a.severity)}</span></td>'
            f"<td><code>{_e(a.code)}</code></td>"
            f'<td class="num">{steps}</td><td class="num">{a.count}</td>'
            f"<td class='where'><code>{_e(a.where or '-')}</code></td>"
            f'<td class="msg">{_e(a.message)}<div class="why">{_e(explanation)}</div>{seed}</td>'
            f'<td class="fix">{_e(a.hint)}</td></tr>'
        )
    head = (
        "<tr><th>severity</th><th>code</th><th>steps</th><th>count</th><th>where</th>"
        "<th>what is wrong</th><th>what to change</th></tr>"
    )
    return f'<table class="alerts">{head}{"".join(rows)}</table>'


def _meta(run: RunData) -> str:
    bits = []
    info = run.run
    for key in ("status", "global_step", "epoch", "precision", "strategy", "world_size"):
        if key in info:
            bits.append(f"{key}: {info[key]}")
    if "status" not in info and run.status:
        bits.append(f"status: {run.status}")
    versions = info.get("versions")
    if isinstance(versions, dict):
        bits.append(", ".join(f"{k} {v}" for k, v in versions.items()))
    if info.get("error"):
        bits.append(f"error: {info['error']}")
    if run.event_dir is None:
        bits.append("no event files found: charts unavailable")
    return " &middot; ".join(_e(b) for b in bits)


def _run_section(plt: Any, run: RunData, index: int) -> str:
    ratio = run.prefixed(PREFIX_UPDATE_RATIO)
    logits = run.prefixed(PREFIX_LOGITS)
    charts: list[tuple[str, str, Callable[[], str | None]]] = [
        (
            "Gradient norm vs loss",
            "The seed's figure: the global gradient L2 norm (log scale, before clipping) and the "
            "loss over the steps. Dashed lines mark the steps where alerts first fired.",
            lambda: _chart_norm_loss(plt, run),
        ),
        (
            "Per-layer gradient norms",
            "L2 norm of each layer's gradient: vanishing gradients decay toward the first layers, "
            "exploding ones spike.",
            lambda: _chart_lines(plt, run.prefixed(PREFIX_LAYER), ylabel="gradient L2 norm", log=True),
        ),
        (
            "Update / weight ratio per layer",
            "||update|| / ||weight|| per optimizer step; around 1e-3 (dashed) is typical, far "
            "below means the layer barely learns, far above means it is thrashing.",
            lambda: _chart_lines(plt, ratio, ylabel="update / weight", log=True, hline=1e-3),
        ),
        (
            "Zero, underflow and stale fractions",
            "Share of gradient entries exactly zero, subnormal or flushed to zero, of sampled "
            "weights an optimizer step left unchanged, and of dead ReLU units.",
            lambda: _chart_fractions(plt, run),
        ),
        (
            "Sharpness: lambda_max against 2/lr",
            "Top Hessian eigenvalue against the optimizer's stability limit: above the red line, "
            "gradient descent oscillates and diverges along the top eigenvector.",
            lambda: _chart_hessian(plt, run),
        ),
        (
            "Logits checks",
            "Softmax/log/loss calls inspected on sampled steps, and call sites that fired.",
            lambda: _chart_lines(plt, logits, ylabel="count", log=False),
        ),
        (
            "Alert timeline",
            "Each alert from the step it was first seen to the last; colour is severity.",
            lambda: _chart_timeline(plt, run),
        ),
    ]
    figures = []
    for i, (title, caption, draw) in enumerate(charts):
        png = draw()
        if png is None and title == "Alert timeline":
            figures.append(
                f"<figure><h3>{_e(title)}</h3><div class='missing'>No alerts fired.</div></figure>"
            )
            continue
        figures.append(_figure(title, caption, png, f"run{index}-chart{i}"))
    alerts = _alert_rows(run.alerts) if run.alerts else "<p>No alerts.</p>"
    return (
        f'<section class="run" id="run{index}"><h2>{_e(run.source)}</h2>'
        f'<div class="meta">{_meta(run)}</div>{_verdict_html(run.alerts)}'
        f"<h3>Alerts</h3>{alerts}{''.join(figures)}</section>"
    )


def render_html(runs: Sequence[RunData], *, title: str = "healthmon report") -> str:
    """The report as one HTML document (charts inline, no external resources).

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    plt = _require_matplotlib()
    all_alerts = [a for r in runs for a in r.alerts]
    overall = _verdict_html(all_alerts).replace('id="verdict"', 'id="overall"') if len(runs) > 1 else ""
    sections = "".join(_run_section(plt, r, i) for i, r in enumerate(runs))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{_e(title)}</h1><div class='meta'>{len(runs)} run(s) &middot; generated {_e(stamp)} "
        f"by healthmon</div>{overall}{sections}</main></body></html>\n"
    )


def write_html_report(path: str, out: str, *, title: str | None = None) -> list[RunData]:
    """Read the runs under ``path`` and write the HTML report to ``out`` atomically.

    Returns:
        The runs that were rendered.

    Raises:
        ReportError: unreadable input (one-line reason).
        MissingDependencyError: matplotlib is not installed.
    """
    _require_matplotlib()  # fail before reading a large log dir
    runs = load_run_data(path)
    name = title or f"healthmon report: {os.path.basename(os.path.abspath(path)) or path}"
    write_text_atomic(out, render_html(runs, title=name))
    return runs


__all__ = [
    "NOT_RECORDED",
    "REPORT_NAME",
    "MissingDependencyError",
    "RunData",
    "load_run_data",
    "read_scalars",
    "render_html",
    "write_html_report",
]
