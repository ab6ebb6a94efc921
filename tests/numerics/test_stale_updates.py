"""Lost updates: which groups ask for updates, sampled weights around a step, the finding."""

from __future__ import annotations

import torch

from healthmon.numerics.precision import dtype_facts
from healthmon.numerics.stale_updates import (
    SCHEDULE_FLOOR,
    StaleSample,
    StaleSampler,
    asks_for_updates,
    learning_rate,
    stale_summary,
)
from healthmon.numerics.underflow import sample_indices


def test_learning_rates_that_ask_for_updates():
    assert learning_rate({}) == 1.0 and learning_rate({"lr": "auto"}) == 1.0
    assert learning_rate({"lr": torch.tensor(0.5)}) == 0.5
    assert not asks_for_updates({"lr": 0.0})
    assert asks_for_updates({"lr": 1e-9})
    assert asks_for_updates({"lr": SCHEDULE_FLOOR * 0.1, "initial_lr": 0.1})
    assert not asks_for_updates({"lr": SCHEDULE_FLOOR * 0.1 * 0.999, "initial_lr": 0.1})


def test_sampler_counts_updates_below_half_an_ulp_exactly():
    w16 = torch.nn.Parameter(torch.ones(300, dtype=torch.bfloat16))
    w32 = torch.nn.Parameter(torch.ones(10))
    frozen = torch.nn.Parameter(torch.ones(4))
    for p in (w16, w32, frozen):
        p.grad = torch.ones_like(p)
    w16.grad[:100] = 0  # not asked to move: not eligible
    lr = dtype_facts(torch.bfloat16).eps / 4  # below half an ulp of 1.0 in bfloat16, not in float32
    opt = torch.optim.SGD([{"params": [w16, w32]}, {"params": [frozen], "lr": 0.0}], lr=lr)
    sampler = StaleSampler(samples=256, seed=0)
    sampler.before(opt, step=7)
    opt.step()
    sample = sampler.after({id(w16): 1, id(w32): 0})
    assert isinstance(sample, StaleSample) and sample.step == 7 and sampler.after({}) is None
    assert sample.layer_index == [1, 0] and sample.dtypes == ["bfloat16", "float32"]
    drawn = sample_indices(300, 256, torch.Generator().manual_seed(0))  # the sampler's draw for w16
    eligible = float((drawn >= 100).sum())
    assert sample.counts[0].tolist() == [eligible, eligible]  # every eligible bfloat16 weight kept its bits
    assert sample.counts[1].tolist() == [0.0, 10.0]  # float32 moved


def test_stale_summary_worst_layer_and_exact_message():
    sample = StaleSample(12, [0, 1, 1, 2], ["float32", "bfloat16", "float16", "bfloat16"])
    counts = torch.tensor([[1.0, 40.0], [30.0, 40.0], [10.0, 10.0], [20.0, 20.0]])
    summary = stale_summary(sample, counts, ["a", "b", "c"], min_samples=32, fraction=0.5)
    assert summary.by_dtype == {"bfloat16": 50 / 60, "float16": 1.0, "float32": 1 / 40}
    assert summary.by_layer == {"a": 1 / 40, "b": 40 / 50, "c": 1.0}
    found = summary.finding  # c is all stale but has too few samples to be judged
    assert found is not None and (found.code, found.where, found.value) == ("update.stale", "b", 0.8)
    assert found.message == (
        "The optimizer step left 80% of the sampled bfloat16/float16 weights of b bit-identical although "
        "their gradient was nonzero (step 12); 1 layer(s) affected."
    )
    assert stale_summary(sample, counts, ["a", "b", "c"], min_samples=32, fraction=0.9).finding is None
