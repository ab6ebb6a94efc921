"""`healthmon check` / `healthmon report` on malformed input: a field-by-field type fuzz.

Every field of a real run's report (and of the alert records in its event files) is replaced by
values of wrong types, nested ones included; the CLI must exit 2 with one line on stderr naming the
file and the field, never a traceback and never exit 1 (the "sick run" status).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from models import DigitsClassifier, digits_loader, trainer

from healthmon import HealthMonitor
from healthmon.cli import main
from healthmon.tags import ALERT_RECORDS as ALERT_RECORD_TAG

HAS_MATPLOTLIB = True
try:
    import matplotlib  # noqa: F401
except ImportError:
    HAS_MATPLOTLIB = False


@pytest.fixture(scope="module")
def sick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real sick run: its report (with alerts) and the alert records of its event files."""
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sick")
    mon = HealthMonitor(summary=False)
    trainer(root, [mon], max_steps=30).fit(DigitsClassifier(lr=10.0), digits_loader())
    with open(str(mon.report_path)) as f:
        report = json.load(f)
    assert report["alerts"] and report["last"] and report["run"]["status"] == "completed"
    return {"report": report, "path": str(mon.report_path)}


# What each field of the report allows (the contract), by kind.
TEXT, OPT_TEXT, COUNT, POSITIVE, OPT_NUMBER, OPT_TIME, OBJECT, NUMBER = (
    "text",
    "optional text",
    "count",
    "positive",
    "optional number",
    "optional time",
    "object",
    "number",
)
RUN_FIELDS = {
    "status": "status",
    "global_step": COUNT,
    "epoch": COUNT,
    "started": OPT_TIME,
    "finished": OPT_TIME,
    "precision": TEXT,
    "world_size": POSITIVE,
    "strategy": TEXT,
    "log_dir": OPT_TEXT,
    "versions": "versions",
}
ALERT_FIELDS = {
    "code": TEXT,
    "severity": "severity",
    "step": COUNT,
    "message": TEXT,
    "hint": TEXT,
    "where": OPT_TEXT,
    "count": POSITIVE,
    "last_step": "last_step",
    "value": OPT_NUMBER,
}
WRONG_TYPES: list[Any] = [None, [], [1, "a"], {}, {"a": None}, "text", 3.5, 7, True, False, -1, [{"code": 1}]]


def _allowed(kind: str, value: Any) -> bool:
    """The test's own statement of the schema: is ``value`` valid for a field of this kind?"""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {
        TEXT: isinstance(value, str),
        OPT_TEXT: value is None or isinstance(value, str),
        COUNT: is_int and value >= 0,
        POSITIVE: is_int and value >= 1,
        OPT_NUMBER: value is None or is_number,
        OPT_TIME: value is None or is_number,
        OBJECT: isinstance(value, dict),
        NUMBER: is_number,
        "last_step": is_int and value >= -1,
        "status": value in ("completed", "stopped", "exception"),
        "severity": value in ("info", "warning", "error"),
        "versions": isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
    }[kind]


LAST_TAG = "<first tag>"  # resolved against the real report's ``last``

#: (field as the CLI names it, path into the report, kind) for every field of a report.
CASES: list[tuple[str, list[str | int], str]] = [
    ("run", ["run"], OBJECT),
    ("config", ["config"], OBJECT),
    ("alerts", ["alerts"], "alerts"),
    ("dropped_alerts", ["dropped_alerts"], COUNT),
    ("counts", ["counts"], OBJECT),
    ("last", ["last"], OBJECT),
    ("version", ["version"], "version"),
    *[(f"run.{k}", ["run", k], kind) for k, kind in RUN_FIELDS.items()],
    *[(f"alerts[0].{k}", ["alerts", 0, k], kind) for k, kind in ALERT_FIELDS.items()],
    *[(f"counts.{k}", ["counts", k], COUNT) for k in ("info", "warning", "error")],
    (f"last.{LAST_TAG}", ["last", LAST_TAG], NUMBER),
]


