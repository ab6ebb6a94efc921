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


class FollowStep(Callback):
    """One LightningRun for the whole fit (built at setup, as the hooks do), refreshed at each hook."""

    def __init__(self) -> None:
        self.run: LightningRun | None = None
        self.pairs: list[tuple[int, int]] = []

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        self.run = LightningRun(trainer, pl_module)

    def _check(self, trainer: pl.Trainer) -> None:
        assert self.run is not None
        self.run.refresh()
        self.pairs.append((self.run.global_step, trainer.global_step))

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._check(trainer)

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        self._check(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._check(trainer)


class TwoOptimizers(DigitsClassifier):
    """Manual optimization: each batch steps two optimizers (two global steps a batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
            opt.step()

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1),
            torch.optim.SGD(self.net[2].parameters(), lr=0.1),
        ]


def test_the_step_a_lightning_run_reads_is_the_trainers_global_step_at_every_hook(tmp_path: Path) -> None:
    for model, root in ((DigitsClassifier(), "auto"), (TwoOptimizers(), "manual")):
        follow = FollowStep()
        trainer(tmp_path / root, [follow], max_steps=12, accumulate_grad_batches=1).fit(
            model, digits_loader()
        )
        assert follow.pairs and all(a == b for a, b in follow.pairs), follow.pairs
        assert follow.pairs[-1][1] == 12
    # resumed from a checkpoint: the loop's progress is restored in place, the count follows it
    first = trainer(tmp_path / "resume", [], max_steps=5, enable_checkpointing=True)
    first.fit(DigitsClassifier(), digits_loader())
    path = str(tmp_path / "five.ckpt")
    first.save_checkpoint(path)
    follow = FollowStep()
    trainer(tmp_path / "resume", [follow], max_steps=9).fit(
        DigitsClassifier(), digits_loader(), ckpt_path=path
    )
    assert follow.pairs[0] == (5, 5) and all(a == b for a, b in follow.pairs), follow.pairs
