"""Quickstart: train a small MLP on scikit-learn's digits with HealthMonitor attached.

    python examples/quickstart.py            # healthy run
    python examples/quickstart.py --lr 10    # a learning rate 100x too high: see the alerts

Writes TensorBoard logs under ./runs, prints healthmon's end-of-fit summary and the command to
view the charts (gradient norm vs loss, per-layer norms, update ratios).
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from healthmon import HealthMonitor


class DigitsMLP(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/accuracy", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    data = load_digits()  # bundled with scikit-learn: no download
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    train, val = random_split(TensorDataset(x, y), [1500, 297], generator=torch.Generator().manual_seed(0))
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=256)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate (try 10 for a sick run)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    train, val = loaders()
    health = HealthMonitor()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[health],
        logger=TensorBoardLogger(args.logdir, name="quickstart"),
        log_every_n_steps=5,
        enable_progress_bar=False,
    )
    trainer.fit(DigitsMLP(args.lr), train, val)
    # HealthMonitor printed its summary and the `tensorboard --logdir ...` line at the end of fit.
    print(f"report: {health.report_path}")
    print(f"CI check: healthmon check {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()
