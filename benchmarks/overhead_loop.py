"""Per-step overhead of ``healthmon.watch`` (default monitors) in a plain PyTorch loop, on CPU.

The same hand-written loop runs with and without the watch, interleaved in one process (each
repeat runs both, in alternating order, so machine noise hits both alike). Prints the ratio of
median step times (steady state) and of mean step times (amortised: periodic checks such as the
Hessian estimates count), each the median over the paired repeats.

    python benchmarks/overhead_loop.py                          # MLP, 1000 steps x 5 repeats
    python benchmarks/overhead_loop.py --steps 300 --repeats 2  # quick look
    python benchmarks/overhead_loop.py --clock cpu              # thread CPU time (shared machine)

Model: MLP 64-512-512-10 on scikit-learn digits, batch 64, SGD, one torch thread (the Lightning
benchmark's model (a), benchmarks/overhead.py). A script, not a test: numbers belong in notes.
It also prints healthmon's own time per step, measured directly in a separate instrumented run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from timing import CLOCKS, Pair, clock_cost, paired_ratios
from torch import nn

import healthmon
from healthmon.monitors.bundle import default_monitors


def digits_batches(batch: int = 64) -> Iterator[Any]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    while True:
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i : i + batch]
            yield x[idx], y[idx]


def timed(
    fn: Callable[..., Any], spent: list[float], clock: Callable[[], float], sign: int = 1
) -> Callable[..., Any]:
    """``fn``, adding (``sign=-1``: subtracting) the time inside each call to ``spent[-1]``."""
    cost = clock_cost(clock)

    def call(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            if spent:
                spent[-1] += sign * (clock() - start - cost)

    return call


def run(
    steps: int, watched: bool, clock: Callable[[], float], spent: list[float] | None = None
) -> list[float]:
    """Step times of one loop (the first 5 steps, start-up, dropped).

    With ``spent``: each step's time inside healthmon is appended to it (``hm.step`` less the
    loop's own call of its function (replays inside healthmon count), the gradient check and the
    end of the step, the monitors' optimizer hooks).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def compute_loss(batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    monitors = default_monitors()
    loss_fn: Callable[[Any], Any] = compute_loss
    armed = [False]  # the next call of loss_fn is the loop's own (not a replay inside healthmon)
    if spent is not None:
        subtract = timed(compute_loss, spent, clock, sign=-1)

        def loss_fn(batch: Any) -> torch.Tensor:
            own, armed[0] = armed[0], False
            return subtract(batch) if own else compute_loss(batch)

        for m in monitors:
            if hasattr(m, "_after_step"):  # registered on the optimizer when the watch starts
                m._after_step = timed(m._after_step, spent, clock)  # type: ignore[attr-defined]
    data = digits_batches()
    times: list[float] = []
    with tempfile.TemporaryDirectory() as root:
        hm = (
            healthmon.watch(
                model, optimizer, log_dir=root, summary=False, total_steps=steps, monitors=monitors
            )
            if watched
            else None
        )
        step = hm.step if hm is not None else None
        if hm is not None and spent is not None:
            step = timed(hm.step, spent, clock)
            hm._check = timed(hm._check, spent, clock)  # type: ignore[method-assign]
            hm._end_step = timed(hm._end_step, spent, clock)  # type: ignore[method-assign]
            batch_start = hm.driver.batch_start

            def arm(*args: Any) -> None:  # hm.step calls the loop's function right after it
                batch_start(*args)
                armed[0] = True

            hm.driver.batch_start = arm  # type: ignore[method-assign]
        last = clock()
        for _ in range(steps):
            batch = next(data)
            if spent is not None:
                spent.append(0.0)
            loss = step(loss_fn, batch) if step is not None else compute_loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            now = clock()
            times.append(now - last)
            last = now
        if hm is not None:
            hm.close()
    return times[5:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    clock = CLOCKS[args.clock]
    pairs: list[Pair] = []
    for r in range(args.repeats):
        result: dict[bool, tuple[float, float]] = {}
        for watched in (False, True) if r % 2 == 0 else (True, False):
            times = run(args.steps, watched, clock)
            result[watched] = (statistics.median(times), statistics.fmean(times))
        pairs.append((result[False], result[True]))
    plain_median, _, steady, amortised = paired_ratios(pairs)
    what = "thread CPU time" if args.clock == "cpu" else "wall time"
    print(
        f"plain loop, MLP 64-512-512-10, digits, batch 64, SGD: {args.steps} steps x "
        f"{args.repeats} repeats, {what}"
    )
    print(f"  plain step: median {1e3 * plain_median:.3f} ms")
    print(f"  watch / plain: steady (median) {steady:.3f}, amortised (mean) {amortised:.3f}")
    spent: list[float] = []
    run(args.steps, True, clock, spent)
    spent = spent[5:]  # as the step times: the first steps include start-up
    print(
        "  time inside healthmon (one instrumented run): "
        f"median {1e6 * statistics.median(spent):.0f} us a step "
        f"({100 * statistics.median(spent) / plain_median:.1f}% of a plain step), "
        f"mean {1e6 * statistics.fmean(spent):.0f} us"
    )


if __name__ == "__main__":
    main()
