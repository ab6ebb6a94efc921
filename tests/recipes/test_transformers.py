"""Hugging Face ``transformers`` models built from config with random init (no download).

GPT-2, BERT, ViT, ResNet, ConvNeXt, MobileNetV2 and Llama at tiny sizes, trained the way their model
cards do (AdamW with the library's warm-up schedules, or SGD momentum for MobileNetV2; the loss the
model computes itself). Skipped only where
``transformers`` is not installed; ``make test`` installs it (the ``recipes`` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from recipes.common import (
    Recipe,
    Recorded,
    assert_detects,
    assert_healthy,
    assert_trains,
    digit_images,
    loader,
    markov_tokens,
    run,
)
from torch import nn
from torch.utils.data import DataLoader

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 32, 24


class HFModule(Recorded):
    """A Hugging Face model, its loss (from a batch) and AdamW with a warm-up schedule."""

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[nn.Module, Any], torch.Tensor],
        *,
        lr: float,
        warmup: int,
        total: int,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        schedule: str = "linear",
    ) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss
        self.lr, self.warmup, self.total, self.weight_decay = lr, warmup, total, weight_decay
        self.betas, self.schedule = betas, schedule

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.record(self.loss_fn(self.model, batch))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(
            self.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )
        with_warmup = {
            "linear": transformers.get_linear_schedule_with_warmup,
            "cosine": transformers.get_cosine_schedule_with_warmup,
        }[self.schedule]
        schedule = with_warmup(opt, self.warmup, self.total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# ---- GPT-2: causal LM, the model's own loss ------------------------------------------------------
def gpt2_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    (tokens,) = batch
    return model(input_ids=tokens, labels=tokens).loss


def build_gpt2(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    steps = 200
    module = HFModule(model, gpt2_loss, lr=3e-3, warmup=20, total=steps)
    options: dict[str, Any] = {"max_steps": steps}
    if sick:  # the bug: pure fp16 weights and gradients, no loss scaling (seen at step 0)
        options.update(precision="16-true", max_steps=30)
    return module, loader(markov_tokens(2048, LENGTH, VOCAB), batch_size=16), options


# ---- BERT: sequence classification (which of two Markov chains wrote the sequence) ----------------
def bert_loss(softmax_first: bool) -> Callable[[nn.Module, Any], torch.Tensor]:
    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        tokens, labels = batch
        if not softmax_first:
            return model(input_ids=tokens, labels=labels).loss
        probs = torch.softmax(model(input_ids=tokens).logits, -1)  # the bug: probabilities into cross_entropy
        return F.cross_entropy(probs, labels)

    return loss


def build_bert(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(config)
    tokens = torch.cat(
        [markov_tokens(1024, LENGTH, VOCAB, seed=0), markov_tokens(1024, LENGTH, VOCAB, seed=1)]
    )
    labels = torch.cat([torch.zeros(1024, dtype=torch.int64), torch.ones(1024, dtype=torch.int64)])
    steps = 200
    module = HFModule(model, bert_loss(softmax_first=sick), lr=1e-3, warmup=20, total=steps)
    return module, loader(tokens, labels, batch_size=32), {"max_steps": steps}


# ---- ViT and ResNet: digit images, the model's own classification loss ----------------------------
def image_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return model(pixel_values=x, labels=y).loss


def smoothed_loss_naive(model: nn.Module, batch: Any) -> torch.Tensor:
    """Label smoothing written by hand with the bug: log of softmax instead of log_softmax."""
    x, y = batch
    logits = model(pixel_values=x).logits
    targets = F.one_hot(y, 10).float() * 0.9 + 0.01
    return -(targets * torch.log(torch.softmax(logits, -1))).sum(-1).mean()


def build_vit(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    model = transformers.ViTForImageClassification(config)
    steps = 250
    loss = smoothed_loss_naive if sick else image_loss
    module = HFModule(model, loss, lr=3e-3, warmup=25, total=steps, weight_decay=0.05)
    x, y = digit_images()
    return module, loader(x, y, batch_size=64), {"max_steps": steps}


def build_resnet(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    config = transformers.ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=10,
    )
    model = transformers.ResNetForImageClassification(config)
    steps = 250
    module = HFModule(model, image_loss, lr=3e-3, warmup=25, total=steps)
    options: dict[str, Any] = {"max_steps": steps}
    if sick:  # the bug: model.half() training: fp16 weights, AdamW's eps 1e-8 rounds to 0, NaN at step 1
        options.update(precision="16-true", max_steps=30)
    x, y = digit_images()
    return module, loader(x, y, batch_size=64), options


# ---- ConvNeXt: depthwise 7x7 convs, LayerNorm, GELU, layer scale 1e-6 on every residual branch ----
def with_nan_image(x: torch.Tensor) -> torch.Tensor:
    """The bug: one corrupt image (NaN pixels, as a failed decode or a 0/0 normalisation leaves)."""
    x = x.clone()
    x[100, :, 2:4, 2:4] = float("nan")
    return x


def build_convnext(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    config = transformers.ConvNextConfig(
        num_channels=1,
        image_size=8,
        patch_size=2,  # 4x4 after the stem, 2x2 after the second stage's downsampling
        num_stages=2,
        hidden_sizes=[16, 32],
        depths=[2, 2],
        drop_path_rate=0.1,
        num_labels=10,
    )
    model = transformers.ConvNextForImageClassification(config)
    steps = 250
    module = HFModule(
        model, image_loss, lr=4e-3, warmup=25, total=steps, weight_decay=0.05, schedule="cosine"
    )
    x, y = digit_images()
    if sick:
        x = with_nan_image(x)
    return module, loader(x, y, batch_size=64), {"max_steps": steps}


# ---- MobileNetV2: inverted residuals, ReLU6, BatchNorm; SGD momentum + cosine ---------------------
class SGDModule(HFModule):
    """The MobileNet recipe: SGD with Nesterov momentum, weight decay 4e-5, a cosine schedule."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=self.weight_decay
        )
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def softmax_then_cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    probs = model(pixel_values=x).logits.softmax(-1)  # the bug: probabilities into cross_entropy
    return F.cross_entropy(probs, y)


