"""A CI smoke run: a few dozen steps of your model with HealthMonitor attached.

    python examples/ci/smoke_train.py --logdir runs/ci --steps 60
    healthmon check runs/ci --format github          # exit 1 on warnings/errors
    healthmon report runs/ci --out healthmon_report.html

Replace ``SmokeModel`` and ``data`` with your own LightningModule and a small slice of your data;
the point is to run the real training code for a few steps, not to train to convergence.
Pass ``--lr 10`` to see a failing job.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from healthmon import HealthMonitor


class SmokeModel(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def data(batch_size: int = 64) -> DataLoader:
    digits = load_digits()  # bundled with scikit-learn: no download in CI
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return DataLoader(TensorDataset(x, torch.tensor(digits.target)), batch_size=batch_size, shuffle=True)


def main(argv: Sequence[str] | None = None) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--logdir", default="runs/ci")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        callbacks=[HealthMonitor()],  # warn only: the verdict is `healthmon check`'s exit status
        logger=TensorBoardLogger(args.logdir, name="smoke"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(SmokeModel(args.lr), data())


if __name__ == "__main__":
    main()
