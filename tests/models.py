"""Small real models and data for the integration tests (scikit-learn's bundled digits, offline)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8x8 digits, standardised, as float32 features and int64 labels."""
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        _DIGITS = (x, torch.tensor(data.target, dtype=torch.int64))
    return _DIGITS


def digits_loader(
    batch_size: int = 64, *, n: int | None = None, shuffle: bool = True, seed: int = 0
) -> DataLoader:
    x, y = digits()
    if n is not None:
        x, y = x[:n], y[:n]
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=g)


class DigitsClassifier(pl.LightningModule):
    """An MLP on digits; knobs for the bugs the tests inject."""

    def __init__(
        self,
        hidden: tuple[int, ...] = (32,),
        *,
        lr: float = 0.1,
        activation: Callable[[], nn.Module] = nn.ReLU,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        softmax_last: bool = False,
        nan_at_step: int | None = None,
        nan_layer: int = 1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 64
        for h in hidden:
            layers += [nn.Linear(width, h), activation()]
            width = h
        layers.append(nn.Linear(width, 10))
        if softmax_last:
            layers.append(nn.Softmax(dim=-1))
        self.net = nn.Sequential(*layers)
        self.lr, self.optimizer_name, self.momentum = lr, optimizer, momentum
        self.nan_at_step, self.nan_layer = nan_at_step, nan_layer
        if nan_at_step is not None:
            self.net[nan_layer].register_forward_hook(self._inject_nan)

    def _inject_nan(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self._trainer is not None and self.trainer.global_step >= self.nan_at_step:
            return output * float("nan")
        return output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def trainer(
    root: Any, callbacks: list[Any], *, max_steps: int = 30, tensorboard: bool = True, **kwargs: Any
) -> pl.Trainer:
    """A quiet CPU Trainer writing TensorBoard logs under ``root``."""
    logger: Any = TensorBoardLogger(str(root), name="run") if tensorboard else False
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": logger,
        "callbacks": callbacks,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
        "default_root_dir": str(root),
    }
    options.update(kwargs)
    return pl.Trainer(**options)
