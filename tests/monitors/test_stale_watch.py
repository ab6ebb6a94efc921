"""StaleWatch: a sampled optimizer step handed to the driver, fetched at its next sync, judged exactly.

A bfloat16 layer stepped by a quarter of its machine epsilon keeps every weight (the update is below
half an ulp of 1.0); the float32 layer beside it moves every weight. The sampler itself is
tests/numerics/test_stale_updates.py.
"""

from __future__ import annotations

import torch
from torch import nn

from healthmon.alerts import AlertPolicy
from healthmon.engine.driver import Driver
from healthmon.engine.run import Run
from healthmon.monitors.stale_watch import TAG_STALE_DTYPE, TAG_STALE_LAYER, StaleWatch
from healthmon.numerics.underflow import sample_indices
from healthmon.tags import STALE_FRACTION_DTYPE, STALE_FRACTION_LAYER


def _stepped(watch: StaleWatch) -> Driver:
    """One SGD step of a bfloat16 layer and a float32 layer, sampled by ``watch``."""
    model = nn.Sequential(nn.Linear(4, 40, dtype=torch.bfloat16), nn.Linear(40, 2))
    for p in model.parameters():
        p.data.fill_(1.0)
        p.grad = torch.ones_like(p)
    lr = torch.finfo(torch.bfloat16).eps / 4  # below half an ulp of 1.0 in bfloat16, not in float32
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    driver = Driver([], AlertPolicy(), write_report=False, print_summary=False)
    driver.setup(Run(model, [opt]))
    watch.start()
    watch.sampler.before(opt, step=5)
    opt.step()
    watch.after_step(driver)
    return driver


def _drawn(samples: int, seed: int) -> tuple[int, int]:
    """Distinct weights the sampler draws from the 160 bfloat16 and the 80 float32 weights (biases: all)."""
    g = torch.Generator().manual_seed(seed)
    return len(sample_indices(160, samples, g)), len(sample_indices(80, samples, g))


def test_tags_are_the_stale_families() -> None:
    assert STALE_FRACTION_DTYPE.prefix == TAG_STALE_DTYPE
    assert STALE_FRACTION_LAYER.prefix == TAG_STALE_LAYER


def test_counts_wait_for_the_drivers_sync_then_judge_exactly() -> None:
    watch = StaleWatch(64, 0, min_samples=32, fraction=0.5)
    driver = _stepped(watch)
    assert watch.in_flight
    assert watch.take() is None  # not fetched yet
    driver.stats.flush_deferred()
    assert not watch.in_flight
    fetched = watch.take()
    assert fetched is not None
    assert watch.take() is None  # taken once
    sample, counts = fetched
    assert sample.step == 5
    assert sample.dtypes == ["bfloat16", "bfloat16", "float32", "float32"]
    # [stale, eligible] per tensor: every sampled bfloat16 weight stale, every float32 weight moved
    n16, n32 = _drawn(64, 0)
    assert counts.reshape(-1, 2).tolist() == [[n16, n16], [40.0, 40.0], [0.0, n32], [0.0, 2.0]]
    values, finding = watch.judge(fetched, driver.params.layers)
    assert values == {
        TAG_STALE_DTYPE + "bfloat16": 1.0,
        TAG_STALE_DTYPE + "float32": 0.0,
        TAG_STALE_LAYER + "0": 1.0,
        TAG_STALE_LAYER + "1": 0.0,
    }
    assert finding is not None
    assert (finding.code, finding.where, finding.value) == ("update.stale", "0", 1.0)


def test_a_layer_with_too_few_samples_is_not_judged() -> None:
    eligible = _drawn(64, 0)[0] + 40  # layer 0's samples: drawn weights and every bias
    watch = StaleWatch(64, 0, min_samples=eligible + 1, fraction=0.5)
    driver = _stepped(watch)
    driver.stats.flush_deferred()
    values, finding = watch.judge(watch.take(), driver.params.layers)
    assert values[TAG_STALE_LAYER + "0"] == 1.0
    assert finding is None


def test_end_judges_now_or_when_the_counts_in_flight_arrive() -> None:
    judged: list[str] = []
    idle = StaleWatch(8, 0, min_samples=1, fraction=0.5)
    idle.end(lambda: judged.append("now"))
    assert judged == ["now"]

    watch = StaleWatch(8, 0, min_samples=1, fraction=0.5)
    driver = _stepped(watch)
    watch.end(lambda: judged.append("on arrival"))
    assert judged == ["now"]
    driver.stats.flush_deferred()
    assert judged == ["now", "on arrival"]
    assert watch.fetched is not None

    watch.start()  # a new fit forgets the end
    assert not watch.ended


def test_without_a_driver_or_its_index_nothing_is_deferred() -> None:
    watch = StaleWatch(8, 0, min_samples=1, fraction=0.5)
    watch.after_step(None)
    watch.after_step(Driver([], AlertPolicy()))  # not set up: no parameter index
    assert not watch.in_flight
    assert watch.take() is None
