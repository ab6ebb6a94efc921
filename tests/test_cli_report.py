"""`healthmon report`: writes one HTML file from a log dir or a report; clear errors; no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from models import DigitsClassifier, digits_loader, trainer

from healthmon import GradientNormMonitor, HealthMonitor, NonFiniteMonitor
from healthmon.cli import main

pytest.importorskip("matplotlib", reason="the HTML report needs matplotlib (healthmon[report])")


@pytest.fixture(scope="module")
def sick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sick")
    mon = HealthMonitor(monitors=[NonFiniteMonitor(), GradientNormMonitor()], summary=False)
    t = trainer(root, [mon], max_steps=30)
    t.fit(DigitsClassifier(lr=10.0), digits_loader())
    return {"root": str(root), "report": str(mon.report_path), "n": str(len(mon.alerts))}


def test_report_from_log_dir_and_from_json(
    sick: dict[str, str], tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    for i, source in enumerate((sick["root"], sick["report"])):
        out = tmp_path / f"r{i}.html"
        code = main(["report", source, "--out", str(out), "--title", "nightly <smoke>"])
        captured = capsys.readouterr()
        assert code == 0 and captured.err == ""
        assert captured.out == f"healthmon: wrote {out} (1 run(s), {sick['n']} alert(s))\n"
        doc = out.read_text()
        assert doc.startswith("<!DOCTYPE html>") and "<title>nightly &lt;smoke&gt;</title>" in doc
        assert doc.count('class="alert-row"') == int(sick["n"]) > 0


def test_default_output_name(sick: dict[str, str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["report", sick["root"]]) == 0
    assert (tmp_path / "healthmon_report.html").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report"], "the following arguments are required: PATH"),
        (["report", "/nonexistent/run"], "no such file or directory"),
        (["report", "{tmp}"], "no event files or healthmon report"),
        (["report", "{tmp}/bad.json"], "not valid JSON"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    argv: list[str], message: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.json").write_text("{nope")
    out = tmp_path / "out.html"
    code = main([a.format(tmp=tmp_path) for a in argv] + ["--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and not out.exists()
    assert len(captured.err.strip().splitlines()) == 1 and message in captured.err


def test_unwritable_output_exits_2(
    sick: dict[str, str], tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["report", sick["root"], "--out", str(blocker / "r.html")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_report_command_does_not_import_torch(sick: dict[str, str], tmp_path: Any) -> None:
    code = (
        "import sys; from healthmon.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules and 'pytorch_lightning' not in sys.modules; sys.exit(rc)"
    )
    out = tmp_path / "r.html"
    proc = subprocess.run(
        [sys.executable, "-c", code, "report", sick["root"], "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert os.path.getsize(out) > 10_000 and json.loads(Path(sick["report"]).read_text())["alerts"]
