"""The recipe matrix outside Lightning: everyday recipes in a hand-written loop with ``healthmon.watch``.

The models, data and sick twins are the Lightning recipes' (``recipes/cases.py``), built by the same
``build_*`` functions; only the loop is the user's own: ``hm.step`` per micro-batch, ``backward``,
``optimizer.step()``. Each healthy recipe runs as many steps as under Lightning (every rule's
warm-up passes), raises no warning or error, and logs the user's loss as ``healthmon/loss`` at every
step; each sick twin is caught with the code Lightning's twin gives.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from recipes.cases import (
    RECIPES,
    MixupClassifier,
    RingGAN,
    build_cnn,
    build_fp16_scaler,
    build_gan,
    build_lora,
    build_mixup,
)
from recipes.common import LOSS_TAG, describe, logged
from torch.utils.data import DataLoader

import healthmon
from healthmon.integrations.loop import Watch
from healthmon.tags import optimizer_tag

CASES = {r.name: r for r in RECIPES}


@dataclass
class Trained:
    """A watched loop's outcome: the watch, its log folder and the loss the user's code computed."""

    hm: Watch
    log_dir: str
    steps: int
    #: optimizer index -> global step -> the user's micro-batch losses handed to backward
    losses: dict[int, dict[int, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )

    def record(self, loss: torch.Tensor, optimizer: int = 0) -> None:
        self.losses[optimizer][self.hm.global_step].append(float(loss.detach().float()))


def forever(data: DataLoader) -> Iterator[Any]:
    while True:
        yield from data


def watch(model: torch.nn.Module, optimizers: Any, root: Any, steps: int, **kwargs: Any) -> Trained:
    """``healthmon.watch`` as a user writes it, every scalar written (as the Lightning recipes log)."""
    hm = healthmon.watch(
        model,
        optimizers,
        log_dir=str(root),
        total_steps=steps,
        log_every_n_steps=1,
        summary=False,
        **kwargs,
    )
    return Trained(hm, str(root), steps)


def caught(hm: Watch, code: str | None) -> bool:
    """The sick twin stops once its code is raised (the rest of the run would change nothing)."""
    return code is not None and any(a.code == code for a in hm.alerts)


def scheduled(model: Any) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer and the per-step scheduler of the recipe's ``configure_optimizers``."""
    config = model.configure_optimizers()
    if isinstance(config, dict):
        return config["optimizer"], config.get("lr_scheduler", {}).get("scheduler")
    return config, None


