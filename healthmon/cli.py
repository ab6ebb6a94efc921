"""`healthmon check` (and friends): turn a run's alerts into a CI verdict.

Exit status: 0 nothing at or above ``--fail-on``; 1 alerts at or above it (one line each);
2 bad usage or unreadable input (one line, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn
from xml.sax.saxutils import escape, quoteattr

from healthmon.alerts import SEVERITIES, Alert, severity_rank
from healthmon.report.errors import ReportError
from healthmon.report.reader import RunAlerts, load_runs
from healthmon.sinks.report import write_text_atomic

EXIT_OK, EXIT_ALERTS, EXIT_USAGE = 0, 1, 2
FORMATS = ("text", "json", "junit", "github")


class UsageError(Exception):
    """Bad command-line usage: reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``healthmon`` command line: the ``check`` and ``report`` commands and their options."""
    parser = _Parser(prog="healthmon", description="Numerical health of PyTorch Lightning runs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser(
        "check",
        help="exit 1 when a run has alerts at or above --fail-on",
        description="Read a report JSON or a TensorBoard log dir and list its alerts.",
    )
    check.add_argument("path", metavar="PATH", help="a TensorBoard log dir or a healthmon report JSON")
    check.add_argument("--fail-on", choices=SEVERITIES, default="warning", help="lowest failing severity")
    check.add_argument("--format", choices=FORMATS, default="text", dest="fmt", help="output format")
    check.add_argument("--output", "-o", metavar="FILE", help="write the output here instead of stdout")
    report = sub.add_parser(
        "report",
        help="write a self-contained HTML report (charts and alerts) for CI artifacts",
        description="Render a run's charts and alerts into one HTML file (needs healthmon[report]).",
    )
    report.add_argument("path", metavar="PATH", help="a TensorBoard log dir or a healthmon report JSON")
    report.add_argument(
        "--out", "-o", metavar="FILE", default="healthmon_report.html", help="the HTML file to write"
    )
    report.add_argument("--title", default=None, help="the report's title (default: from PATH)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``healthmon`` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("expected a command: check or report")
        if args.command == "report":
            return _report(args)
        return _check(args)
    except UsageError as exc:
        print(f"healthmon: error: {exc} (see 'healthmon --help')", file=sys.stderr)
        return EXIT_USAGE
    except ReportError as exc:
        print(f"healthmon: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"healthmon: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE


def _check(args: argparse.Namespace) -> int:
    runs = load_runs(args.path)
    rank = severity_rank(args.fail_on)
    failing = [(run, a) for run in runs for a in run.alerts if severity_rank(a.severity) >= rank]
    text = _render(args.fmt, runs, failing, args.fail_on)
    if args.output:
        write_text_atomic(args.output, text)
    elif text:
        sys.stdout.write(text)
    return EXIT_ALERTS if failing else EXIT_OK


def _report(args: argparse.Namespace) -> int:
    """Write the HTML report; exit 0 whatever the alerts (`check` gives the verdict)."""
    from healthmon.report.html import write_html_report

    runs = write_html_report(args.path, args.out, title=args.title)
    n_alerts = sum(len(r.alerts) for r in runs)
    print(f"healthmon: wrote {args.out} ({len(runs)} run(s), {n_alerts} alert(s))")
    return EXIT_OK


def _render(fmt: str, runs: list[RunAlerts], failing: list[tuple[RunAlerts, Alert]], fail_on: str) -> str:
    if fmt == "json":
        import json

        payload = {
            "fail_on": fail_on,
            "failed": bool(failing),
            "runs": [
                {"source": r.source, "status": r.status, "alerts": [a.to_dict() for a in r.alerts]}
                for r in runs
            ],
        }
        return json.dumps(payload, indent=2) + "\n"
    if fmt == "junit":
        return _junit(runs, fail_on)
    if fmt == "github":
        return "".join(_github_line(a) + "\n" for _, a in failing)
    lines = [_text_line(run, a, len(runs) > 1) for run, a in failing]
    if not failing:
        total = sum(len(r.alerts) for r in runs)
        lines.append(f"healthmon: OK - no alerts at or above {fail_on} ({total} below) in {len(runs)} run(s)")
    return "\n".join(lines) + "\n"


def _text_line(run: RunAlerts, a: Alert, show_source: bool) -> str:
    where = a.where or "-"
    count = f" (x{a.count})" if a.count > 1 else ""
    source = f"{run.source}: " if show_source else ""
    return f"{source}{a.severity} {a.code} step={a.step} where={where}: {a.message}{count} Hint: {a.hint}"


def _github_line(a: Alert) -> str:
    """A GitHub Actions workflow command; a file:LINE `where` becomes an annotation on that line."""
    level = {"error": "error", "warning": "warning", "info": "notice"}[a.severity]
    props = [f"title=healthmon {a.code}"]
    if a.where and ":" in a.where and a.where.rsplit(":", 1)[1].isdigit():
        file, line = a.where.rsplit(":", 1)
        props = [f"file={file}", f"line={line}", *props]
    message = f"{a.message} (step {a.step}, where {a.where or '-'}) Hint: {a.hint}"
    return f"::{level} {','.join(_gh_escape(p, True) for p in props)}::{_gh_escape(message, False)}"


def _gh_escape(text: str, prop: bool) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        key, _, value = text.partition("=")
        return key + "=" + value.replace(":", "%3A").replace(",", "%2C")
    return text


def _junit(runs: list[RunAlerts], fail_on: str) -> str:
    """JUnit XML: one test case per alert, failed when at or above ``fail_on``."""
    rank = severity_rank(fail_on)
    cases, failures, total = [], 0, 0
    for run in runs:
        if not run.alerts:
            total += 1
            cases.append(f'  <testcase classname="healthmon" name={quoteattr(run.source + ": healthy")}/>')
        for a in run.alerts:
            total += 1
            name = quoteattr(f"{a.code} at {a.where or '-'} (step {a.step})")
            if severity_rank(a.severity) >= rank:
                failures += 1
                body = escape(f"{a.message}\nHint: {a.hint}\nSource: {run.source}\nCount: {a.count}")
                cases.append(
                    f'  <testcase classname="healthmon.{a.code}" name={name}>\n'
                    f"    <failure message={quoteattr(a.message)} type={quoteattr(a.severity)}>"
                    f"{body}</failure>\n"
                    "  </testcase>"
                )
            else:
                cases.append(f'  <testcase classname="healthmon.{a.code}" name={name}/>')
    head = f'<testsuite name="healthmon" tests="{total}" failures="{failures}" errors="0">'
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + head + "\n" + "\n".join(cases) + "\n</testsuite>\n"


if __name__ == "__main__":
    sys.exit(main())
