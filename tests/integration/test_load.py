"""A long, sick run: healthmon's memory stays flat and its event-file output stays bounded."""

from __future__ import annotations

import glob
import os
import tracemalloc
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from models import trainer
from tensorboard.backend.event_processing import event_accumulator as ea
from torch.utils.data import DataLoader, TensorDataset

from healthmon import HealthMonitor

pytestmark = pytest.mark.slow
HEALTHMON_DIR = os.path.dirname(os.path.abspath(__import__("healthmon").__file__))


class Tiny(pl.LightningModule):
    """A 4-4-1 regression whose loss turns NaN every 7th step: a steady stream of alerts."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.global_step % 7 == 3:
            loss = loss + torch.tensor(float("nan"))  # NaN loss, finite gradients
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class HealthmonMemory(pl.Callback):
    """Bytes currently allocated by healthmon's own code, sampled during the run."""

    def __init__(self, at: tuple[int, ...]) -> None:
        self.at, self.bytes = at, {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step in self.at:
            snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, HEALTHMON_DIR + "/*")])
            self.bytes[trainer.global_step] = sum(s.size for s in snap.statistics("filename"))


def test_long_sick_run_keeps_memory_flat_and_output_bounded(tmp_path: Any) -> None:
    x = torch.randn(64, 4)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    memory = HealthmonMemory(at=(500, 1000, 2000))
    mon = HealthMonitor(summary=False)
    tracemalloc.start()
    try:
        t = trainer(tmp_path, [mon, memory], max_steps=2000, log_every_n_steps=50)
        t.fit(Tiny(), loader)
    finally:
        tracemalloc.stop()
    assert set(memory.bytes) == {500, 1000, 2000}
    assert memory.bytes[2000] - memory.bytes[500] < 64 * 1024, memory.bytes  # no growth per step
    nonfinite = next(a for a in mon.alerts if a.code == "loss.nonfinite")
    assert nonfinite.count == len([s for s in range(2000) if s % 7 == 3])  # every occurrence counted...
    acc = ea.EventAccumulator(t.logger.log_dir, size_guidance={ea.TENSORS: 0})
    acc.Reload()
    records = acc.Tensors("healthmon/alert_records/text_summary")
    assert len(records) == len(mon.alerts)  # ...but written once
    assert len(glob.glob(os.path.join(t.logger.log_dir, "events.out.tfevents.*"))) == 1
