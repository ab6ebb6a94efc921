"""A NaN mid-run under on_alert="stop": stopped before the corrupting step; checkpoints and report intact."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

import torch
from models import DigitsClassifier, digits_loader, trainer
from pytorch_lightning.callbacks import ModelCheckpoint

from healthmon import HealthMonitor


def test_stop_leaves_finite_checkpoints_and_a_valid_report(tmp_path: Any) -> None:
    saver = ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), every_n_train_steps=5, save_top_k=-1, save_last=True
    )
    mon = HealthMonitor(on_alert="stop", summary=False)
    model = DigitsClassifier(nan_at_step=12, nan_layer=0)
    t = trainer(tmp_path, [mon, saver], max_steps=40, enable_checkpointing=True)
    t.fit(model, digits_loader())
    # step 12 was attempted (Lightning counts it) but its update was dropped: the weights are finite
    assert t.global_step == 13
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    checkpoints = glob.glob(str(tmp_path / "ckpt" / "*.ckpt"))
    assert len(checkpoints) >= 3
    for path in checkpoints:
        state = torch.load(path, weights_only=False)["state_dict"]
        assert all(bool(torch.isfinite(v).all()) for v in state.values()), path
    report = json.loads(Path(mon.report_path).read_text())
    assert report["run"]["status"] == "stopped" and report["run"]["global_step"] == 13
    assert {"activation.nonfinite", "loss.nonfinite", "grad.nonfinite"} <= {
        a["code"] for a in report["alerts"]
    }
    assert os.path.exists(os.path.join(os.path.dirname(mon.report_path), "healthmon_crash.json"))