# ---- the loops -----------------------------------------------------------------------------------
def plain_loop(build: Callable[[bool], Any], root: Any, *, sick: bool, stop_on: str | None) -> Trained:
    """CNN + BatchNorm (SGD Nesterov + cosine per step), LoRA: ``training_step``'s loss, one optimizer."""
    torch.manual_seed(0)
    model, data, options = build(sick)
    optimizer, schedule = scheduled(model)
    steps = options["max_steps"]
    result = watch(model, optimizer, root, steps)
    with result.hm as hm:
        batches = forever(data)
        for i in range(steps):
            loss = hm.step(functools.partial(model.training_step, batch_idx=i), next(batches))
            result.record(loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if schedule is not None:
                schedule.step()
            if caught(hm, stop_on):
                break
    return result


def fp16_loop(root: Any, *, sick: bool, stop_on: str | None, clip: float = 50.0) -> Trained:
    """fp16 autocast, a real ``GradScaler`` whose first steps overflow, clipping after ``gradients_ready``.

    The loss is summed over the batch (large gradients: clipping at 50 acts in the first steps).
    ``healthmon/grad/norm`` is the norm before clipping: the one ``clip_grad_norm_`` returns.
    """
    torch.manual_seed(0)
    model, data, options = build_fp16_scaler(sick)
    optimizer, _ = scheduled(model)
    scaler = torch.amp.GradScaler("cpu")  # init scale 65536: the first steps overflow and are skipped
    steps = options["max_steps"]
    result = watch(model, optimizer, root, steps, scaler=scaler)
    skipped = 0
    norms: dict[int, float] = {}  # the pre-clip norm clip_grad_norm_ returned, by step
    with result.hm as hm:
        batches = forever(data)
        for i in range(steps):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = hm.step(functools.partial(model.training_step, batch_idx=i), next(batches))
            result.record(loss)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            hm.gradients_ready()
            norms[hm.global_step] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped += scaler.get_scale() < scale
            optimizer.zero_grad()
            if caught(hm, stop_on):
                break
    if not sick:
        assert skipped > 0, "the GradScaler never overflowed: the recipe tests nothing"
        assert any(clip < v < math.inf for v in norms.values()), "clipping never acted"
        ours = logged(str(root), "healthmon/grad/norm")
        finite = {s: v for s, v in norms.items() if math.isfinite(v)}
        assert set(ours) == set(finite)  # the skipped steps log no norm
        assert all(abs(ours[s] - v) <= 1e-5 * v for s, v in finite.items())
    return result


def gan_loop(root: Any, *, sick: bool, stop_on: str | None) -> Trained:
    """Two optimizers per batch, each step a global step of its own, the noise drawn by the loop."""
    torch.manual_seed(0)
    model, data, options = build_gan(sick)
    assert isinstance(model, RingGAN)
    opt_d, opt_g = model.configure_optimizers()
    steps = options["max_steps"]  # optimizer steps: two per batch

    def d_loss(batch: Any) -> torch.Tensor:
        real, z = batch
        fake = model.gen(z).detach()
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        return F.binary_cross_entropy_with_logits(
            model.disc(real), ones
        ) + F.binary_cross_entropy_with_logits(model.disc(fake), zeros)

    def g_loss(batch: Any) -> torch.Tensor:
        real, z = batch
        return F.binary_cross_entropy_with_logits(model.disc(model.gen(z)), torch.ones(len(real), 1))

    result = watch(model, [opt_d, opt_g], root, steps)
    with result.hm as hm:
        batches = forever(data)
        while hm.global_step < steps:
            (real,) = next(batches)
            batch = (real, torch.randn(len(real), 4))
            for index, (fn, opt) in enumerate(((d_loss, opt_d), (g_loss, opt_g))):
                opt.zero_grad()
                loss = hm.step(fn, batch)
                result.record(loss, index)
                loss.backward()
                opt.step()
            if caught(hm, stop_on):
                break
    return result


def mixup_loop(root: Any, *, sick: bool, stop_on: str | None) -> Trained:
    """``np.random`` mixup with soft targets and a torchmetrics accuracy updated in the loss function."""
    torch.manual_seed(0)
    model, data, options = build_mixup(sick)  # seeds np.random
    assert isinstance(model, MixupClassifier)
    optimizer, _ = scheduled(model)
    steps = options["max_steps"]

    def mixup_loss(batch: Any) -> torch.Tensor:
        x, y = batch
        lam = float(np.random.beta(0.4, 0.4))
        perm = torch.from_numpy(np.random.permutation(len(x)))
        targets = F.one_hot(y, 10).float()
        logits = model.net(lam * x + (1 - lam) * x[perm])
        mixed = lam * targets + (1 - lam) * targets[perm]
        if model.naive:  # the twin's bug: log of softmax
            log_p = torch.log(torch.softmax(logits, -1))
        else:
            log_p = F.log_softmax(logits, -1)
        model.accuracy(logits, y)
        return -(mixed * log_p).sum(-1).mean()

    result = watch(model, optimizer, root, steps)
    with result.hm as hm:
        batches = forever(data)
        for _ in range(steps):
            loss = hm.step(mixup_loss, next(batches))
            result.record(loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if caught(hm, stop_on):
                break
    assert float(model.accuracy.compute()) > 0.5 or sick
    return result


Loop = Callable[..., Trained]
LOOPS: dict[str, Loop] = {
    "cnn_batchnorm_sgd_cosine": lambda root, **kw: plain_loop(build_cnn, root, **kw),
    "fp16_gradscaler_overflow": fp16_loop,
    "lora_finetune": lambda root, **kw: plain_loop(build_lora, root, **kw),
    "gan_two_optimizers": gan_loop,
    "mixup_torchmetrics_self_log": mixup_loop,
}


# ---- verdicts ------------------------------------------------------------------------------------
def assert_healthy(result: Trained, final_loss: float | None) -> None:
    """Ran to the end, trained, no warning or error, and each optimizer's loss tag is the user's loss."""
    hm = result.hm
    assert hm.global_step == result.steps, "the recipe stopped early"
    loud = [a for a in hm.alerts if a.severity != "info"]
    assert not loud, "false alarm on a healthy recipe:\n" + describe(hm.alerts)
    infos = [a for a in hm.alerts if a.severity == "info"]
    if infos:
        print("info alerts:\n" + describe(infos))
    # every monitor ran, as under Lightning (where these recipes skip none)
    assert not [a for a in infos if a.code == "monitor.skipped"], describe(infos)
    for index, per_step in result.losses.items():
        expected = {s: sum(v) / len(v) for s, v in per_step.items()}
        tag = optimizer_tag(LOSS_TAG, index)
        got = logged(result.log_dir, tag)
        assert set(got) == set(expected), f"{tag} logged at steps {sorted(set(got) ^ set(expected))[:10]}"
        wrong = {s: (got[s], v) for s, v in expected.items() if abs(got[s] - v) > 1e-5 * max(abs(v), 1e-6)}
        assert not wrong, f"{tag} is not the user's loss at {len(wrong)} steps: {list(wrong.items())[:5]}"
    if final_loss is not None:
        losses = [v for _, v in sorted((s, sum(v) / len(v)) for s, v in result.losses[0].items())]
        tail = losses[-max(1, len(losses) // 10) :]
        assert sum(tail) / len(tail) < final_loss, f"the recipe did not train: final loss {tail}"


@pytest.mark.parametrize("name", list(LOOPS))
def test_healthy_recipe_in_a_plain_loop(tmp_path: Any, name: str) -> None:
    result = LOOPS[name](tmp_path, sick=False, stop_on=None)
    assert_healthy(result, CASES[name].final_loss)


@pytest.mark.parametrize("name", list(LOOPS))
def test_sick_twin_in_a_plain_loop_is_caught(tmp_path: Any, name: str) -> None:
    code = CASES[name].code
    result = LOOPS[name](tmp_path, sick=True, stop_on=code)
    assert caught(result.hm, code), f"not caught as {code}; alerts:\n" + describe(result.hm.alerts)
