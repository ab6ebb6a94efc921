"""A run stopped and resumed from a checkpoint reports each alert once and continues its trends."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from models import DigitsClassifier, digits_loader, trainer
from pytorch_lightning.callbacks import ModelCheckpoint

from healthmon import HealthMonitor
from healthmon.monitors import GradientNormMonitor
from healthmon.numerics.trends import rule_state


def test_resume_reports_alerts_once_and_continues_trends(tmp_path: Any) -> None:
    torch.manual_seed(0)
    ckpt_dir = str(tmp_path / "ckpt")
    first = HealthMonitor(summary=False)
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=10, save_top_k=-1)
    t1 = trainer(tmp_path / "a", [first, saver], max_steps=20, enable_checkpointing=True)
    t1.fit(DigitsClassifier(lr=10.0), digits_loader(n=640, shuffle=False))
    at_20 = {(a.code, a.where): a.count for a in first.alerts}
    assert at_20, "the lr=10 run must have alerts before the checkpoint"
    initial_loss = first.monitor(GradientNormMonitor).divergence.baseline

    # the uninterrupted reference: the same run to step 30
    torch.manual_seed(0)
    straight = HealthMonitor(summary=False)
    trainer(tmp_path / "b", [straight], max_steps=30).fit(
        DigitsClassifier(lr=10.0), digits_loader(n=640, shuffle=False)
    )

    torch.manual_seed(0)
    resumed = HealthMonitor(summary=False)
    t2 = trainer(tmp_path / "c", [resumed], max_steps=30, enable_checkpointing=True)
    ckpt = os.path.join(ckpt_dir, "epoch=1-step=20.ckpt")  # an epoch boundary: 640 samples / 64
    t2.fit(DigitsClassifier(lr=10.0), digits_loader(n=640, shuffle=False), ckpt_path=ckpt)

    codes = [(a.code, a.where) for a in resumed.alerts]
    assert len(codes) == len(set(codes)), "an alert was reported twice"
    assert set(at_20) <= set(codes)
    for key, count in at_20.items():
        assert dict(zip(codes, [a.count for a in resumed.alerts], strict=True))[key] >= count
    gn, ref = resumed.monitor(GradientNormMonitor), straight.monitor(GradientNormMonitor)
    assert gn.divergence.baseline == initial_loss
    for rule in ("spike", "collapse", "divergence", "opposing"):  # trends continue, not restart
        assert rule_state(getattr(gn, rule)) == rule_state(getattr(ref, rule)), rule
    report = json.loads(Path(resumed.report_path).read_text())
    assert report["run"]["global_step"] == 30
    assert [(a["code"], a["where"]) for a in report["alerts"]] == codes
    # the same alerts (and first steps) as the run that was never interrupted
    assert {(a.code, a.where, a.step) for a in resumed.alerts} == {
        (a.code, a.where, a.step) for a in straight.alerts
    }


def test_resume_takes_the_configuration_of_the_resumed_run(tmp_path: Any) -> None:
    """Checkpoints carry the rules' state; thresholds and window sizes come from the constructor."""
    torch.manual_seed(0)
    ckpt_dir = str(tmp_path / "ckpt")
    first = GradientNormMonitor(spike_factor=10.0, divergence_window=50)
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=20, save_top_k=-1)
    t1 = trainer(
        tmp_path / "a",
        [HealthMonitor(monitors=[first], summary=False), saver],
        max_steps=20,
        enable_checkpointing=True,
    )
    t1.fit(DigitsClassifier(), digits_loader(n=640, shuffle=False))
    saved = list(first.divergence.history)
    assert len(saved) == 20

    second = GradientNormMonitor(spike_factor=3.0, divergence_window=10)
    # load the state, as fit(ckpt_path=...) does, then check it before the run moves on
    second.load_monitor_state(first.monitor_state())
    assert second.spike.factor == 3.0 and second.divergence.window == 10
    assert list(second.divergence.history) == saved[-10:]  # the newest values that fit
    assert second.spike.seen == 20 and second.divergence.baseline == first.divergence.baseline

    torch.manual_seed(0)
    resumed = GradientNormMonitor(spike_factor=3.0, divergence_window=10)
    t2 = trainer(tmp_path / "c", [HealthMonitor(monitors=[resumed], summary=False)], max_steps=30)
    ckpt = os.path.join(ckpt_dir, "epoch=1-step=20.ckpt")
    t2.fit(DigitsClassifier(), digits_loader(n=640, shuffle=False), ckpt_path=ckpt)
    assert resumed.spike.factor == 3.0 and resumed.divergence.window == 10
    assert resumed.divergence.history.maxlen == 10 and len(resumed.divergence.history) == 10
    assert resumed.spike.seen == 30 and resumed.divergence.seen == 30  # the trends continued
    assert resumed.divergence.baseline == first.divergence.baseline
