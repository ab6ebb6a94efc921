"""``isolated()``: everything a replayed ``training_step`` may touch is exactly as before afterwards.

Each piece of state below is changed the way real training steps change it (a draw, an in-place
update, a rebinding, an append); after the context the state must equal a snapshot taken before,
bit for bit. The end-to-end version (a real Trainer, logged metrics) is in
``tests/integration/test_observer_effect.py``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from healthmon.engine.isolation import isolated, replay_blocker


class Stateful(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Dropout(0.5))
        self.register_buffer("ema", torch.zeros(3))
        self.acc = MulticlassAccuracy(num_classes=3)
        self.np_rng = np.random.default_rng(1)
        self.legacy_rng = np.random.RandomState(2)
        self.py_rng = random.Random(3)
        self.torch_rng = torch.Generator().manual_seed(4)
        self.seen = 0
        self.outputs: list[float] = []
        self.by_name: dict[str, int] = {"a": 1}
        self.running = torch.zeros(2)

    def side_effects(self) -> None:
        """What training steps do: draw from every RNG, update metrics, buffers and attributes."""
        x = torch.randn(8, 4) * float(np.random.rand()) * random.random()
        out = self.net(x)
        self.ema = self.ema * 0.9 + out.detach().mean(0)  # rebinds the buffer
        self.acc(out.detach(), torch.randint(0, 3, (8,)))
        self.np_rng.normal()
        self.legacy_rng.rand()
        self.py_rng.random()
        torch.rand(1, generator=self.torch_rng)
        self.seen += 1
        self.outputs.append(float(out.sum()))
        self.by_name["b"] = 2
        self.running.add_(1.0)  # in place
        self.new_attribute = "added"
        self.net.eval()
        for p in self.parameters():
            p.grad = torch.ones_like(p)


def _fingerprint(m: Stateful) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": repr(np.random.get_state()),
        "np_rng": repr(m.np_rng.bit_generator.state),
        "legacy_rng": repr(m.legacy_rng.get_state()),
        "py_rng": m.py_rng.getstate(),
        "torch_rng": m.torch_rng.get_state(),
        "buffers": {k: v.clone() for k, v in m.named_buffers()},
        "acc": {k: v.clone() for k, v in m.acc.metric_state.items()},
        "acc_updates": m.acc._update_count,
        "acc_forward": m.acc._forward_cache,
        "attrs": (m.seen, list(m.outputs), dict(m.by_name), m.running.clone(), hasattr(m, "new_attribute")),
        "modes": [x.training for x in m.modules()],
        "grads": [p.grad for p in m.parameters()],
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_isolated_restores_everything_a_step_touches() -> None:
    m = Stateful()
    m.train()
    m.side_effects()  # a real first step: metric and buffers hold values, grads exist
    ema = m.ema
    before = _fingerprint(m)
    with isolated(m):
        m.side_effects()
        m.side_effects()
        assert not _same(_fingerprint(m), before)  # the replay really changed things
    after = _fingerprint(m)
    for key in before:
        assert _same(after[key], before[key]), key
    assert m.ema is ema  # the buffer registry points at the original tensor again


def test_the_run_continues_as_if_nothing_happened() -> None:
    """Two copies, one with a replay in between: the next real step is identical."""
    torch.manual_seed(0)
    a = Stateful()
    b = Stateful()
    b.load_state_dict(a.state_dict())
    random.seed(5)
    np.random.seed(5)
    a.side_effects()
    a_after = _fingerprint(a)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(0)
    Stateful()  # same RNG consumption as creating a, b above
    Stateful()
    with isolated(b):
        b.side_effects()
    b.side_effects()
    for key in ("buffers", "acc", "attrs", "np_rng", "python", "numpy"):
        assert _same(_fingerprint(b)[key], a_after[key]), key


def test_replay_blocker_names_manual_optimization() -> None:
    m = Stateful()
    assert replay_blocker(m) is None
    m.automatic_optimization = False
    reason = replay_blocker(m)
    assert reason is not None and "manual optimization" in reason


def test_nested_containers_are_restored_by_content() -> None:
    """A replay in the middle of a step appends to lists that already exist inside a dict."""
    module = nn.Linear(2, 2)
    losses: dict[int, list[float]] = {0: [1.0]}
    history: list[dict[str, list[int]]] = [{"seen": [1]}]
    module.losses, module.history = losses, history
    with isolated(module):
        module.losses[0].append(2.0)  # the list of the current step, created before the replay
        module.losses[1] = [3.0]
        module.history[0]["seen"].append(2)
        module.history.append({})
    assert module.losses is losses and module.losses == {0: [1.0]}
    assert module.history is history and module.history == [{"seen": [1]}]
