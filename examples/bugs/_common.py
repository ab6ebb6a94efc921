"""Shared plumbing of the bug examples: digits data, a small classifier, a quiet Trainer.

Each example in this folder is one bug on real data (scikit-learn's bundled 8x8 digits, no
download) and its one-line fix behind ``--fix``. Run one with ``python examples/bugs/<name>.py``;
``main(argv)`` returns the alerts so the tests can run them in-process.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from healthmon import Alert, HealthMonitor
from healthmon.monitors.bundle import default_monitors


def parse(doc: str | None, argv: Sequence[str] | None, *, steps: int) -> argparse.Namespace:
    """The common command line: ``--fix``, ``--steps N``, ``--logdir DIR``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help="apply the one-line fix")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps to train")
    parser.add_argument("--logdir", default=None, help="TensorBoard log dir (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)  # the same initial weights with and without the fix
    return args


def digits(*, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits: standardised features (or raw 0..16 pixel counts) and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    if not raw:
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, torch.tensor(data.target)


def loader(*, batch_size: int = 64, raw: bool = False) -> DataLoader:
    x, y = digits(raw=raw)
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g)


def mlp(*widths: int, activation: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """64 -> widths... -> 10 with ``activation`` between the linear layers."""
    layers: list[nn.Module] = []
    sizes = [64, *widths]
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), activation()]
    layers.append(nn.Linear(sizes[-1], 10))
    return nn.Sequential(*layers)


class Classifier(pl.LightningModule):
    """A digits classifier; the examples override ``loss`` or build a different ``net``."""

    def __init__(self, net: nn.Module | None = None, *, lr: float = 0.1, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = net if net is not None else mlp(32)
        self.lr, self.optimizer_name = lr, optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.optimizer_name == "rmsprop":
            return torch.optim.RMSprop(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def health(*monitors: Any) -> HealthMonitor:
    """``HealthMonitor()`` with the given monitors added (replacing a default of the same kind)."""
    kinds = {type(m) for m in monitors}
    return HealthMonitor(monitors=[m for m in default_monitors() if type(m) not in kinds] + list(monitors))


def fit(
    model: pl.LightningModule,
    data: DataLoader,
    args: argparse.Namespace,
    *,
    monitors: Sequence[Any] = (),
    **trainer_kwargs: Any,
) -> list[Alert]:
    """Train for ``args.steps`` steps with healthmon attached; print and return the alerts."""
    torch.manual_seed(0)
    mon = health(*monitors)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_steps=args.steps,
            accelerator="cpu",
            devices=1,
            callbacks=[mon],
            logger=TensorBoardLogger(args.logdir or tmp, name="bug"),
            log_every_n_steps=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            **trainer_kwargs,
        )
        trainer.fit(model, data)
    codes = sorted({a.code for a in mon.alerts})
    print(f"{'fixed' if args.fix else 'bug'}: {len(mon.alerts)} alert(s): {', '.join(codes) or 'none'}")
    return list(mon.alerts)
