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
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import healthmon

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


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


def run(steps: int, watched: bool, clock: Callable[[], float]) -> list[float]:
    """Step times of one loop (the first 5 steps, start-up, dropped)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def compute_loss(batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    data = digits_batches()
    times: list[float] = []
    with tempfile.TemporaryDirectory() as root:
        hm = (
            healthmon.watch(model, optimizer, log_dir=root, summary=False, total_steps=steps)
            if watched
            else None
        )
        last = clock()
        for _ in range(steps):
            batch = next(data)
            loss = hm.step(compute_loss, batch) if hm is not None else compute_loss(batch)
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
    pairs: list[tuple[tuple[float, float], tuple[float, float]]] = []
    for r in range(args.repeats):
        result: dict[bool, tuple[float, float]] = {}
        for watched in (False, True) if r % 2 == 0 else (True, False):
            times = run(args.steps, watched, clock)
            result[watched] = (statistics.median(times), statistics.fmean(times))
        pairs.append((result[False], result[True]))
    plain_median = statistics.median(p[0][0] for p in pairs)
    steady = statistics.median(w[0] / p[0] for p, w in pairs)
    amortised = statistics.median(w[1] / p[1] for p, w in pairs)
    what = "thread CPU time" if args.clock == "cpu" else "wall time"
    print(
        f"plain loop, MLP 64-512-512-10, digits, batch 64, SGD: {args.steps} steps x "
        f"{args.repeats} repeats, {what}"
    )
    print(f"  plain step: median {1e3 * plain_median:.3f} ms")
    print(f"  watch / plain: steady (median) {steady:.3f}, amortised (mean) {amortised:.3f}")


if __name__ == "__main__":
    main()
