"""Cost of one NaN/Inf origin replay (NonFiniteMonitor) on the benchmark models, CPU, one thread.

A replay runs only after a non-finite loss or gradient was seen. It re-runs ``training_step`` under
the op-level tracer (a host synchronisation per traced operation) and, when the forward is finite,
a backward pass with a hook on every autograd node. Printed: the plain step (forward + backward),
a traced forward (a forward origin: the replay stops there), a traced forward + backward (a
backward origin: the worst case), in milliseconds and as multiples of the plain step; and the
per-step cost on healthy steps (one copy of the CPU RNG state at batch start).

    python benchmarks/nonfinite_replay.py

This is a script, not a test: wall-clock numbers belong in notes, never in asserts.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
from overhead import MLP, TinyLM, digits_loader, token_loader

from healthmon.engine.isolation import isolated
from healthmon.numerics.nonfinite import trace_nonfinite


def timed(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, model: Any, batch: Any, repeats: int) -> None:
    def plain() -> None:
        with isolated(model):
            model.training_step(batch, 0).backward()

    def traced(backward: bool) -> Callable[[], None]:
        def run() -> None:
            with isolated(model):
                trace = trace_nonfinite(
                    lambda: model.training_step(batch, 0), module=model, batch=batch, backward=backward
                )
            assert trace.origin is None and not trace.errors, trace

        return run

    base = timed(plain, repeats)
    fwd = timed(traced(False), repeats)
    both = timed(traced(True), repeats)
    ops = trace_nonfinite(
        lambda: model.training_step(batch, 0), module=model, batch=batch, backward=False
    ).ops
    rng = timed(torch.get_rng_state, 200)
    print(
        f"{name}: plain step {base * 1e3:.1f} ms; "
        f"replay (forward origin) {fwd * 1e3:.1f} ms = {fwd / base:.1f}x; "
        f"replay (backward origin) {both * 1e3:.1f} ms = {both / base:.1f}x; {ops} traced ops; "
        f"healthy steps: RNG copy {rng * 1e6:.1f} us = {rng / base:.2%} of a step"
    )


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mlp = MLP(log_grad_norm=False)
    bench("(a) MLP 64-512-512-10, batch 64", mlp, next(iter(digits_loader())), repeats=50)
    lm = TinyLM(log_grad_norm=False)
    bench("(b) transformer LM 4x256, seq 128, batch 16", lm, next(iter(token_loader())), repeats=5)


if __name__ == "__main__":
    main()
