"""Shared pieces of the recipe matrix: data, the user-loss recorder, the runner and the verdicts.

A recipe is data (:class:`Recipe`): a ``build(sick)`` function that returns the model, the training
data and the Trainer options of one everyday training recipe, either healthy or with one of the
seed's bugs. The tests run each one with ``HealthMonitor()`` attached and nothing else changed,
as a user would, and judge the result with :func:`assert_healthy` / :func:`assert_detects`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from models import digits, trainer  # tests/ is on sys.path (tests/conftest.py)
from tensorboard.backend.event_processing import event_accumulator as ea
from torch.utils.data import DataLoader, TensorDataset

from healthmon import Alert, HealthMonitor
from healthmon.monitors.gradient_norm import optimizer_tag

LOSS_TAG = "healthmon/loss"


# ---- data ------------------------------------------------------------------------------------
def digit_images(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The standardised digits as 1x8x8 images."""
    x, y = digits()
    if n is not None:
        x, y = x[:n], y[:n]
    return x.reshape(-1, 1, 8, 8), y


def loader(*tensors: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=g)


def markov_tokens(n: int, length: int, vocab: int, *, seed: int = 0) -> torch.Tensor:
    """Token sequences from a fixed random Markov chain: each token has two likely successors.

    The structure is learnable (the optimal next-token loss is about 0.9 nats against ln(vocab)
    for a model that knows nothing), so a language model's loss really falls.
    """
    g = torch.Generator().manual_seed(seed)
    successors = torch.stack([torch.randperm(vocab, generator=g)[:2] for _ in range(vocab)])
    seqs = torch.empty(n, length, dtype=torch.int64)
    seqs[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(1, length):
        pick = (torch.rand(n, generator=g) < 0.3).long()  # 70% / 30% between the two successors
        noise = torch.rand(n, generator=g) < 0.05  # and now and then any token
        nxt = successors[seqs[:, t - 1], pick]
        seqs[:, t] = torch.where(noise, torch.randint(vocab, (n,), generator=g), nxt)
    return seqs


# ---- the model side: what the user's training_step returned -------------------------------------
class Recorded(pl.LightningModule):
    """Records every loss the user's code hands to backward, keyed by the optimizer step.

    The loss tag of optimizer k (``healthmon/loss`` for k = 0, ``healthmon/optimizer_k/loss``
    beyond) at step s must equal the mean of the losses recorded for k at s (the mean over
    accumulated micro-batches; one value per optimizer step under manual optimisation, where
    each optimizer step is a global step of its own).
    """

    def __init__(self) -> None:
        super().__init__()
        self.user_losses: dict[int, list[float]] = defaultdict(list)
        self.user_optimizer: dict[int, int] = {}

    def record(self, loss: torch.Tensor, optimizer: int = 0) -> torch.Tensor:
        """Record ``loss`` as the loss that optimizer ``optimizer`` (its index) steps on."""
        if self._trainer is not None:
            step = int(self.trainer.global_step)
            self.user_losses[step].append(float(loss.detach().float()))
            seen = self.user_optimizer.setdefault(step, optimizer)
            assert seen == optimizer, f"two optimizers recorded a loss at step {step}"
        return loss

    def expected_losses(self, optimizer: int | None = None) -> dict[int, float]:
        """The user's loss per optimizer step: of every optimizer, or of optimizer ``optimizer``."""
        return {
            s: sum(v) / len(v)
            for s, v in self.user_losses.items()
            if optimizer is None or self.user_optimizer[s] == optimizer
        }


# ---- recipes as data ---------------------------------------------------------------------------
Build = Callable[[bool], tuple[Recorded, DataLoader, dict[str, Any]]]


@dataclass(frozen=True)
class Recipe:
    """One everyday recipe and its sick twin.

    Attributes:
        name: test id.
        build: ``build(sick)`` -> (model, train loader, Trainer options incl. ``max_steps``).
        guards: what a false alarm on the healthy recipe would mean (the README table).
        bug: the sick twin's bug, in words.
        code: the alert code the sick twin must raise.
        final_loss: the healthy recipe really trains: the mean user loss over its last 10% of
            steps is below this (None where the loss is no measure of progress, as in a GAN).
    """

    name: str
    build: Build
    guards: str
    bug: str
    code: str
    final_loss: float | None


@dataclass
class Run:
    model: Recorded
    monitor: HealthMonitor
    trainer: pl.Trainer

    @property
    def alerts(self) -> list[Alert]:
        return self.monitor.alerts


def run(
    recipe: Recipe,
    root: Any,
    *,
    sick: bool,
    monitor_options: dict[str, Any] | None = None,
    adapt: Callable[[dict[str, Any]], None] | None = None,
) -> Run:
    """Train the recipe with ``HealthMonitor()`` attached and everything else as the user wrote it.

    ``monitor_options`` go to ``HealthMonitor``; ``adapt`` edits the Trainer options in place
    (another accelerator, the logging cadence users leave at Lightning's default).
    """
    torch.manual_seed(0)
    model, data, options = recipe.build(sick)
    if adapt is not None:
        adapt(options)
    monitor = HealthMonitor(summary=False, **(monitor_options or {}))
    t = trainer(root, [monitor], **options)
    t.fit(model, data)
    return Run(model, monitor, t)


def logged(log_dir: str, tag: str) -> dict[int, float]:
    acc = ea.EventAccumulator(log_dir, size_guidance={ea.SCALARS: 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars(tag)}


def describe(alerts: list[Alert]) -> str:
    return "\n".join(
        f"  {a.severity} {a.code} step {a.step} x{a.count} {a.where}: {a.message}" for a in alerts
    )


# ---- verdicts ----------------------------------------------------------------------------------
def assert_trains(result: Run, final_loss: float | None) -> None:
    """The recipe is what it claims: it ran to the end and, where it applies, its loss fell."""
    assert result.trainer.global_step == result.trainer.max_steps, "the recipe stopped early"
    if final_loss is None:
        return
    losses = [v for _, v in sorted(result.model.expected_losses().items())]
    tail = losses[-max(1, len(losses) // 10) :]
    assert sum(tail) / len(tail) < final_loss, f"the recipe did not train: final loss {tail}"


def assert_healthy(result: Run) -> None:
    """No warning or error, and each optimizer's loss tag is the user's loss at its every step."""
    loud = [a for a in result.alerts if a.severity != "info"]
    assert not loud, "false alarm on a healthy recipe:\n" + describe(result.alerts)
    infos = [a for a in result.alerts if a.severity == "info"]
    if infos:
        print("info alerts:\n" + describe(infos))
    assert result.model.user_losses, "the recipe recorded no loss"
    for index in sorted(set(result.model.user_optimizer.values())):
        expected = result.model.expected_losses(index)
        tag = optimizer_tag(LOSS_TAG, index)
        got = logged(result.trainer.logger.log_dir, tag)
        assert set(got) == set(expected), (
            f"{tag} logged at steps {sorted(set(got) ^ set(expected))[:10]} where the user's "
            f"training_step did not step optimizer {index} (or vice versa)"
        )
        wrong = {s: (got[s], v) for s, v in expected.items() if abs(got[s] - v) > 1e-5 * max(abs(v), 1e-6)}
        assert not wrong, (
            f"{tag} is not the user's loss at {len(wrong)} steps, e.g. {list(wrong.items())[:5]}"
        )


def assert_detects(result: Run, code: str) -> None:
    codes = {a.code for a in result.alerts}
    assert code in codes, f"the sick twin was not caught as {code}; alerts:\n" + describe(result.alerts)
