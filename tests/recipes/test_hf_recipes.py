"""The Hugging Face recipes under the Hugging Face ``Trainer`` with ``HFHealthCallback``.

The models, data, optimizer settings and sick twins are those of ``recipes/test_transformers.py``
(built by its ``build_*`` functions, models from config with random init, nothing downloaded); the
loop is the ``Trainer``'s, with its defaults where the Lightning recipe has no counterpart (clipping
at ``max_grad_norm=1``, no weight decay on biases and norms). A loss the model does not compute
itself (the Llama recipe's z-loss, the twins' hand-written losses) lives in the model's ``forward``
(:class:`LossInForward`), where the Trainer's users put it and where healthmon sees it. Each healthy
recipe raises no warning or error and logs the Trainer's loss as ``healthmon/loss`` at every step;
each sick twin is caught with the code Lightning's twin gives. Skipped without ``transformers`` or
``accelerate``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from recipes.common import LOSS_TAG, describe, logged  # noqa: E402
from recipes.test_transformers import (  # noqa: E402
    HF_RECIPES,
    HFModule,
    build_bert,
    build_llama,
    build_resnet,
    build_vit,
)

from healthmon.integrations.hf import HFHealthCallback  # noqa: E402

CASES = {r.name: r for r in HF_RECIPES}


class Columns(Dataset):
    """Named tensors, one sample a dict (what the Trainer's default collator stacks)."""

    def __init__(self, **columns: torch.Tensor) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


class LossInForward(nn.Module):
    """The recipe's own loss function computed in ``forward``: ``{"loss": loss(model, batch)}``.

    ``batch`` is the tuple the Lightning recipe's loss takes, in the order of ``keys``.
    """

    def __init__(
        self, model: nn.Module, loss: Callable[[nn.Module, Any], torch.Tensor], keys: tuple[str, ...]
    ):
        super().__init__()
        self.model, self.loss, self.keys = model, loss, keys

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        given = {"input_ids": input_ids, "pixel_values": pixel_values, "labels": labels}
        return {"loss": self.loss(self.model, tuple(given[k] for k in self.keys))}


# name -> (build, the dataset's columns, whether the recipe's loss is the model's own when healthy)
RECIPES: dict[str, tuple[Callable[[bool], Any], tuple[str, ...], bool]] = {
    "hf_bert_sequence_classification": (build_bert, ("input_ids", "labels"), True),
    "hf_vit_image_classification": (build_vit, ("pixel_values", "labels"), True),
    "hf_resnet_image_classification": (build_resnet, ("pixel_values", "labels"), True),
    "hf_llama_causal_lm": (build_llama, ("input_ids",), False),
}


class StopWhenCaught(transformers.TrainerCallback):
    """End a sick twin's run once its code is raised (the rest of the run would change nothing)."""

    def __init__(self, health: HFHealthCallback, code: str) -> None:
        self.health, self.code = health, code

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if any(a.code == self.code for a in self.health.alerts):
            control.should_training_stop = True
        return control


def fit(
    root: Any, name: str, *, sick: bool, **overrides: Any
) -> tuple[transformers.Trainer, HFHealthCallback]:
    """Train recipe ``name`` with the Trainer and ``HFHealthCallback``, settings as under Lightning.

    ``overrides`` replace ``TrainingArguments`` settings.
    """
    build, keys, own_loss = RECIPES[name]
    torch.manual_seed(0)
    module, data, options = build(sick)
    assert isinstance(module, HFModule)
    tensors = dict(zip(keys, data.dataset.tensors, strict=True))
    model: nn.Module = module.model
    if sick or not own_loss:
        model = LossInForward(model, module.loss_fn, keys)
    if options.get("precision") == "16-true":  # the ResNet twin: model.half(), no loss scaling
        model = model.half()
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    health = HFHealthCallback(summary=False)
    callbacks: list[Any] = [health]
    if sick:
        callbacks.append(StopWhenCaught(health, CASES[name].code))
    settings: dict[str, Any] = {
        "output_dir": str(root),
        "max_steps": options["max_steps"],
        "per_device_train_batch_size": data.batch_size,
        "learning_rate": module.lr,
        "warmup_steps": module.warmup,
        "lr_scheduler_type": module.schedule,
        "weight_decay": module.weight_decay,
        "adam_beta1": module.betas[0],
        "adam_beta2": module.betas[1],
        "bf16": options.get("precision") == "bf16-mixed",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    args = transformers.TrainingArguments(**{**settings, **overrides})
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Columns(**tensors), callbacks=callbacks
    )
    trainer.train()
    return trainer, health


# ViT under the Trainer's default clipping (max_grad_norm=1.0) is the regression case of the
# sharpness rule's clip factor: its pre-clip gradient norm is 2-16 from step ~30 on, so every step is
# clipped and Adam's second moment is built from clipped gradients c*g. Measured against the
# optimizer's preconditioner, lambda_max(P^-1 H) read 6.9e4 > 1.53e4 at step 64 while the loss fell
# steadily; the rule now compares c * lambda_max(P^-1 H) (c from the probe's gradient norm).
HEALTHY = list(RECIPES)


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_recipe_under_the_hf_trainer(tmp_path: Any, name: str) -> None:
    assert_healthy(*fit(tmp_path, name, sick=False), CASES[name].final_loss)


def test_healthy_vit_without_clipping_is_quiet(tmp_path: Any) -> None:
    """Without clipping the same run is quiet too (no clip factor involved)."""
    name = "hf_vit_image_classification"
    assert_healthy(*fit(tmp_path, name, sick=False, max_grad_norm=0.0), CASES[name].final_loss)


def assert_healthy(trainer: Any, health: HFHealthCallback, final_loss: float | None) -> None:
    """Ran to the end, trained, no warning or error; ``healthmon/loss`` is the Trainer's loss."""
    assert trainer.state.global_step == trainer.args.max_steps, "the recipe stopped early"
    loud = [a for a in health.alerts if a.severity != "info"]
    assert not loud, "false alarm on a healthy recipe:\n" + describe(health.alerts)
    infos = [a for a in health.alerts if a.severity == "info"]
    assert not [a for a in infos if a.code == "monitor.skipped"], describe(infos)
    # healthmon/loss is the Trainer's logged loss (the model's loss) at every step
    expected = {e["step"] - 1: e["loss"] for e in trainer.state.log_history if "loss" in e}
    got = logged(health.log_dir or "", LOSS_TAG)
    assert set(got) == set(expected) == set(range(trainer.args.max_steps))
    wrong = {s: (got[s], v) for s, v in expected.items() if abs(got[s] - v) > 1e-5 * max(abs(v), 1e-6)}
    assert not wrong, f"{LOSS_TAG} is not the Trainer's loss at {len(wrong)} steps: {list(wrong.items())[:5]}"
    losses = [expected[s] for s in sorted(expected)]
    tail = losses[-max(1, len(losses) // 10) :]
    assert final_loss is None or sum(tail) / len(tail) < final_loss, f"the recipe did not train: {tail}"


@pytest.mark.parametrize("name", list(RECIPES))
def test_sick_twin_under_the_hf_trainer_is_caught(tmp_path: Any, name: str) -> None:
    _, health = fit(tmp_path, name, sick=True)
    code = CASES[name].code
    assert any(a.code == code for a in health.alerts), f"not caught as {code}; alerts:\n" + describe(
        health.alerts
    )
