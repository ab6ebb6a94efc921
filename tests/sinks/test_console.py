"""The end-of-fit summary: one 'healthy' line, or a table with what is wrong and what to change."""

from __future__ import annotations

import io
import sys

import pytest

from healthmon.alerts import make_alert
from healthmon.sinks import console
from healthmon.sinks.console import MAX_ROWS, print_summary, summary_lines


def _alerts() -> list:
    a = make_alert("grad.explosion", 31, "Gradient norm 120 is 15x its running level.")
    b = make_alert("loss.divergence", 40, "The loss rose 12x.")
    c = make_alert("softmax.saturated", 3, "0.3% of probabilities are 0 or 1.", where="x" * 100 + "/m.py:7")
    c.count = 4
    d = make_alert("hessian.negative_curvature", 0, "Saddle.")
    return [a, b, c, d]


def test_healthy_is_one_line_plus_where_to_look() -> None:
    assert summary_lines([]) == ["healthmon: healthy - no numerical problems detected."]
    lines = summary_lines([], log_dir="runs/x/version_0")
    assert lines[0].startswith("healthmon: healthy") and len(lines) == 3
    assert "tensorboard --logdir runs/x/version_0" in lines[1] and "healthmon report runs/x" in lines[2]


def test_table_is_most_severe_first_with_fix_under_each_row() -> None:
    lines = summary_lines(_alerts(), width=80)
    assert lines[0] == "healthmon: NOT healthy - 4 alert(s): 1 error, 2 warnings, 1 info"
    assert lines[1].split() == ["code", "severity", "first", "step", "count", "where"]
    rows = [line for line in lines[2:] if not line.startswith("      ")]
    assert [r.split()[0] for r in rows] == [
        "loss.divergence",
        "softmax.saturated",  # warnings in step order: 3 before 31
        "grad.explosion",
        "hessian.negative_curvature",
    ]
    sat = rows[1].split()
    assert sat[1:4] == ["warning", "3", "4"] and sat[4].startswith("xxx") and "..." in sat[4]
    assert len(sat[4]) == console.MAX_WHERE and sat[4].endswith("/m.py:7")
    detail = [line for line in lines if line.startswith("      ")]
    assert all(len(line) <= 80 for line in detail)
    joined = " ".join(line.strip() for line in detail)
    assert "The loss rose 12x. Fix: Lower the learning rate" in joined


def test_notes_only_run_is_called_healthy() -> None:
    lines = summary_lines([make_alert("grad.norm_rising", 200, "Norm rises while loss falls.")])
    assert lines[0].startswith("healthmon: healthy (notes only) - 1 alert(s): 1 info")


def test_long_runs_are_cut_with_a_pointer() -> None:
    many = [make_alert("grad.zero", i, "zero", where=f"layer{i}") for i in range(MAX_ROWS + 5)]
    lines = summary_lines(many)
    assert sum(1 for line in lines if line.startswith("  grad.zero")) == MAX_ROWS
    assert lines[-1] == "  ... and 5 more (healthmon check <log dir> lists all)"


def test_print_summary_plain_matches_summary_lines() -> None:
    out = io.StringIO()
    print_summary(_alerts(), log_dir="d", file=out, use_rich=False)
    assert out.getvalue().splitlines() == summary_lines(_alerts(), log_dir="d")


def test_print_summary_uses_plain_text_without_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)  # rich "not installed"
    monkeypatch.setattr(console, "rich_available", lambda: False)
    out = io.StringIO()
    print_summary([], file=out)
    assert out.getvalue() == "healthmon: healthy - no numerical problems detected.\n"


def test_print_summary_rich_table() -> None:
    pytest.importorskip("rich", reason="rich is not installed (it comes with Lightning's rich extras)")
    out = io.StringIO()
    alerts = _alerts()
    alerts[0].message = "[bold]not markup[/bold]"  # user text is never parsed as rich markup
    print_summary(alerts, log_dir="runs/v0", file=out, use_rich=True)
    text = out.getvalue()
    assert "NOT healthy - 4 alert(s)" in text and "[bold]not markup[/bold]" in text
    for a in alerts:
        assert a.code in text
    assert "tensorboard --logdir runs/v0" in text and "\x1b[" not in text  # no colour codes in a file
