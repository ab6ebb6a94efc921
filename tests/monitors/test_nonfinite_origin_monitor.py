"""NonFiniteMonitor names the line, the operation and the cause of the first NaN/Inf (real Trainer).

One model per origin kind; each bug sits on a line marked ``# BUG`` and the alert must point at that
exact ``file:LINE`` (the path relative to the working directory, as healthmon prints it).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import digits_loader, trainer
from pytorch_lightning.callbacks import Callback
from torch import nn

from healthmon import HealthMonitor
from healthmon.monitors import NonFiniteMonitor

HERE = os.path.relpath(__file__)


def line_of(marker: str) -> str:
    """``path:LINE`` of the line of this file that ends with ``# BUG: marker``."""
    with open(__file__) as f:
        for i, line in enumerate(f, 1):
            if line.rstrip().endswith(f"# BUG: {marker}"):
                return f"{HERE}:{i}"
    raise AssertionError(marker)


class Base(pl.LightningModule):
    """A digits MLP whose ``loss`` the subclasses write by hand (with a bug)."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss(self(x), y, x)

    def loss(self, z: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z, y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class LogOfSoftmax(Base):
    def loss(self, z: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        p = F.softmax(z * 100, dim=1)
        return F.nll_loss(torch.log(p), y)  # BUG: log_softmax


class NaiveAttention(Base):
    """Self-attention over the 8 rows of each digit image, softmax written with a plain exp."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(8, 16)
        self.head = nn.Linear(64 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.view(-1, 8, 8) * 8
        q = self.qk(rows)
        scores = q @ q.transpose(1, 2)
        w = torch.exp(scores)  # BUG: exp
        attn = w / w.sum(-1, keepdim=True)
        return self.head(torch.cat([(attn @ rows).flatten(1), rows.flatten(1)], 1))


class Standardize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0)) / x.std(0)  # BUG: std


class StdOfConstantFeature(Base):
    def __init__(self) -> None:
        super().__init__()
        self.norm = Standardize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, :-1], torch.ones_like(x[:, :1])], 1)  # the last feature is constant
        return self.net(self.norm(x))


