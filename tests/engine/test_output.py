"""RunOutput: scalars and texts through a real TensorBoard writer, the layout, the report, the crash record.

Event files are read back with TensorBoard's own ``EventAccumulator``; the report and the crash record
are read back as JSON from the folder the writer chose.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from engine.runs import FolderRun
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from healthmon.alerts import make_alert
from healthmon.engine.output import RunOutput
from healthmon.sinks.report import CRASH_NAME, REPORT_NAME, SCHEMA
from healthmon.tags import CONFIG_TEXT

CUSTOM_SCALARS = "custom_scalars__config__"


def _events(folder: str) -> EventAccumulator:
    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def _written(tmp_path: Path) -> tuple[RunOutput, FolderRun]:
    out = RunOutput(print_summary=False)
    run = FolderRun(nn.Linear(2, 2), [], str(tmp_path / "tb"))
    out.open(run)
    return out, run


def test_open_takes_the_runs_writer_and_puts_the_report_beside_it(tmp_path: Path) -> None:
    out, _ = _written(tmp_path)
    assert out.writer is not None
    assert out.log_dir == str(tmp_path / "tb")
    assert out.report_path == os.path.join(str(tmp_path / "tb"), REPORT_NAME)
    out.close()
    assert out.writer is None


def test_other_ranks_open_no_writer_and_only_remember_last_values(tmp_path: Path) -> None:
    out = RunOutput()
    run = FolderRun(nn.Linear(2, 2), [], str(tmp_path / "tb"))
    run.is_global_zero = False
    out.open(run)
    out.start()
    out.scalars({"a": torch.tensor(2.0), "b": 3}, step=1)
    out.scalars({"a": 4.0}, step=2)
    out.text("t", "x", 1)
    out.histogram("h", torch.ones(3), 1)
    out.finish(run, "completed", [], 0)
    assert out.writer is None
    assert out.log_dir is None
    assert out.crash_record({"step": 1}) is None
    assert out.last == {"a": 4.0, "b": 3.0}
    assert all(type(v) is float for v in out.last.values())
    assert not (tmp_path / "tb").exists()


def test_scalars_text_and_layout_read_back_from_the_event_files(tmp_path: Path) -> None:
    out, run = _written(tmp_path)
    out.config = {"on_alert": "warn", "monitors": {"M": {"every": 5}}}
    out.declare_layout("healthmon", {"loss": ["healthmon/loss"]})
    out.declare_layout("healthmon", {"norm": ["healthmon/grad_norm", "healthmon/grad_norm_max"]})
    assert out.layout == {
        "healthmon": {
            "loss": ["Multiline", ["healthmon/loss"]],
            "norm": ["Multiline", ["healthmon/grad_norm", "healthmon/grad_norm_max"]],
        }
    }
    out.start()
    out.scalars({"healthmon/loss": 2.5, "healthmon/grad_norm": 0.125}, step=1)
    out.scalars({"healthmon/loss": 1.5}, step=2)
    out.scalars({}, step=3)  # nothing to write
    out.histogram("healthmon/h", torch.tensor([1.0, float("nan"), 2.0]), 2)
    out.close()

    acc = _events(str(tmp_path / "tb"))
    loss = acc.Scalars("healthmon/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 2.5), (2, 1.5)]
    assert [(e.step, e.value) for e in acc.Scalars("healthmon/grad_norm")] == [(1, 0.125)]
    tensors = acc.Tags()["tensors"]
    assert CUSTOM_SCALARS in tensors
    config_text = next(t for t in tensors if t.startswith(CONFIG_TEXT))
    text = acc.Tensors(config_text)[0].tensor_proto.string_val[0].decode()
    assert '"on_alert": "warn"' in text
    assert [h.histogram_value.num for h in acc.Histograms("healthmon/h")] == [2.0]  # NaN left out
    assert out.last == {"healthmon/loss": 1.5, "healthmon/grad_norm": 0.125}


def test_finish_writes_the_report_once_atomically(tmp_path: Path) -> None:
    out, run = _written(tmp_path)
    out.config = {"fail_on": "warning"}
    run.global_step, run.current_epoch = 7, 1
    out.scalars({"healthmon/loss": 0.5}, step=7)
    alert = make_alert("grad.explosion", 6, "the gradient norm jumped", where="net.0")
    out.finish(run, "completed", [alert], dropped=2)
    folder = tmp_path / "tb"
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]
    report = json.loads((folder / REPORT_NAME).read_text())
    assert report["schema"] == SCHEMA
    assert report["run"]["status"] == "completed"
    assert (report["run"]["global_step"], report["run"]["epoch"]) == (7, 1)
    assert report["run"]["log_dir"] == str(folder)
    assert report["run"]["versions"]["torch"] == torch.__version__
    assert "error" not in report["run"]
    assert report["config"] == {"fail_on": "warning"}
    assert [a["code"] for a in report["alerts"]] == ["grad.explosion"]
    assert report["dropped_alerts"] == 2
    assert report["last"] == {"healthmon/loss": 0.5}

    (folder / REPORT_NAME).write_text("{}")
    out.finish(run, "exception", [], 0)  # once per fit: a second call writes nothing
    assert (folder / REPORT_NAME).read_text() == "{}"
    out.close()


def test_the_report_names_the_error_of_a_failed_run(tmp_path: Path) -> None:
    out, run = _written(tmp_path)
    out.finish(run, "exception", [], 0, error=ValueError("boom"))
    report = json.loads((tmp_path / "tb" / REPORT_NAME).read_text())
    assert report["run"]["status"] == "exception"
    assert report["run"]["error"] == "ValueError: boom"
    out.close()


def test_no_report_when_turned_off(tmp_path: Path) -> None:
    out = RunOutput(write_report=False, print_summary=False)
    run = FolderRun(nn.Linear(2, 2), [], str(tmp_path / "tb"))
    out.open(run)
    out.finish(run, "completed", [], 0)
    out.close()
    assert not (tmp_path / "tb" / REPORT_NAME).exists()


def test_crash_record_is_json_beside_the_report(tmp_path: Path) -> None:
    out, _ = _written(tmp_path)
    path = out.crash_record({"step": 3, "batch_idx": 1})
    assert path == os.path.join(str(tmp_path / "tb"), CRASH_NAME)
    assert out.crash_path == path
    assert json.loads(Path(path).read_text()) == {"step": 3, "batch_idx": 1}
    out.close()