def build_mobilenet_v2(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    config = transformers.MobileNetV2Config(
        num_channels=1,
        image_size=8,
        depth_multiplier=0.25,
        finegrained_output=False,
        classifier_dropout_prob=0.2,
        num_labels=10,
    )
    model = transformers.MobileNetV2ForImageClassification(config)
    steps = 250
    loss = softmax_then_cross_entropy if sick else image_loss
    module = SGDModule(model, loss, lr=0.01, warmup=0, total=steps, weight_decay=4e-5)
    x, y = digit_images()
    return module, loader(x, y, batch_size=64), {"max_steps": steps}


# ---- Llama: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention -------------------------
def lm_loss_with_z_loss(naive: bool) -> Callable[[nn.Module, Any], torch.Tensor]:
    """The model's own next-token loss plus PaLM's z-loss, 1e-4 * logsumexp(logits)^2."""

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        (tokens,) = batch
        out = model(input_ids=tokens, labels=tokens)
        if naive:  # the bug: log(sum(exp(z))) written out, without subtracting the max
            log_z = torch.log(torch.exp(out.logits).sum(-1))
        else:
            log_z = torch.logsumexp(out.logits, -1)
        return out.loss + 1e-4 * log_z.pow(2).mean()

    return loss


def build_llama(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config)
    steps = 200
    module = HFModule(
        model,
        lm_loss_with_z_loss(naive=sick),
        lr=3e-3,
        warmup=20,
        total=steps,
        weight_decay=0.1,
        betas=(0.9, 0.95),
        schedule="cosine",
    )
    options = {"max_steps": steps, "precision": "bf16-mixed", "gradient_clip_val": 1.0}
    return module, loader(markov_tokens(2048, LENGTH, VOCAB), batch_size=16), options


HF_RECIPES = [
    Recipe(
        "hf_gpt2_causal_lm",
        build_gpt2,
        guards="GPT-2 from config, the model's own loss, AdamW + `get_linear_schedule_with_warmup` (lr 0 at "
        "step 0 and decaying to 0)",
        bug="pure fp16 (`precision='16-true'`), no loss scaling",
        code="grad.underflow",
        final_loss=1.5,
    ),
    Recipe(
        "hf_bert_sequence_classification",
        build_bert,
        guards="BERT from config, sequence classification with the model's own loss, AdamW + warm-up",
        bug="`torch.softmax` on the logits before `F.cross_entropy`",
        code="logits.probabilities",
        final_loss=0.2,
    ),
    Recipe(
        "hf_vit_image_classification",
        build_vit,
        guards="ViT from config (patch 2 on 8x8 digits), the model's own loss, AdamW + warm-up",
        bug="hand-written label smoothing with `torch.log(torch.softmax(z))`",
        code="logits.naive_log_softmax",
        final_loss=0.5,
    ),
    Recipe(
        "hf_resnet_image_classification",
        build_resnet,
        guards="ResNet from config (BatchNorm, residual blocks), the model's own loss, AdamW + warm-up, "
        "a 5-sample last batch each epoch",
        bug="pure fp16 (`precision='16-true'`): AdamW's eps rounds to 0, NaN from step 1",
        code="loss.nonfinite",
        final_loss=0.5,
    ),
    Recipe(
        "hf_convnext_image_classification",
        build_convnext,
        guards="ConvNeXt from config (depthwise 7x7 convs, LayerNorm, GELU, layer scale 1e-6, stochastic "
        "depth 0.1), the model's own loss, AdamW + cosine warm-up, weight decay 0.05",
        bug="one image of the data set has NaN pixels",
        code="batch.nonfinite",
        final_loss=0.5,
    ),
    Recipe(
        "hf_mobilenet_v2_image_classification",
        build_mobilenet_v2,
        guards="MobileNetV2 from config (inverted residuals, ReLU6, BatchNorm, dropout 0.2), the model's own "
        "loss, SGD Nesterov momentum 0.9 (lr 0.01: torchvision's 0.045 at batch 256, scaled to 64), weight "
        "decay 4e-5, cosine schedule",
        bug="`softmax` on the logits before `F.cross_entropy`",
        code="logits.probabilities",
        final_loss=1.6,
    ),
    Recipe(
        "hf_llama_causal_lm",
        build_llama,
        guards="Llama from config (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention), the model's "
        "own loss plus a z-loss (`torch.logsumexp`), AdamW (0.9, 0.95) + `get_cosine_schedule_with_warmup`, "
        "weight decay 0.1, clipping 1.0, `bf16-mixed`",
        bug="the z-loss's log-partition written as `torch.log(torch.exp(z).sum(-1))`",
        code="logits.naive_logsumexp",
        final_loss=1.5,
    ),
]


# A known false alarm, kept visible until the rule handles it: every convolution of MobileNetV2 feeds a
# BatchNorm, so the loss is invariant to each conv weight's scale; Hugging Face's init (normal, std
# 0.02) leaves those weights tiny (||w|| 0.18 in the stem), and the curvature along them, which
# scales as 1/||w||^2, is lambda_max ~ 5e6 at step 0 against SGD's limit 136 (lr 0.01). The monitors
# now find those convs (healthmon.numerics.scale_invariance): the first-step rule no longer flags
# their update (26x the stem conv's weights, grad.explosion before), and the Hessian leaves their
# weights out. What remains: the Hessian restricted to the other parameters still has lambda_max
# 2283 at step 0, mostly along the BatchNorm scales and shifts of the early layers (which feed
# ReLU6 -> conv -> BatchNorm, so they are nearly scale-invariant too; leaving them out as well
# leaves 292, along the linear bottlenecks' BatchNorm scales). It is not BatchNorm's eps alone
# (the convs' weights scaled up 10x or 30x: 656, 947), but it does not last: after one SGD step
# it is 356, after two 87, after ten 34, and the loss falls.
SCALE_INVARIANT_SHARPNESS = pytest.mark.xfail(
    strict=True,
    reason="hessian.sharpness at step 0: with the scale-invariant conv weights left out, the curvature "
    "of the (nearly scale-invariant) BatchNorm parameters is still above the limit at the init, and "
    "falls below it within two steps",
)
HEALTHY = [
    pytest.param(r, marks=SCALE_INVARIANT_SHARPNESS)
    if r.name == "hf_mobilenet_v2_image_classification"
    else r
    for r in HF_RECIPES
]


@pytest.mark.parametrize("recipe", HEALTHY, ids=lambda r: r.name)
def test_healthy_transformers_model(tmp_path: Any, recipe: Recipe) -> None:
    result = run(recipe, tmp_path, sick=False)
    assert_trains(result, recipe.final_loss)
    assert_healthy(result)


@pytest.mark.parametrize("recipe", HF_RECIPES, ids=lambda r: r.name)
def test_sick_transformers_model_is_caught(tmp_path: Any, recipe: Recipe) -> None:
    assert_detects(run(recipe, tmp_path, sick=True), recipe.code)
