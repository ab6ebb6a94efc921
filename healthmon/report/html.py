"""A self-contained HTML health report (``healthmon report PATH --out report.html``).

One file, no network: charts are PNGs inlined as base64 ``data:`` URIs, the style sheet is inline
and there is no JavaScript. It is meant to be uploaded as a CI artifact and opened by someone
asking "is this run healthy, and if not, what do I change?".

Inputs: a run folder / folder of runs / report JSON, read once with
:func:`healthmon.report.run_data.load_run_data` (alerts, run metadata, and the scalars of the
event files beside each report). The charts are :data:`healthmon.report.charts.CHARTS`; one
whose tags the run did not record says so.

matplotlib is an optional dependency (``pip install 'healthmon[report]'``); it is imported lazily
so that ``healthmon check`` never pays for it. No torch import.
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Sequence
from typing import Any

from healthmon.alerts import CODES, Alert, severity_rank
from healthmon.report.charts import CHARTS, TIMELINE_TITLE, require_matplotlib
from healthmon.report.errors import MissingDependencyError
from healthmon.report.run_data import RunData, load_run_data
from healthmon.sinks.console import count_text
from healthmon.sinks.report import write_text_atomic

NOT_RECORDED = "not recorded in this run"
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
    figures = []
    for i, chart in enumerate(CHARTS):
        title, png = chart.title, chart.draw(plt, run)
        if png is None and title == TIMELINE_TITLE:
            figures.append(
                f"<figure><h3>{_e(title)}</h3><div class='missing'>No alerts fired.</div></figure>"
            )
            continue
        figures.append(_figure(title, chart.caption, png, f"run{index}-chart{i}"))
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
    plt = require_matplotlib()
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
    require_matplotlib()  # fail before reading a large log dir
    runs = load_run_data(path)
    name = title or f"healthmon report: {os.path.basename(os.path.abspath(path)) or path}"
    write_text_atomic(out, render_html(runs, title=name))
    return runs


__all__ = [
    "NOT_RECORDED",
    "MissingDependencyError",
    "RunData",
    "load_run_data",
    "render_html",
    "write_html_report",
]
