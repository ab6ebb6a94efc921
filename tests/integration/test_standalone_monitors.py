"""Monitors attached to a Trainer on their own share one driver.

One report with every monitor's alerts, one policy, gradient statistics computed once.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from models import DigitsClassifier, digits_loader, trainer
from pytorch_lightning.callbacks import ModelCheckpoint

from healthmon import HealthMonitor
from healthmon.alerts import AlertPolicy
from healthmon.cli import main as cli
from healthmon.monitors import GradientNormMonitor, GradientUnderflowMonitor, LogitsCheck, NonFiniteMonitor
from healthmon.monitors.base import strictest_policy


def fit(tmp_path: Any, callbacks: list[Any], *, max_steps: int = 20, **kwargs: Any) -> Any:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path, callbacks, max_steps=max_steps, **kwargs)
        t.fit(DigitsClassifier(softmax_last=True), digits_loader(n=640, shuffle=False))
    return t


def report_codes(path: str) -> list[str]:
    return [a["code"] for a in json.loads(Path(path).read_text())["alerts"]]


@pytest.mark.parametrize("logits_first", [True, False], ids=["logits-first", "norms-first"])
def test_softmax_into_cross_entropy_fails_ci_with_two_standalone_monitors(
    tmp_path: Any, logits_first: bool, capsys: Any
) -> None:
    logits, norms = LogitsCheck(), GradientNormMonitor()
    t = fit(tmp_path, [logits, norms] if logits_first else [norms, logits])
    assert logits.driver is norms.driver and [logits.drives, norms.drives].count(True) == 1
    assert logits.report_path == norms.report_path == os.path.join(t.logger.log_dir, "healthmon_report.json")
    assert "logits.probabilities" in report_codes(logits.report_path)
    assert "healthmon/grad/norm" in json.loads(Path(logits.report_path).read_text())["last"]
    assert cli(["check", t.logger.log_dir, "--fail-on", "error"]) == 1
    assert "logits.probabilities" in capsys.readouterr().out


def test_a_standalone_monitor_joins_the_health_monitors_report(tmp_path: Any) -> None:
    bundle = HealthMonitor(monitors=[GradientNormMonitor(), NonFiniteMonitor()], summary=False)
    logits = LogitsCheck()
    t = fit(tmp_path, [bundle, logits])
    assert logits.driver is bundle.driver and not logits.drives
    assert "logits.probabilities" in report_codes(bundle.report_path)
    assert cli(["check", t.logger.log_dir, "--fail-on", "error"]) == 1


def test_shared_statistics_and_the_strictest_policy(tmp_path: Any) -> None:
    monitors = [
        GradientNormMonitor(),
        NonFiniteMonitor(on_alert="stop"),
        GradientUnderflowMonitor(every_n_steps=1),
    ]
    fit(tmp_path, monitors, max_steps=5)
    driver = monitors[0].driver
    assert all(m.driver is driver for m in monitors) and [m.drives for m in monitors] == [True, False, False]
    assert driver.policy == AlertPolicy("stop", "warning")
    assert strictest_policy(
        [AlertPolicy("warn", "info"), AlertPolicy("stop", "error"), AlertPolicy("raise", "error")]
    ) == AlertPolicy("raise", "error")
    assert strictest_policy([AlertPolicy("warn", "error"), AlertPolicy("warn", "info")]) == AlertPolicy(
        "warn", "info"
    )


def test_resume_restores_the_shared_hub_once(tmp_path: Any) -> None:
    ckpt_dir = str(tmp_path / "ckpt")
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=10, save_top_k=-1)
    first = [LogitsCheck(), GradientNormMonitor()]
    fit(tmp_path / "a", [*first, saver], max_steps=10, enable_checkpointing=True)
    before = [(a.code, a.step, a.count) for a in first[0].alerts]
    assert ("logits.probabilities", 0) in [(c, s) for c, s, _ in before]

    resumed = [LogitsCheck(), GradientNormMonitor()]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path / "b", resumed, max_steps=20)
        t.fit(
            DigitsClassifier(softmax_last=True),
            digits_loader(n=640, shuffle=False),
            ckpt_path=os.path.join(ckpt_dir, "epoch=0-step=10.ckpt"),
        )
    after = {(a.code, a.where): a for a in resumed[0].alerts}
    assert len(after) == len(resumed[0].alerts)
    for code, step, count in before:
        match = [a for a in resumed[0].alerts if a.code == code]
        assert len(match) == 1 and match[0].step == step and match[0].count >= count
    assert report_codes(resumed[1].report_path).count("logits.probabilities") == 1
