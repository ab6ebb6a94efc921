"""Reading runs back: report versions, run metadata, each report read once."""

from __future__ import annotations

import builtins
import json
from typing import Any

import pytest

from healthmon.alerts import make_alert
from healthmon.report.errors import ReportError
from healthmon.report.reader import load_runs, read_report
from healthmon.report.run_data import load_run_data
from healthmon.sinks.report import REPORT_NAME, build_report, write_json_atomic


def _report(**run: Any) -> dict[str, Any]:
    return build_report(
        run={"status": "completed", **run},
        config={},
        alerts=[make_alert("grad.explosion", 3, "m", where="net.0")],
        dropped=0,
        last={"healthmon/loss": 1.5},
    )


def test_newer_schema_versions_are_refused_clearly(tmp_path: Any) -> None:
    path = str(tmp_path / "r.json")
    write_json_atomic(path, {**_report(), "version": 99})
    with pytest.raises(ReportError, match="unsupported report version 99"):
        read_report(path)


def test_runs_keep_the_reports_run_metadata(tmp_path: Any) -> None:
    for name in ("a", "b"):
        write_json_atomic(str(tmp_path / name / REPORT_NAME), _report(global_step=7, precision=name))
    runs = load_runs(str(tmp_path))
    assert [r.run["precision"] for r in runs] == ["a", "b"]
    assert all(r.status == "completed" and r.run["global_step"] == 7 for r in runs)
    assert [a.code for r in runs for a in r.alerts] == ["grad.explosion"] * 2


def test_each_report_is_read_once(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The HTML report's data (alerts, metadata, scalars) comes from one read of each report."""
    path = str(tmp_path / REPORT_NAME)
    write_json_atomic(path, _report(precision="bf16-mixed"))
    calls: list[str] = []
    real_open = builtins.open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == path:
            calls.append(path)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    for target in (path, str(tmp_path)):
        calls.clear()
        (run,) = load_run_data(target)
        assert calls == [path] and run.run["precision"] == "bf16-mixed"
        assert run.event_dir is None and run.scalars == {}


def test_a_report_that_is_not_json_names_the_line(tmp_path: Any) -> None:
    path = tmp_path / "r.json"
    path.write_text('{"schema": "healthmon.report",\n oops}')
    with pytest.raises(ReportError, match="not valid JSON \\(line 2"):
        load_runs(str(path))
    path.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ReportError, match="not a healthmon report"):
        load_runs(str(path))


def test_an_event_file_without_healthmon_data_is_refused_clearly(tmp_path: Any) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_scalar("other/x", 1.0, 0)
    (event_file,) = (str(p) for p in tmp_path.iterdir())
    for target in (event_file, str(tmp_path)):
        with pytest.raises(ReportError, match="no healthmon data in its event files"):
            load_runs(target)
