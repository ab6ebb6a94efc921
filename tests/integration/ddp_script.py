"""Run by tests/integration/test_ddp.py: a 2-process CPU (gloo) DDP fit with HealthMonitor.

Usage: python ddp_script.py OUT_DIR MODE   (MODE: norms | stop | raise)
Rank r trains on rows [64k + 32r, 64k + 32r + 32) of the global batch k, so the DDP-averaged
gradient equals the gradient of one process on the whole global batch of 64.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import DigitsClassifier, digits

from healthmon import HealthMonitor, NumericalHealthError

GLOBAL_BATCH = 64


def shard(rank: int, world: int) -> DataLoader:
    x, y = digits()
    per = GLOBAL_BATCH // world
    idx = torch.cat(
        [torch.arange(k * GLOBAL_BATCH + rank * per, k * GLOBAL_BATCH + (rank + 1) * per) for k in range(10)]
    )
    return DataLoader(TensorDataset(x[idx], y[idx]), batch_size=per, shuffle=False)


class ShardedClassifier(DigitsClassifier):
    def __init__(self, nan_loss_rank: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_loss_rank = nan_loss_rank

    def train_dataloader(self) -> DataLoader:
        return shard(self.global_rank, self.trainer.world_size)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == self.nan_loss_rank and self.trainer.global_step >= 3:
            loss = loss + torch.tensor(float("nan"))  # NaN loss on this rank only; gradients stay finite
        return loss


def main(out: str, mode: str) -> None:
    torch.manual_seed(0)
    policy = {"norms": "warn", "stop": "stop", "raise": "raise"}[mode]
    mon = HealthMonitor(on_alert=policy, summary=False)
    model = ShardedClassifier(nan_loss_rank=None if mode == "norms" else 1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=8,
        callbacks=[mon],
        logger=pl.loggers.TensorBoardLogger(out, name="ddp"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        use_distributed_sampler=False,
    )
    raised = None
    try:
        trainer.fit(model)
    except NumericalHealthError as exc:
        raised = exc.alert.code
    result = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "alerts": [a.to_dict() for a in mon.alerts],
        "report_path": mon.report_path,
        "raised": raised,
        "weights_finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
    }
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
