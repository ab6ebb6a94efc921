"""The end-of-fit summary in the terminal: is the run healthy, and if not, what to change.

Two renderings of the same content:

* :func:`summary_lines` - plain text (any terminal, CI logs, captured output). The driver prints it at
  the end of a run.
* :func:`print_summary` - a ``rich`` table when ``rich`` is installed (Lightning's
  ``RichProgressBar`` / ``RichModelSummary`` integration brings it), else the plain lines.

Pure Python: no torch import, so the CLI and tests can use it cheaply.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import TextIO

from healthmon.alerts import SEVERITIES, Alert, severity_rank

#: Rows shown before the summary points to the full report (a long, sick run stays readable).
MAX_ROWS = 20
#: Longest ``where`` kept in the table; longer ones keep their start and end.
MAX_WHERE = 40
HEADER = ("code", "severity", "first step", "count", "where")


def _ordered(alerts: Sequence[Alert]) -> list[Alert]:
    """Most severe first, then in the order detected (first step)."""
    return sorted(alerts, key=lambda a: (-severity_rank(a.severity), a.step))


def _shorten(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    keep = width - 3
    return text[: keep // 2] + "..." + text[len(text) - (keep - keep // 2) :]


def count_text(alerts: Sequence[Alert]) -> str:
    """'1 error, 2 warnings, 1 info': alert counts by severity, most severe first."""
    counts = {s: sum(1 for a in alerts if a.severity == s) for s in SEVERITIES}
    plural = {"error": "errors", "warning": "warnings", "info": "info"}
    return ", ".join(
        f"{counts[s]} {plural[s] if counts[s] > 1 else s}" for s in reversed(SEVERITIES) if counts[s]
    )


def verdict(alerts: Sequence[Alert]) -> str:
    """One line: 'healthy', or the alert counts by severity (most severe first)."""
    if not alerts:
        return "healthmon: healthy - no numerical problems detected."
    worst = max(alerts, key=lambda a: severity_rank(a.severity)).severity
    state = "NOT healthy" if worst != "info" else "healthy (notes only)"
    return f"healthmon: {state} - {len(alerts)} alert(s): {count_text(alerts)}"


def _row(a: Alert) -> tuple[str, ...]:
    return (a.code, a.severity, str(a.step), str(a.count), _shorten(a.where or "-", MAX_WHERE))


def _footer(log_dir: str | None, report_path: str | None) -> list[str]:
    lines = []
    if log_dir:
        lines.append(f"healthmon: charts: tensorboard --logdir {log_dir}")
        lines.append(f"healthmon: HTML report: healthmon report {log_dir} --out healthmon_report.html")
    elif report_path:
        lines.append(f"healthmon: HTML report: healthmon report {report_path} --out healthmon_report.html")
    return lines


def summary_lines(
    alerts: Sequence[Alert],
    *,
    log_dir: str | None = None,
    report_path: str | None = None,
    width: int | None = None,
) -> list[str]:
    """A compact table of alerts (most severe first), or one 'healthy' line.

    Each alert is one table row (code, severity, first step, count, where) followed by an
    indented, wrapped line with what is wrong and the fix, so the answer to "what do I change?"
    is on screen without opening TensorBoard.

    Args:
        alerts: the run's alerts (de-duplicated, with counts), in any order.
        log_dir: the TensorBoard log dir; adds the commands to view the charts and the HTML report.
        report_path: the JSON report, named when there is no ``log_dir``.
        width: wrap the explanation lines at this many columns (default: the terminal's, max 120).
    """
    if width is None:
        width = min(shutil.get_terminal_size((100, 24)).columns, 120)
    width = max(width, 40)
    lines = [verdict(alerts)]
    if alerts:
        ordered = _ordered(alerts)
        shown = ordered[:MAX_ROWS]
        rows = [_row(a) for a in shown]
        widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines.append("  " + fmt.format(*HEADER).rstrip())
        for a, row in zip(shown, rows, strict=True):
            lines.append("  " + fmt.format(*row).rstrip())
            lines.extend(
                textwrap.wrap(
                    f"{a.message} Fix: {a.hint}",
                    width=width,
                    initial_indent="      ",
                    subsequent_indent="      ",
                    break_on_hyphens=False,
                )
            )
        if len(ordered) > len(shown):
            lines.append(f"  ... and {len(ordered) - len(shown)} more (healthmon check <log dir> lists all)")
    lines.extend(_footer(log_dir, report_path))
    return lines


def rich_available() -> bool:
    """Whether ``rich`` can be imported (without importing it twice)."""
    if "rich" in sys.modules:
        return True
    import importlib.util

    return importlib.util.find_spec("rich") is not None


def print_summary(
    alerts: Sequence[Alert],
    *,
    log_dir: str | None = None,
    report_path: str | None = None,
    file: TextIO | None = None,
    use_rich: bool | None = None,
) -> None:
    """Print the end-of-fit summary: a ``rich`` table when available, else :func:`summary_lines`.

    Args:
        alerts: the run's alerts.
        log_dir: see :func:`summary_lines`.
        report_path: see :func:`summary_lines`.
        file: where to print (default ``sys.stdout``).
        use_rich: force (True) or refuse (False) rich; None uses it when it is installed.
    """
    out = file if file is not None else sys.stdout
    if use_rich is None:
        use_rich = rich_available()
    if use_rich:
        _print_rich(alerts, log_dir=log_dir, report_path=report_path, file=out)
    else:
        lines = summary_lines(alerts, log_dir=log_dir, report_path=report_path)
        print("\n".join(lines), file=out, flush=True)


def _print_rich(
    alerts: Sequence[Alert], *, log_dir: str | None, report_path: str | None, file: TextIO
) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    width = None if getattr(file, "isatty", lambda: False)() else 120
    console = Console(file=file, highlight=False, width=width)
    styles = {"error": "bold red", "warning": "yellow", "info": "cyan"}
    if not alerts:
        console.print(Text(verdict(alerts), style="bold green"))
    else:
        worst = max(alerts, key=lambda a: severity_rank(a.severity)).severity
        table = Table(title=verdict(alerts), title_style=styles[worst], title_justify="left", expand=False)
        table.add_column("code", no_wrap=True)
        table.add_column("severity", no_wrap=True)
        table.add_column("first step", justify="right", no_wrap=True)
        table.add_column("count", justify="right", no_wrap=True)
        table.add_column("where", overflow="fold", ratio=1)
        table.add_column("what / fix", overflow="fold", ratio=2)
        ordered = _ordered(alerts)
        for a in ordered[:MAX_ROWS]:
            detail = Text(a.message)
            detail.append("\nFix: ", style="bold")
            detail.append(a.hint)
            table.add_row(
                Text(a.code, style="bold"),
                Text(a.severity, style=styles.get(a.severity, "")),
                str(a.step),
                str(a.count),
                Text(_shorten(a.where or "-", MAX_WHERE)),
                detail,
            )
        console.print(table)
        if len(ordered) > MAX_ROWS:
            more = f"  ... and {len(ordered) - MAX_ROWS} more (healthmon check <log dir> lists all)"
            console.print(Text(more), soft_wrap=True)
    for line in _footer(log_dir, report_path):
        console.print(Text(line, style="dim"), soft_wrap=True)
