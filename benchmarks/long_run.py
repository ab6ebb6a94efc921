"""Load: a long run (default 20k steps) of a tiny model with the default HealthMonitor.

Prints healthmon's own allocated memory (tracemalloc, filtered to healthmon's files) and the
process RSS at checkpoints, the event-file size, and the alert counts, so that growth from the
alert history, hooks or buffers would show. A NaN loss every 7th step keeps alerts coming.

    python benchmarks/long_run.py --steps 20000
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import resource
import sys
import tempfile
import tracemalloc
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from integration.test_load import HEALTHMON_DIR, Tiny

from healthmon import HealthMonitor


class Probe(pl.Callback):
    def __init__(self, every: int) -> None:
        self.every, self.rows = every, []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, HEALTHMON_DIR + "/*")])
            ours = sum(s.size for s in snap.statistics("filename"))
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.rows.append((step, ours, rss))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    x = torch.randn(64, 4)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    probe, mon = Probe(max(args.steps // 10, 1)), HealthMonitor(summary=False)
    with tempfile.TemporaryDirectory() as root:
        tracemalloc.start()
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=args.steps,
            callbacks=[mon, probe],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=pl.loggers.TensorBoardLogger(root),
        )
        trainer.fit(Tiny(), loader)
        tracemalloc.stop()
        size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(trainer.logger.log_dir, "events.*")))
    print(f"{'step':>8} {'healthmon bytes':>16} {'max RSS MiB':>12}")
    for step, ours, rss in probe.rows:
        print(f"{step:>8} {ours:>16} {rss:>12.1f}")
    first, last = probe.rows[0], probe.rows[-1]
    print(f"healthmon memory growth {first[0]}->{last[0]}: {last[1] - first[1]} bytes")
    print(f"event files: {size / 1024:.1f} KiB for {args.steps} steps")
    print("alerts:", ", ".join(f"{a.code} x{a.count}" for a in mon.alerts))


if __name__ == "__main__":
    main()
