"""Per-step overhead of ``HFHealthCallback`` (default monitors) under the Hugging Face Trainer, on CPU.

A tiny GPT-2 (random init from ``GPT2Config``, no download) is trained on synthetic tokens by the
``Trainer`` with and without the callback, interleaved in one process (each repeat runs both, in
alternating order, so machine noise hits both alike). Prints the ratio of median step times
(steady state) and of mean step times (amortised: periodic checks such as the Hessian estimates
count), each the median over the paired repeats; then healthmon's own time per step, measured
directly in a separate instrumented run: the time inside the callback's per-step events and
forward hooks, and inside the monitors' optimizer step hooks (of which: the driver's points).

    python benchmarks/overhead_hf.py                            # 300 steps x 3 repeats
    python benchmarks/overhead_hf.py --steps 100 --repeats 2    # quick look
    python benchmarks/overhead_hf.py --clock cpu                # thread CPU time (shared machine)

Model: GPT-2 with 2 layers, d_model 64, 2 heads, vocabulary 256, sequences of 64 tokens, batch 8,
AdamW, one torch thread. A script, not a test: numbers belong in notes.
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

import torch
from timing import CLOCKS, Pair, clock_cost, paired_ratios
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from healthmon.integrations.hf import HFHealthCallback

clock: Callable[[], float] = time.perf_counter

#: The callback's per-step Trainer events (the forward hooks are timed apart).
PER_STEP_EVENTS = ("on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_step_end", "on_log")
#: The driver's per-step points.
DRIVER_POINTS = ("batch_start", "before_backward", "before_optimizer_step", "batch_end")


class StepTimer(TrainerCallback):
    """Time between consecutive step begins: the whole iteration, every callback included."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        now = clock()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now
        return control


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Learnable synthetic sequences: arithmetic progressions of tokens modulo the vocabulary."""

    def __init__(self, n: int = 512, seq: int = 64, vocab: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        base = torch.randint(0, vocab, (n, 1), generator=g)
        self.tokens = (base + torch.arange(seq) * torch.randint(1, 7, (n, 1), generator=g)) % vocab

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def timed_callback(spent: list[float], inner: list[float]) -> HFHealthCallback:
    """A default HFHealthCallback adding up, per step, the time inside it (``spent``) and its driver.

    ``inner`` gets the part spent inside the driver's points and the monitors' optimizer hooks:
    ``spent - inner`` is the callback's own (the adapter's) cost.
    """
    callback = HFHealthCallback(summary=False)
    cost = clock_cost(clock)

    def timed(fn: Callable[..., Any], into: list[float], new_step: bool = False) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if new_step:
                spent.append(0.0)
                inner.append(0.0)
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                if into:
                    into[-1] += clock() - start - cost

        return call

    for event in PER_STEP_EVENTS:
        setattr(callback, event, timed(getattr(callback, event), spent, event == "on_step_begin"))
    for hook in ("_before_forward", "_after_forward"):  # registered on the model at train begin
        setattr(callback, hook, timed(getattr(callback, hook), spent))
    for point in DRIVER_POINTS:
        setattr(callback.driver, point, timed(getattr(callback.driver, point), inner))
    for m in callback.driver.monitors:
        if hasattr(m, "_after_step"):  # registered on the optimizer at train begin
            after = m._after_step  # type: ignore[attr-defined]
            m._after_step = timed(timed(after, inner), spent)  # type: ignore[attr-defined]
    return callback


def run(
    steps: int, variant: str, spent: list[float] | None = None, inner: list[float] | None = None
) -> list[float]:
    """Step times of one fit (the first 5 steps, start-up, dropped)."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    timer = StepTimer()
    callbacks: list[Any] = [timer]
    if variant == "healthmon":
        callbacks.append(HFHealthCallback(summary=False))
    elif variant == "healthmon_timed":
        callbacks.append(
            timed_callback(spent if spent is not None else [], inner if inner is not None else [])
        )
    with tempfile.TemporaryDirectory() as root:
        args = TrainingArguments(
            output_dir=root,
            max_steps=steps,
            per_device_train_batch_size=8,
            learning_rate=3e-4,
            logging_steps=50,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
        )
        Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks).train()
    return timer.times[5:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    pairs: list[Pair] = []
    for r in range(args.repeats):
        result: dict[str, tuple[float, float]] = {}
        for variant in ("plain", "healthmon") if r % 2 == 0 else ("healthmon", "plain"):
            times = run(args.steps, variant)
            result[variant] = (statistics.median(times), statistics.fmean(times))
        pairs.append((result["plain"], result["healthmon"]))
    plain_median, plain_mean, steady, amortised = paired_ratios(pairs)
    what = "thread CPU time" if args.clock == "cpu" else "wall time"
    print(
        f"HF Trainer, GPT-2 2x64 (vocab 256, seq 64), batch 8, AdamW: {args.steps} steps x "
        f"{args.repeats} repeats, 1 torch thread, {what}"
    )
    print(f"  plain step: median {1e3 * plain_median:.3f} ms, mean {1e3 * plain_mean:.3f} ms")
    print(f"  callback / plain: steady (median) {steady:.3f}, amortised (mean) {amortised:.3f}")
    spent: list[float] = []
    inner: list[float] = []
    run(args.steps, "healthmon_timed", spent, inner)
    spent, inner = spent[5:], inner[5:]  # as the step times: the first steps include start-up
    own = [s - i for s, i in zip(spent, inner, strict=True)]
    print(
        "  time inside healthmon (one instrumented run): "
        f"median {1e6 * statistics.median(spent):.0f} us a step "
        f"({100 * statistics.median(spent) / plain_median:.1f}% of a plain step), "
        f"mean {1e6 * statistics.fmean(spent):.0f} us; of it the callback's own (outside the "
        f"driver and monitors): median {1e6 * statistics.median(own):.0f} us"
    )


if __name__ == "__main__":
    main()
