"""`healthmon check` on healthy, sick and corrupt runs: exit codes, formats, one-line errors."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from models import DigitsClassifier, digits_loader, trainer

from healthmon import HealthMonitor
from healthmon.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A healthy and a sick run, each with its report and event files."""
    import torch

    out = {}
    for name, lr in (("healthy", 0.05), ("sick", 10.0)):
        torch.manual_seed(0)
        root = tmp_path_factory.mktemp(name)
        mon = HealthMonitor(summary=False)
        t = trainer(root, [mon], max_steps=40)
        t.fit(DigitsClassifier(lr=lr), digits_loader())
        out[name] = str(root)
        out[name + "_report"] = mon.report_path
        out[name + "_logdir"] = t.logger.log_dir
    return out


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_healthy_run_exits_0(runs: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["check", runs["healthy"]], capsys)
    assert code == 0 and out.startswith("healthmon: OK") and err == ""


def test_sick_run_exits_1_with_one_line_per_alert(
    runs: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(["check", runs["sick"]], capsys)
    report = json.loads(Path(runs["sick_report"]).read_text())
    failing = [a for a in report["alerts"] if a["severity"] in ("warning", "error")]
    lines = out.strip().splitlines()
    assert code == 1 and len(lines) == len(failing) > 0
    assert any(line.startswith("error loss.divergence step=") for line in lines)
    for line, alert in zip(lines, failing, strict=True):
        assert (
            f"{alert['code']} step={alert['step']} where={alert['where'] or '-'}: {alert['message']}" in line
        )


def test_fail_on_error_ignores_warnings(runs: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["check", runs["sick_report"], "--fail-on", "error"], capsys)
    assert code == 1 and all(line.startswith("error ") for line in out.strip().splitlines())


def test_event_files_alone_give_the_same_verdict(
    runs: dict[str, str], tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    for f in glob.glob(os.path.join(runs["sick_logdir"], "events.out.tfevents.*")):
        shutil.copy(f, tmp_path)
    code, out, _ = _run(["check", str(tmp_path), "--format", "json"], capsys)
    data = json.loads(out)
    report = json.loads(Path(runs["sick_report"]).read_text())
    assert code == 1 and data["failed"]
    assert [a["code"] for a in data["runs"][0]["alerts"]] == [a["code"] for a in report["alerts"]]


def test_github_format_prints_workflow_commands(
    runs: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(["check", runs["sick"], "--format", "github"], capsys)
    assert code == 1
    for line in out.strip().splitlines():
        assert line.startswith(("::error ", "::warning ", "::notice ")) and "title=healthmon " in line


def test_junit_format_is_valid_xml_with_failures(
    runs: dict[str, str], tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "junit.xml"
    code, out, _ = _run(["check", runs["sick"], "--format", "junit", "-o", str(out_file)], capsys)
    suite = ET.parse(out_file).getroot()
    assert code == 1 and out == ""
    assert suite.tag == "testsuite" and int(suite.get("failures")) >= 1
    assert len(suite.findall("testcase/failure")) == int(suite.get("failures"))
    code, _, _ = _run(["check", runs["healthy"], "--format", "junit", "-o", str(out_file)], capsys)
    assert code == 0 and ET.parse(out_file).getroot().get("failures") == "0"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: os.path.join(d, "missing"), "no such file or directory"),
        (lambda d: d, "no event files or healthmon report"),
        (
            lambda d: _write(d, "events.out.tfevents.1.host", b"\x00garbage" * 50),
            "corrupt or truncated event file",
        ),
        (lambda d: _write(d, "healthmon_report.json", b"{not json"), "not valid JSON"),
        (lambda d: _write(d, "r.json", b'{"schema": "other"}'), "not a healthmon report"),
        (
            lambda d: _write(
                d,
                "r.json",
                b'{"schema": "healthmon.report", "version": 1, "run": {"status": "completed"},'
                b' "alerts": [{"code": 1}]}',
            ),
            "field 'alerts[0].code'",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Any, make: Any, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make(str(tmp_path))
    code, out, err = _run(["check", path], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


def test_truncated_event_file_exits_2(
    runs: dict[str, str], tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    src = glob.glob(os.path.join(runs["sick_logdir"], "events.out.tfevents.*"))[0]
    data = Path(src).read_bytes()
    _write(str(tmp_path), os.path.basename(src), data[: len(data) - 7])
    code, _, err = _run(["check", str(tmp_path)], capsys)
    assert code == 2 and "truncated" in err


@pytest.mark.parametrize(
    "argv",
    [[], ["check"], ["check", ".", "--fail-on", "fatal"], ["check", ".", "--format", "xml"], ["frobnicate"]],
)
def test_bad_usage_exits_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1


def test_console_script_runs_without_importing_torch(runs: dict[str, str]) -> None:
    code = (
        "import sys; from healthmon.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules and 'pytorch_lightning' not in sys.modules; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, "check", runs["sick"]], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr


def _write(folder: str, name: str, data: bytes) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data)
    return path