def _set(report: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(report)
    target: Any = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


def _delete(report: dict[str, Any], path: list[str | int]) -> dict[str, Any]:
    out = copy.deepcopy(report)
    target: Any = out
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return out


def _assert_one_line_exit_2(
    argv: list[str], path: str, field: str, capsys: pytest.CaptureFixture[str], what: str
) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, f"{what}: exit {code}, stderr {captured.err!r}"
    assert len(lines) == 1 and "Traceback" not in captured.err, f"{what}: {captured.err!r}"
    assert path in lines[0] and field in lines[0], f"{what}: {lines[0]!r}"
    return lines[0]


def _commands(path: str, tmp_path: Any) -> list[list[str]]:
    commands = [["check", path], ["check", path, "--format", "json"]]
    if HAS_MATPLOTLIB:
        commands.append(["report", path, "-o", str(tmp_path / "out.html")])
    return commands


def test_the_unchanged_report_is_valid(
    sick: dict[str, Any], tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fuzz starts from a report the CLI accepts: every rejection below is the mutation's."""
    path = str(tmp_path / "healthmon_report.json")
    with open(path, "w") as f:
        json.dump(sick["report"], f)
    assert main(["check", path]) == 1  # a sick run, read correctly
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("field", "where", "kind"), CASES, ids=[c[0] for c in CASES])
def test_every_report_field_with_a_wrong_type_exits_2(
    sick: dict[str, Any],
    field: str,
    where: list[str | int],
    kind: str,
    tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if LAST_TAG in where:
        tag = sorted(sick["report"]["last"])[0]
        field, where = f"last.{tag}", ["last", tag]
    path = str(tmp_path / "healthmon_report.json")
    tried = 0
    for wrong in WRONG_TYPES:
        if kind == "version" and wrong in (None, "text", [], {}):
            continue  # refused earlier as "not a supported version" (tested in test_cli.py)
        if kind == "alerts" and isinstance(wrong, list) and not wrong:
            continue  # an empty alert list is a valid (healthy) report
        if kind not in ("alerts", "version") and _allowed(kind, wrong):
            continue
        with open(path, "w") as f:
            json.dump(_set(sick["report"], where, wrong), f)
        shown = field if kind != "alerts" or not isinstance(wrong, list) else "alerts[0]"
        for argv in _commands(path, tmp_path):
            what = f"{field} = {wrong!r}, {argv[0]}"
            if kind == "version":
                code = main(argv)
                err = capsys.readouterr().err
                assert code == 2 and len(err.strip().splitlines()) == 1, what
                assert path in err and "version" in err, what
            else:
                _assert_one_line_exit_2(argv, path, shown, capsys, what)
        tried += 1
    assert tried >= 4, field


@pytest.mark.parametrize(
    ("where", "field"),
    [
        (["run"], "'run'"),
        (["alerts"], "'alerts'"),
        (["run", "status"], "'run.status'"),
        (["alerts", 0, "code"], "'alerts[0].code'"),
        (["alerts", 0, "step"], "'alerts[0].step'"),
    ],
)
def test_a_missing_required_field_exits_2(
    sick: dict[str, Any],
    where: list[str | int],
    field: str,
    tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = str(tmp_path / "healthmon_report.json")
    with open(path, "w") as f:
        json.dump(_delete(sick["report"], where), f)
    for argv in _commands(path, tmp_path):
        line = _assert_one_line_exit_2(argv, path, field, capsys, f"without {field}")
        assert line.endswith("the field is missing"), line


def test_the_console_script_on_run_null_prints_one_line(sick: dict[str, Any], tmp_path: Any) -> None:
    """The reported case, through the installed entry point: no traceback, exit 2."""
    path = str(tmp_path / "healthmon_report.json")
    with open(path, "w") as f:
        json.dump(_set(sick["report"], ["run"], None), f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "healthmon.cli", "check", path], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == (
        f"healthmon: error: {path}: malformed report, field 'run': expected an object, got null"
    )


# ---- alert records read back from TensorBoard event files -------------------------------------------


def _event_file(folder: Any, texts: list[str]) -> str:
    """An event folder holding healthmon alert records, written the way the driver writes them."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    writer.add_scalar("healthmon/loss", 1.0, 0)
    for i, text in enumerate(texts):
        writer.add_text(ALERT_RECORD_TAG, text, i)
    writer.close()
    return str(folder)


def test_valid_alert_records_are_read_back(
    sick: dict[str, Any], tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _event_file(tmp_path / "ok", [json.dumps(a) for a in sick["report"]["alerts"]])
    assert main(["check", folder, "--format", "json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [a["code"] for a in out["runs"][0]["alerts"]] == [a["code"] for a in sick["report"]["alerts"]]


def test_every_alert_record_field_with_a_wrong_type_exits_2(
    sick: dict[str, Any], tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    alert = sick["report"]["alerts"][0]
    n = 0
    for key, kind in ALERT_FIELDS.items():
        for wrong in WRONG_TYPES:
            if _allowed(kind, wrong):
                continue
            n += 1
            folder = _event_file(tmp_path / str(n), [json.dumps(alert), json.dumps({**alert, key: wrong})])
            for argv in _commands(folder, tmp_path):
                _assert_one_line_exit_2(
                    argv, "events.out.tfevents", f"[1].{key}'", capsys, f"{key}={wrong!r}"
                )
    assert n >= 60


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected an object"),
        ("null", "expected an object"),
        ('"a string"', "expected an object"),
        ("42", "expected an object"),
        ('{"severity": "error"}', "the field is missing"),
    ],
)
def test_alert_records_that_are_not_alerts_exit_2(
    text: str, message: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _event_file(tmp_path / "bad", [text])
    for argv in _commands(folder, tmp_path):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "events.out.tfevents" in err and ALERT_RECORD_TAG in err and message in err, err


def test_an_alert_record_that_is_not_text_exits_2(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.util import tensor_util
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    proto = tensor_util.make_tensor_proto([1.5, 2.5])
    writer._get_file_writer().add_summary(
        Summary(value=[Summary.Value(tag=ALERT_RECORD_TAG, tensor=proto)]), 0
    )
    writer.close()
    code = main(["check", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "expected text" in err, err
