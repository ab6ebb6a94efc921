"""An explosion at the very first step (no running level yet) is reported at that step, per layer.

Real Trainers on CPU: a tanh RNN whose recurrent weights have a large gain explodes at step 0
under SGD and under Adam; healthy twins (digits MLP with SGD lr 0.1 and Adam lr 1e-3, a
zero-initialised LoRA-style adapter, a learning-rate warm-up from 0, a small transformer with
AdamW, the same RNN at gain 1) raise nothing.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import DigitsClassifier, digits_loader, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from healthmon import HealthMonitor
from healthmon.numerics.update_size import UpdateSampler, judge_update_sizes


def _sequences(n: int = 256, length: int = 50, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, 8, generator=g)
    y = x[:, -5:, 0].mean(1, keepdim=True)  # a learnable target
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


class RecurrentRegressor(pl.LightningModule):
    """A tanh RNN regressor; ``gain`` multiplies the default recurrent weights."""

    def __init__(self, gain: float, optimizer: str = "sgd", lr: float = 0.01) -> None:
        super().__init__()
        self.rnn = nn.RNN(8, 64, batch_first=True, nonlinearity="tanh")
        self.head = nn.Linear(64, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(gain)
        self.optimizer_name, self.lr = optimizer, lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h, _ = self.rnn(x)
        return F.mse_loss(self.head(h[:, -1]), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _fit(
    tmp_path: Any, model: pl.LightningModule, loader: DataLoader, steps: int, **kwargs: Any
) -> HealthMonitor:
    mon = HealthMonitor(summary=False)
    trainer(tmp_path, [mon], max_steps=steps, tensorboard=False, **kwargs).fit(model, loader)
    return mon


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_rnn_with_a_large_recurrent_gain_is_reported_at_step_0(tmp_path: Any, optimizer: str) -> None:
    model = RecurrentRegressor(gain=10.0, optimizer=optimizer, lr=0.01 if optimizer == "sgd" else 1e-3)
    x, y = next(iter(_sequences()))
    h, _ = model.rnn(x)
    F.mse_loss(model.head(h[:, -1]), y).backward()
    grad_norm = float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()])))
    model.zero_grad()
    assert grad_norm > 1e8  # the premise: an exploded gradient at step 0

    mon = _fit(tmp_path, model, _sequences(), steps=3)
    first = [a for a in mon.alerts if a.code == "grad.explosion"]
    assert first and first[0].step == 0 and first[0].where == "rnn", mon.alerts
    message = first[0].message
    assert "rnn" in message and "gradient norm" in message and "step 0" in message
    assert "gradient_clip_val" in first[0].hint and "recurrent" in first[0].hint
    if optimizer == "sgd":  # the update itself rewrote the layer
        assert "x the layer's weights" in message
    else:  # Adam's update is about lr per entry: the gradient's sensitivity tells
        assert "the gradient exploded" in message


def _no_explosion(mon: HealthMonitor) -> None:
    assert [a for a in mon.alerts if a.code == "grad.explosion"] == [], mon.alerts


def test_healthy_rnn_twin_raises_nothing(tmp_path: Any) -> None:
    _no_explosion(_fit(tmp_path, RecurrentRegressor(gain=1.0), _sequences(), steps=30))


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.1), ("adam", 1e-3)])
def test_digits_mlp_raises_nothing(tmp_path: Any, optimizer: str, lr: float) -> None:
    mon = _fit(tmp_path, DigitsClassifier(lr=lr, optimizer=optimizer), digits_loader(), steps=40)
    assert mon.alerts == []


class LoRAClassifier(DigitsClassifier):
    """A frozen-ish base with a rank-4 adapter whose B starts at zero (LoRA), Adam, lr warm-up."""

    def __init__(self, warmup: int = 0) -> None:
        super().__init__(hidden=(32,), lr=1e-2, optimizer="adam")
        self.down = nn.Linear(64, 4, bias=False)
        self.up = nn.Linear(4, 32, bias=False)
        nn.init.zeros_(self.up.weight)
        self.warmup = warmup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.net[0](x) + self.up(self.down(x)))
        return self.net[2](h)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        if not self.warmup:
            return opt
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / self.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@pytest.mark.parametrize("warmup", [0, 10])
def test_zero_initialised_adapter_and_warmup_raise_nothing(tmp_path: Any, warmup: int) -> None:
    mon = _fit(tmp_path, LoRAClassifier(warmup), digits_loader(), steps=40)
    _no_explosion(mon)


class TinyTransformer(pl.LightningModule):
    """A 2-layer causal transformer LM (LayerNorm, zero biases, embeddings) with AdamW."""

    def __init__(self, vocab: int = 64, d: int = 64, seq: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        inputs = tokens[:, :-1]
        n = inputs.shape[1]
        h = self.blocks(self.embed(inputs) + self.pos[:n], mask=self.mask[:n, :n], is_causal=True)
        return F.cross_entropy(self.head(h).reshape(-1, self.head.out_features), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_small_transformer_with_adamw_raises_nothing(tmp_path: Any) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 64, (256, 1), generator=g)
    tokens = (base + torch.arange(32) * torch.randint(1, 5, (256, 1), generator=g)) % 64
    loader = DataLoader(TensorDataset(tokens), batch_size=16, shuffle=True, generator=g)
    _no_explosion(_fit(tmp_path, TinyTransformer(), loader, steps=25))


# ---- numerics ----------------------------------------------------------------------------------
def test_sampled_update_norms_match_brute_force() -> None:
    torch.manual_seed(1)
    small, large = torch.randn(10, 10), torch.randn(200, 300)
    sampler = UpdateSampler(max_entries=4096)
    sampler.before([small, large])
    before = [small.clone(), large.clone()]
    small.add_(0.1 * torch.randn_like(small))
    large.add_(0.1 * torch.randn_like(large))
    est = sampler.update_norms()
    assert est is not None and sampler.weight_norms is not None
    exact = [float(torch.linalg.vector_norm(a - b)) for a, b in zip((small, large), before, strict=True)]
    assert float(est[0]) == pytest.approx(exact[0], rel=1e-6)  # kept whole: exact
    assert float(est[1]) == pytest.approx(exact[1], rel=0.05)  # 4096 of 60000 entries
    assert float(sampler.weight_norms[1]) == pytest.approx(
        float(torch.linalg.vector_norm(before[1])), rel=1e-6
    )


def test_judge_update_sizes_limits_and_floors() -> None:
    n = 100
    # "big": update 20x its weights; "zero_init": ||w|| = 0, so judged against the RMS floor
    # (1e-2 * sqrt(100) = 0.1): an update of norm 0.05 is no rewrite
    found = judge_update_sizes(
        ["big", "zero_init", "fine"], [20.0, 0.05, 0.01], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [n, n, n], 1.0
    )
    assert [f.layer for f in found] == ["big"] and found[0].rewritten and not found[0].exploded
    assert found[0].update_ratio == pytest.approx(20.0)
    # ... but an update of norm 2 > 10 x 0.1 is
    big_zero = judge_update_sizes(["z"], [2.0], [0.0], [1.0], [n], 1.0)
    assert big_zero and big_zero[0].update_ratio == math.inf
    # sensitivity: ||g|| ||w|| / |loss| above 1e5, whatever the update (Adam-type)
    hot = judge_update_sizes(["rnn"], [0.01], [5.0], [1e6], [n], 2.0)
    assert hot and hot[0].exploded and hot[0].sensitivity == pytest.approx(2.5e6)
    assert judge_update_sizes(["rnn"], [0.01], [5.0], [1e6], [n], None) == []  # loss unknown
    assert judge_update_sizes(["x"], [math.nan], [1.0], [1.0], [n], 1.0) == []  # left to NaN checks


def test_a_learning_rate_too_large_for_an_mlp_says_so(tmp_path: Any) -> None:
    """At lr 10 with SGD momentum on digits (the quickstart's sick run): an ordinary gradient, a huge step."""
    torch.manual_seed(0)
    model = DigitsClassifier(hidden=(64, 64), lr=10.0, momentum=0.9)
    mon = HealthMonitor(summary=False)
    trainer(tmp_path, [mon], max_steps=5).fit(model, digits_loader())
    first = [a for a in mon.alerts if a.code == "grad.explosion"]
    assert first and first[0].step <= 3, mon.alerts  # within the first steps, before any running level
    assert "learning rate is too large" in first[0].message
    assert first[0].hint.startswith("Lower the learning rate") and "recurrent" not in first[0].hint
