"""Per-step overhead of HealthMonitor (default config) on CPU, one torch thread.

Runs the same training three ways, interleaved in one process so machine noise hits all alike:
plain; with ``HealthMonitor()``; and with Lightning's own ``grad_norm`` utility logged through
``self.log_dict`` every step (the anchor: what users do today). Prints, per model, the ratio of
median step times (steady state) and of mean step times (amortised: periodic checks count),
with a 95% interval of the median: two runs of the same training differ by a few percent (where
their memory lands), so (a) takes 41 paired repeats of healthmon against plain (~4 minutes) and
runs the comparisons in the first 9.

    python benchmarks/overhead.py                     # both models, default sizes
    python benchmarks/overhead.py --models mlp --mlp-steps 300 --repeats 2   # quick look
    python benchmarks/overhead.py --clock cpu         # thread CPU time: robust on a shared machine
    python benchmarks/overhead.py --accelerator gpu   # the same runs on one CUDA GPU

Models: (a) MLP 64-512-512-10 on scikit-learn digits, batch 64, SGD, 1000 steps;
(b) a small transformer language model (4 layers, d_model 256, seq 128, batch 16) on synthetic
tokens. This is a script, not a test: wall-clock numbers belong in notes, never in asserts.

It also prints healthmon's own time per step, measured directly: the time spent inside
HealthMonitor's per-step hooks and its optimizer step hooks (a separate, instrumented run).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import grad_norm
from timing import CLOCKS, clock_cost, median_interval
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from healthmon import HealthMonitor, LogitsCheck
from healthmon.monitors.logits import DEFAULT_EVERY_N_STEPS

#: The Lightning hooks through which HealthMonitor drives its monitors every step.
PER_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
)

clock: Callable[[], float] = time.perf_counter
accelerator = "cpu"


class StepTimer(pl.Callback):
    """Wall time between consecutive batch starts: the whole iteration, every hook included."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = clock()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


