"""Lightning: LightningRun read from a real Trainer, and LightningHooks driving a driver through a fit.

The HealthMonitor bundle in full Lightning runs is tests/integration/test_health_monitor.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from engine.runs import PointRecorder
from models import DigitsClassifier, digits_loader, trainer
from pytorch_lightning.callbacks import Callback

from healthmon.alerts import AlertPolicy
from healthmon.engine.driver import Driver
from healthmon.integrations.lightning import LightningHooks, LightningRun, active_scaler
from healthmon.sinks.report import REPORT_NAME


class ReadRun(Callback):
    """Builds a LightningRun at each optimizer step and keeps what it read."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.seen: list[dict[str, Any]] = []
        self.stop_at = stop_at

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        run = LightningRun(trainer, pl_module)
        self.seen.append(
            {
                "step": run.global_step,
                "facts": (run.world_size, run.is_global_zero, run.accumulate_grad_batches),
                "cadence": (run.log_every_n_steps, run.batches_per_epoch, run.total_steps),
                "setup": (run.precision, run.strategy, run.clips_gradients, run.scaler),
                "optimizers": run.optimizers == trainer.optimizers and len(run.optimizers) == 1,
                "ranks": (run.any_rank(True), run.any_rank(False), run.max_over_ranks(5)),
                "device": run.root_device,
                "blocker": run.replay_blocker(),
            }
        )
        if run.global_step == self.stop_at:
            run.request_stop()


def test_lightning_run_reads_the_trainer(tmp_path: Path) -> None:
    reader = ReadRun()
    fit = trainer(tmp_path, [reader], max_steps=3, accumulate_grad_batches=2, gradient_clip_val=1.0)
    fit.log_every_n_steps = 7
    fit.fit(DigitsClassifier(), digits_loader(32, n=256))
    assert [s["step"] for s in reader.seen] == [0, 1, 2]
    first = reader.seen[0]
    assert first["facts"] == (1, True, 2)
    assert first["cadence"] == (7, 8.0, 3.0)
    assert first["setup"] == ("32-true", "SingleDeviceStrategy", True, None)
    assert first["optimizers"]
    assert first["ranks"] == (True, False, 5)
    assert first["device"] == torch.device("cpu")
    assert first["blocker"] is None


def test_before_fit_a_lightning_run_reads_max_steps_and_has_no_optimizers(tmp_path: Path) -> None:
    fit = trainer(tmp_path, [], max_steps=30)
    run = LightningRun(fit, DigitsClassifier())
    assert run.total_steps == 30.0
    assert run.optimizers == []
    assert active_scaler(fit) is None
    run.total_steps = 5  # read from the trainer: setting is ignored
    run.optimizers = [object()]
    assert (run.total_steps, run.optimizers) == (30.0, [])


def test_request_stop_ends_the_fit(tmp_path: Path) -> None:
    reader = ReadRun(stop_at=2)
    fit = trainer(tmp_path, [reader], max_steps=20)
    fit.fit(DigitsClassifier(), digits_loader(32, n=256))
    assert fit.should_stop
    assert fit.global_step == 3  # the step that asked still completes


def test_loss_on_replays_the_training_step_exactly(tmp_path: Path) -> None:
    model = DigitsClassifier()
    fit = trainer(tmp_path, [], max_steps=1)
    fit.fit(model, digits_loader(32, n=64))
    run = LightningRun(fit, model)
    x, y = next(iter(digits_loader(16, n=64, shuffle=False)))
    with run.replay_context():
        replayed = run.loss_on((x, y), 0)
    assert replayed is not None
    assert torch.equal(replayed, F.cross_entropy(model(x), y))


class Hooks(LightningHooks):
    def __init__(self, recorder: PointRecorder) -> None:
        self.driver = Driver([recorder], AlertPolicy(), print_summary=False)

    def attach(self, trainer: pl.Trainer) -> Driver | None:
        return self.driver


def test_lightning_hooks_drive_the_one_hook_sequence(tmp_path: Path) -> None:
    recorder = PointRecorder()
    hooks = Hooks(recorder)
    fit = trainer(tmp_path, [hooks], max_steps=2, accumulate_grad_batches=2)
    fit.fit(DigitsClassifier(), digits_loader(32, n=256))
    micro = ["batch_start", "loss", "batch_end"]
    stepped = ["batch_start", "loss", "optimizer_step@{}", "batch_end"]
    expected = ["setup", "start", *micro, *[c.format(0) for c in stepped], *micro]
    expected += [c.format(1) for c in stepped]
    assert recorder.calls == [*expected, "training_end", "end", "teardown"]
    assert hooks.drives
    report = json.loads(Path(os.path.join(fit.logger.log_dir, REPORT_NAME)).read_text())
    assert report["run"]["status"] == "completed"
    assert report["run"]["global_step"] == 2