class SqrtOfNegativeVariance(Base):
    def loss(self, z: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = z + 1000.0  # a large mean: E[h^2] - E[h]^2 cancels catastrophically
        var = (h**2).mean(0) - h.mean(0) ** 2
        return F.cross_entropy(z, y) + 1e-3 * torch.sqrt(var).mean()  # BUG: sqrt


class HandWrittenBCE(Base):
    def loss(self, z: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(z[:, 0] * 100)
        t = (y == 0).float()
        return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()  # BUG: bce


class DistanceToCentre(Base):
    """A centre loss: the first sample is the centre, its distance to itself is exactly 0."""

    def loss(self, z: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        c = z[0].detach()
        d = torch.sqrt(((z - c) ** 2).sum(-1))  # BUG: distance
        return F.cross_entropy(z, y) + 0.01 * d.mean()


class WhereTrap(Base):
    def loss(self, z: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.net[0](x)
        r = torch.where(h > 0, torch.sqrt(h), 0.0)  # BUG: where
        return F.cross_entropy(z, y) + 0.01 * r.mean()


def fit(model: pl.LightningModule, tmp_path: Any, steps: int = 2, **kwargs: Any) -> HealthMonitor:
    mon = HealthMonitor(monitors=[NonFiniteMonitor()], on_alert="stop", summary=False)
    trainer(tmp_path, [mon], max_steps=steps, **kwargs).fit(model, digits_loader())
    return mon


def origin(mon: HealthMonitor, code: str) -> Any:
    found = [a for a in mon.alerts if a.code == code]
    assert len(found) == 1, [a.line() for a in mon.alerts]
    return found[0]


def test_log_of_softmax_in_training_step(tmp_path: Any) -> None:
    a = origin(fit(LogOfSoftmax(), tmp_path), "activation.nonfinite")
    assert a.where == line_of("log_softmax")
    assert "`torch.log`" in a.message and "exact zero(s) gives -inf" in a.message
    assert "comes from softmax" in a.message and "F.log_softmax" in a.hint


def test_naive_exp_attention_overflow(tmp_path: Any) -> None:
    mon = fit(NaiveAttention(), tmp_path)
    a = origin(mon, "activation.nonfinite")
    assert a.where == line_of("exp")
    assert "exp overflows to +inf: the largest input is" in a.message and "88.72" in a.message
    assert "(in NaiveAttention.forward)" in a.message and "subtract the max first" in a.hint
    assert "batch" not in a.message  # the batch is clean and not blamed


def test_division_by_the_std_of_a_constant_feature(tmp_path: Any) -> None:
    a = origin(fit(StdOfConstantFeature(), tmp_path), "activation.nonfinite")
    assert a.where == line_of("std")
    assert "division by exact zero" in a.message and "0/0 = NaN" in a.message
    assert "comes from std" in a.message and "constant" in a.message
    assert "(in norm (Standardize))" in a.message and "eps" in a.hint


def test_sqrt_of_a_negative_variance(tmp_path: Any) -> None:
    a = origin(fit(SqrtOfNegativeVariance(), tmp_path), "activation.nonfinite")
    assert a.where == line_of("sqrt")
    assert "sqrt of" in a.message and "negative value(s)" in a.message and "E[x^2] - E[x]^2" in a.message
    assert "clamp_min(0)" in a.hint


def test_log_of_zero_in_a_hand_written_bce(tmp_path: Any) -> None:
    a = origin(fit(HandWrittenBCE(), tmp_path), "activation.nonfinite")
    assert a.where == line_of("bce")
    assert "exact zero(s) gives -inf" in a.message and "from sigmoid at" in a.message
    assert "logsigmoid" in a.hint or "with_logits" in a.hint


def test_backward_of_sqrt_at_zero_in_a_distance(tmp_path: Any) -> None:
    mon = fit(DistanceToCentre(), tmp_path)
    assert "loss.nonfinite" not in {a.code for a in mon.alerts}  # the forward is finite
    assert "activation.nonfinite" not in {a.code for a in mon.alerts}
    a = origin(mon, "grad.nonfinite")
    assert a.where == line_of("distance")
    assert "The forward pass is finite" in a.message and "backward of `torch.sqrt`" in a.message
    assert "infinite at the 1 entries where x is exactly 0" in a.message
    assert "net.2.weight" in a.message and "vector_norm" in a.hint


def test_backward_of_the_torch_where_trap(tmp_path: Any) -> None:
    mon = fit(WhereTrap(), tmp_path)
    a = origin(mon, "grad.nonfinite")
    assert a.where == line_of("where")
    assert "backward of `torch.sqrt`" in a.message and "0 * inf = NaN" in a.message
    assert "safe-where" in a.hint
    assert "activation.nonfinite" not in {a.code for a in mon.alerts}  # the discarded NaN is no origin


class CausalLM(pl.LightningModule):
    """A tiny causal attention model with -inf masks (buffer, masked_fill and padding): healthy."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.out = nn.Linear(16, 10)
        self.register_buffer("causal", torch.full((8, 8), float("-inf")).triu(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.emb(x.view(-1, 8, 8))
        scores = h @ h.transpose(1, 2) / 4 + self.causal  # additive causal mask (a buffer)
        pad = torch.zeros(x.shape[0], 8, dtype=torch.bool)
        pad[:, 6:] = True  # the last two rows are padding
        scores = scores.masked_fill(pad[:, None, :], float("-inf"))
        scores = scores.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
        h = torch.softmax(scores, -1) @ h
        return F.cross_entropy(self.out(h.mean(1)), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_causal_and_padding_masks_raise_nothing(tmp_path: Any) -> None:
    mon = HealthMonitor(on_alert="raise", summary=False)
    trainer(tmp_path, [mon], max_steps=20).fit(CausalLM(), digits_loader())
    assert not [a for a in mon.alerts if a.severity != "info"], [a.line() for a in mon.alerts]


class MaskedThenOverflow(CausalLM):
    """The same masks, then a real bug: a hand-written softmax whose exp overflows."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.emb(x.view(-1, 8, 8))
        scores = (h @ h.transpose(1, 2)) * 50 + self.causal
        w = torch.exp(scores)  # BUG: masked_exp
        h = (w / w.sum(-1, keepdim=True)) @ h
        return F.cross_entropy(self.out(h.mean(1)), y)


def test_a_mask_is_never_named_when_a_real_bug_follows_it(tmp_path: Any) -> None:
    a = origin(fit(MaskedThenOverflow(), tmp_path), "activation.nonfinite")
    assert a.where == line_of("masked_exp") and "exp overflows" in a.message


class Fp16Adam(pl.LightningModule):
    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.eps = eps

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3, eps=self.eps)


def test_float16_adam_default_eps_names_the_optimizer_step(tmp_path: Any) -> None:
    mon = HealthMonitor(monitors=[NonFiniteMonitor()], on_alert="stop", summary=False)
    t = trainer(tmp_path, [mon], max_steps=20, precision="16-true")
    t.fit(Fp16Adam(), digits_loader())
    a = origin(mon, "update.nonfinite")
    assert a.where == "Adam param group 0" and a.step == 1
    assert (
        "The optimizer step of step 0 wrote NaN/Inf into the weights although its gradients were finite"
        in (a.message)
    )
    assert "eps=1e-08 rounds to 0 in float16" in a.message and "5.96e-08" in a.message
    assert "second-moment entr" in a.message and "float32 master weights" in a.hint


def test_float16_adam_with_a_representable_eps_is_healthy(tmp_path: Any) -> None:
    mon = HealthMonitor(monitors=[NonFiniteMonitor()], on_alert="stop", summary=False)
    trainer(tmp_path, [mon], max_steps=20, precision="16-true").fit(Fp16Adam(eps=1e-4), digits_loader())
    assert not mon.alerts, [a.line() for a in mon.alerts]


class EveryStepDistance(DistanceToCentre):
    """The same bug at every step, with the gradients sanitised after healthmon saw them.

    The weights stay finite.
    """

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        for p in self.parameters():
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)


def test_a_repeated_failure_is_counted_without_a_new_replay(tmp_path: Any) -> None:
    nf = NonFiniteMonitor()
    mon = HealthMonitor(monitors=[nf], summary=False)  # warn: the run goes on with NaN gradients
    trainer(tmp_path, [mon], max_steps=4).fit(EveryStepDistance(), digits_loader())
    a = origin(mon, "grad.nonfinite")
    assert a.where == line_of("distance") and a.count == 4
    assert nf.replays == 1


class NoisyLoss(Base):
    """A random penalty that is log(0) on some steps only: the replay must draw the same numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)
        )

    def loss(self, z: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        u = torch.rand(())
        gate = (u > 0.7).float()  # 1 on about 30% of the steps
        return F.cross_entropy(z, y) - 0.01 * torch.log(1.0 - gate)  # BUG: noisy

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        for p in self.parameters():
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)


def test_the_replay_draws_the_same_random_numbers_and_leaves_the_run_unchanged(tmp_path: Any) -> None:
    def run(callbacks: list[Any], root: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(7)
        model = NoisyLoss()
        trainer(root, callbacks, max_steps=12).fit(model, digits_loader())
        return [p.detach().clone() for p in model.parameters()], [b.clone() for b in model.buffers()]

    nf = NonFiniteMonitor(max_replays=12)
    watched = run([HealthMonitor(monitors=[nf], summary=False)], tmp_path / "watched")
    plain = run([], tmp_path / "plain")
    assert all(torch.equal(a, b) for a, b in zip(plain[0] + plain[1], watched[0] + watched[1], strict=True))
    alerts = [x for x in nf.alerts if x.code == "activation.nonfinite"]
    assert alerts and alerts[0].where == line_of("noisy") and "log of 1 exact zero(s)" in alerts[0].message
    assert nf.replays == 1  # found at the first failing step: the same draw was replayed
    assert not nf.last_trace.errors


class BadFirstMicroBatch(Base):
    """With accumulation over 3 micro-batches, only the first micro-batch of step 1 divides by zero."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        count = (y >= 0).sum() * float(batch_idx != 3)  # batch 3 is the first micro-batch of step 1
        return F.cross_entropy(self(x), y, reduction="sum") / count  # BUG: micro


def test_accumulation_replays_the_micro_batch_that_broke(tmp_path: Any) -> None:
    mon = fit(BadFirstMicroBatch(), tmp_path, steps=3, accumulate_grad_batches=3)
    a = origin(mon, "activation.nonfinite")
    assert a.where == line_of("micro") and a.step == 1 and "division by exact zero" in a.message


class DrawsFrom(Base):
    """Draws a random number in its training step from ``start`` on (an augmentation switched on)."""

    def __init__(self, start: int | None) -> None:
        super().__init__()
        self.start = start

    def loss(self, z: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.start is not None and self.global_step >= self.start:
            z = z + 0.0 * torch.rand(())
        return F.cross_entropy(z, y)


@pytest.mark.parametrize("start", [None, 0, 20])
def test_rng_states_are_copied_only_for_steps_that_draw_random_numbers(
    tmp_path: Any, start: int | None
) -> None:
    """A step that draws nothing replays exactly without its RNG state: it costs no copy."""
    nf = NonFiniteMonitor()
    seen: list[tuple[int, bool]] = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            seen.append((trainer.global_step - 1, nf._draws_random))

    trainer(tmp_path, [HealthMonitor(monitors=[nf], summary=False), Watch()], max_steps=40).fit(
        DrawsFrom(start), digits_loader()
    )
    draws = dict(seen)
    if start is None:
        assert not any(draws.values())  # checked at step 0 and every 16th step: never draws
    elif start == 0:
        assert all(draws.values())
    else:  # noticed at the first recheck (every 16 steps) after the draws begin
        assert not draws[19] and not draws[31] and draws[32] and draws[39]