class Base(pl.LightningModule):
    def __init__(self, log_grad_norm: bool) -> None:
        super().__init__()
        self.log_grad_norm = log_grad_norm

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.log_grad_norm:
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class MLP(Base):
    def __init__(self, log_grad_norm: bool) -> None:
        super().__init__(log_grad_norm)
        self.net = nn.Sequential(
            nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss


class TinyLM(Base):
    def __init__(
        self, log_grad_norm: bool, vocab: int = 512, d: int = 256, layers: int = 4, seq: int = 128
    ) -> None:
        super().__init__(log_grad_norm)
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        inputs = tokens[:, :-1]
        length = inputs.shape[1]
        h = self.blocks(
            self.embed(inputs) + self.pos[:length], mask=self.mask[:length, :length], is_causal=True
        )
        loss = F.cross_entropy(self.head(h).reshape(-1, self.head.out_features), tokens[:, 1:].reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


def digits_loader(batch: int = 64) -> DataLoader:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    return DataLoader(
        TensorDataset(x, torch.tensor(d.target)), batch_size=batch, shuffle=True, drop_last=True
    )


def token_loader(batch: int = 16, seq: int = 128, vocab: int = 512, n: int = 512) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, vocab, (n, 1), generator=g)
    tokens = (base + torch.arange(seq + 1) * torch.randint(1, 7, (n, 1), generator=g)) % vocab  # learnable
    return DataLoader(TensorDataset(tokens), batch_size=batch, shuffle=True, drop_last=True)


def timed_health_monitor(spent: list[float]) -> HealthMonitor:
    """A default HealthMonitor that adds up, per step in ``spent``, the time spent inside its hooks.

    The hooks timed: the per-step Lightning hooks and the optimizer step hooks of its monitors.
    """
    monitor = HealthMonitor(summary=False)
    cost = clock_cost(clock)

    def timed(fn: Callable[..., Any], new_step: bool = False) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if new_step:
                spent.append(0.0)
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                if spent:
                    spent[-1] += clock() - start - cost

        return call

    for hook in PER_STEP_HOOKS:
        setattr(monitor, hook, timed(getattr(monitor, hook), hook == "on_train_batch_start"))
    for m in monitor.monitors:
        if hasattr(m, "_after_step"):  # registered on the optimizer at fit start
            m._after_step = timed(m._after_step)  # type: ignore[attr-defined]
    return monitor


class FiniteForwardHooks(pl.Callback):
    """The design NonFiniteMonitor avoids: an ``isfinite`` forward hook on every module, every step."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                torch.isfinite(output).all()

        self.handles = [m.register_forward_hook(hook) for m in pl_module.modules()]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self.handles:
            handle.remove()


def extra_callbacks(variant: str) -> list[Any]:
    """The callbacks of the extra variants (none for plain, grad_norm)."""
    if variant == "logits_every_step":  # a LogitsCheck on its own, sampling every step
        return [LogitsCheck(every_n_steps=1)]
    if variant == "forward_hooks_every_step":
        return [FiniteForwardHooks()]
    return []


def run(
    make_model: Callable[[bool], pl.LightningModule],
    loader: DataLoader,
    steps: int,
    variant: str,
    spent: list[float] | None = None,
) -> list[float]:
    torch.manual_seed(0)
    timer = StepTimer()
    callbacks: list[Any] = [timer]
    if variant == "healthmon":
        callbacks.append(HealthMonitor(summary=False))
    elif variant == "healthmon_timed":
        callbacks.append(timed_health_monitor(spent if spent is not None else []))
    else:
        callbacks += extra_callbacks(variant)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            max_steps=steps,
            callbacks=callbacks,
            logger=TensorBoardLogger(root),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(make_model(variant == "grad_norm"), loader)
    return timer.times[5:]  # the first iterations include start-up


def measure(
    name: str,
    make_model: Callable[[bool], pl.LightningModule],
    loader: DataLoader,
    steps: int,
    repeats: int,
    other_repeats: int,
    extras: bool = False,
) -> None:
    others = ["grad_norm"] + (["logits_every_step", "forward_hooks_every_step"] if extras else [])
    variants = ["plain", "healthmon", *others]
    # Paired ratios: each repeat runs its variants back to back, and a variant's ratio is taken
    # against the plain run of the same repeat; the median over repeats cancels slow drift. Two
    # runs of the same training differ by a few percent, whatever the machine does meanwhile
    # (where the run's memory lands; see the README), so the healthmon/plain pair, the figure the
    # budget is about, takes many repeats; the comparisons only the first ``other_repeats``.
    per_run: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
    for r in range(repeats):
        these = variants if r < other_repeats else variants[:2]
        order = these if r % 2 == 0 else list(reversed(these))  # alternate the order too
        for variant in order:
            times = run(make_model, loader, steps, variant)
            low = statistics.quantiles(times, n=10)[0]  # other processes only ever add time
            per_run[variant].append((statistics.median(times), statistics.fmean(times), low))

    def ratios(a: str, b: str, which: int) -> list[float]:
        """Per repeat that ran both (the comparisons ran in the first repeats only)."""
        return [x[which] / y[which] for x, y in zip(per_run[a], per_run[b], strict=False)]

    def ratio(a: str, b: str, which: int) -> float:
        return statistics.median(ratios(a, b, which))

    def spread(a: str, b: str, which: int) -> str:
        """The interquartile range of the paired ratios: how far one repeat is from the next."""
        values = ratios(a, b, which)
        if len(values) < 4:
            return ""
        q1, _, q3 = statistics.quantiles(values, n=4)
        return f"{q1:.3f}-{q3:.3f}"

    def interval(a: str, b: str, which: int) -> str:
        """Where the median ratio lies, with 95% confidence (:func:`timing.median_interval`)."""
        found = median_interval(ratios(a, b, which))
        return "" if found is None else f"{found[0]:.3f}-{found[1]:.3f}"

    plain_med = statistics.median(m for m, _, _ in per_run["plain"])
    plain_mean = statistics.median(m for _, m, _ in per_run["plain"])
    what = "thread CPU time" if clock is time.thread_time else "wall time"
    device = torch.cuda.get_device_name() if accelerator == "gpu" else "CPU"
    print(
        f"\n{name}: {steps} steps x {repeats} interleaved repeats on {device} "
        f"(the comparisons: {min(other_repeats, repeats)}), 1 torch thread, {what}"
    )
    print(f"  plain step: median {1e3 * plain_med:.3f} ms, mean {1e3 * plain_mean:.3f} ms")
    print(
        f"  {'ratio (median of paired runs)':<30} {'steady (median)':>16} {'amortised (mean)':>17}"
        f" {'10th percentile':>16}"
    )
    for label, a, b in (
        ("healthmon / plain", "healthmon", "plain"),
        ("grad_norm / plain (anchor)", "grad_norm", "plain"),
        ("healthmon / grad_norm", "healthmon", "grad_norm"),
    ):
        print(f"  {label:<30} {ratio(a, b, 0):>16.3f} {ratio(a, b, 1):>17.3f} {ratio(a, b, 2):>16.3f}")
    if repeats >= 4:
        print(
            f"  {'healthmon / plain, quartiles':<30} {spread('healthmon', 'plain', 0):>16}"
            f" {spread('healthmon', 'plain', 1):>17} {spread('healthmon', 'plain', 2):>16}"
        )
    if repeats >= 6:
        print(
            f"  {'  95% interval of the median':<30} {interval('healthmon', 'plain', 0):>16}"
            f" {interval('healthmon', 'plain', 1):>17} {interval('healthmon', 'plain', 2):>16}"
        )
    if extras:
        sampled = ratio("logits_every_step", "plain", 0)
        every = DEFAULT_EVERY_N_STEPS.every
        print(f"  LogitsCheck on its own sampling every step / plain: {sampled:.3f} (median); at the default")
        print(f"    schedule (first 3 steps, then every {every}): ~{1 + (sampled - 1) / every:.4f}")
        hooks = ratio("forward_hooks_every_step", "plain", 0)
        print(f"  isfinite forward hooks on every module and step (NonFiniteMonitor avoids): {hooks:.3f}")
    spent: list[float] = []
    run(make_model, loader, steps, "healthmon_timed", spent)
    spent = spent[5:]  # as the step times: the first iterations include start-up
    mean, median = statistics.fmean(spent), statistics.median(spent)
    low = statistics.quantiles(spent, n=10)[0]
    print(
        "  time inside healthmon's hooks (one instrumented run): "
        f"median {1e6 * median:.0f} us a step ({100 * median / plain_med:.1f}% of a plain step), "
        f"mean {1e6 * mean:.0f} us ({100 * mean / plain_mean:.1f}%), 10th percentile {1e6 * low:.0f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="mlp,lm", help="comma-separated: mlp, lm")
    parser.add_argument("--mlp-steps", type=int, default=1000)
    parser.add_argument("--lm-steps", type=int, default=60)
    parser.add_argument("--lm-repeats", type=int, default=3, help="paired repeats of (b): 30 s a run")
    parser.add_argument(
        "--repeats",
        type=int,
        default=41,
        help="paired repeats of (a)'s healthmon/plain (one run differs from the next by ~3%%)",
    )
    parser.add_argument(
        "--other-repeats", type=int, default=9, help="of these, how many also run (a)'s comparisons"
    )
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or this thread's CPU time"
    )
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    args = parser.parse_args()
    global clock, accelerator
    clock = CLOCKS[args.clock]
    accelerator = args.accelerator
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    models = args.models.split(",")
    if "mlp" in models:
        measure(
            "(a) MLP 64-512-512-10, digits, batch 64, SGD",
            MLP,
            digits_loader(),
            args.mlp_steps,
            args.repeats,
            args.other_repeats,
            True,
        )
    if "lm" in models:
        measure(
            "(b) transformer LM 4x256, seq 128, batch 16, AdamW",
            TinyLM,
            token_loader(),
            args.lm_steps,
            args.lm_repeats,
            args.lm_repeats,
        )


if __name__ == "__main__":
    main()
