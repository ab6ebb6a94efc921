"""The everyday recipes, as data: each a small but real training run and its sick twin.

Every ``build_*`` takes ``sick`` and returns (model, train loader, Trainer options). The sick twin
is the same recipe with one of the seed's bugs; everything else is identical.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from models import digits
from pytorch_lightning.plugins import MixedPrecision
from recipes.common import Recipe, Recorded, digit_images, loader, markov_tokens
from torch import nn
from torch.utils.data import DataLoader


# ---- 1. CNN with BatchNorm, SGD momentum + cosine schedule ---------------------------------------
class DigitsCNN(Recorded):
    def __init__(self, *, lr: float, max_steps: int, softmax_last: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 2x2
            nn.Flatten(),
            nn.Linear(128, 10),
        ]
        if softmax_last:
            layers.append(nn.Softmax(dim=-1))  # the bug: probabilities into cross_entropy
        self.net = nn.Sequential(*layers)
        self.lr, self.max_steps = lr, max_steps

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.record(F.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def build_cnn(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    steps = 300
    x, y = digit_images()
    return (
        DigitsCNN(lr=0.05, max_steps=steps, softmax_last=sick),
        loader(x, y, batch_size=64),
        {"max_steps": steps},
    )


# ---- 2. Transformer LM: AdamW, linear warm-up from 0, bf16-mixed, clipping, accumulation ----------
class TinyLM(Recorded):
    def __init__(self, *, vocab: int, length: int, lr: float, warmup: int) -> None:
        super().__init__()
        d = 32
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(length - 1))
        self.lr, self.warmup = lr, warmup

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        h = self.embed(inputs) + self.pos[: inputs.shape[1]]
        h = self.norm(self.blocks(h, mask=self.causal, is_causal=True))
        logits = self.head(h)
        return self.record(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)))

    def configure_optimizers(self) -> Any:
        decay = [p for n, p in self.named_parameters() if p.ndim >= 2 and n != "pos"]
        no_decay = [p for n, p in self.named_parameters() if p.ndim < 2 or n == "pos"]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.9, 0.95),
        )
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / self.warmup))  # 0 at step 0
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def build_transformer_lm(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    vocab, length = 32, 24
    tokens = markov_tokens(2048, length, vocab)
    model = TinyLM(vocab=vocab, length=length, lr=3e-3 * (100 if sick else 1), warmup=30)
    options = {
        "max_steps": 200,
        "precision": "bf16-mixed",
        "gradient_clip_val": 1.0,
        "accumulate_grad_batches": 2,
    }
    return model, loader(tokens, batch_size=16), options


# ---- 3. fp16 mixed precision with a GradScaler that really overflows -------------------------------
class SummedLossMLP(Recorded):
    """Cross-entropy summed over the batch (as many seq2seq and RL codes do): large gradients."""

    def __init__(self, *, lr: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.record(F.cross_entropy(self.net(x), y, reduction="sum"))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def build_fp16_scaler(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    x, y = digits()
    # Lightning gives plain precision="16-mixed" no GradScaler on CPU: pass one explicitly.
    scaler = torch.amp.GradScaler("cpu")  # init scale 65536: the first steps overflow and are skipped
    options = {"max_steps": 300, "plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    # the bug: lr 100x too high; the weights blow up, the loss turns NaN, the scale falls to 0
    return SummedLossMLP(lr=1e-3 * (100 if sick else 1)), loader(x, y, batch_size=64), options


# ---- 4. LoRA fine-tune of a model pre-trained inside the test ------------------------------------
class LoRALinear(nn.Module):
    """W x + (alpha / r) B A x with W frozen; B starts at zero so the adapter starts as a no-op."""

    def __init__(self, base: nn.Linear, *, rank: int = 4, alpha: float = 8.0, zero_a: bool = False) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        if zero_a:
            nn.init.zeros_(self.lora_a)  # the bug: A = B = 0, no gradient ever reaches either
        else:
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.lora_a.T @ self.lora_b.T)


def pretrained_mlp(x: torch.Tensor, y: torch.Tensor, *, steps: int) -> nn.Sequential:
    """A digits MLP trained with plain torch (no Lightning, no monitor) inside the test."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net


class LoRAClassifier(Recorded):
    def __init__(self, net: nn.Sequential, *, zero_a: bool) -> None:
        super().__init__()
        for i, m in enumerate(net):
            if isinstance(m, nn.Linear):
                net[i] = LoRALinear(m, zero_a=zero_a)
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.record(F.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-3)


def build_lora(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    x, y = digits()
    net = pretrained_mlp(x, y, steps=150)
    # the downstream task: the same digits seen in a mirror (a domain shift the adapters must learn)
    mirrored = x.reshape(-1, 8, 8).flip(-1).reshape(-1, 64)
    return LoRAClassifier(net, zero_a=sick), loader(mirrored, y, batch_size=64), {"max_steps": 300}


# ---- 5. GAN with two optimizers (manual optimisation) --------------------------------------------
def ring_of_gaussians(n: int, *, modes: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    angle = torch.randint(modes, (n,), generator=g).float() * (2 * math.pi / modes)
    centres = torch.stack([angle.cos(), angle.sin()], 1) * 2.0
    return centres + 0.05 * torch.randn(n, 2, generator=g)


class RingGAN(Recorded):
    def __init__(self, *, sigmoid_in_disc: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
        disc: list[nn.Module] = [nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1)]
        if sigmoid_in_disc:
            disc.append(nn.Sigmoid())  # the bug: probabilities into a logits loss
        self.disc = nn.Sequential(*disc)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_d, opt_g = self.optimizers()
        n = real.shape[0]
        ones, zeros = real.new_ones(n, 1), real.new_zeros(n, 1)
        fake = self.gen(torch.randn(n, 4, device=real.device))
        d_loss = F.binary_cross_entropy_with_logits(
            self.disc(real), ones
        ) + F.binary_cross_entropy_with_logits(self.disc(fake.detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(self.record(d_loss))
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(self.disc(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(self.record(g_loss, optimizer=1))
        opt_g.step()

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.Adam(self.disc.parameters(), lr=1e-3, betas=(0.5, 0.999)),
            torch.optim.Adam(self.gen.parameters(), lr=1e-3, betas=(0.5, 0.999)),
        ]


def build_gan(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    # max_steps counts optimizer steps: two per batch
    return RingGAN(sigmoid_in_disc=sick), loader(ring_of_gaussians(4096), batch_size=64), {"max_steps": 400}


# ---- 6. mixup (np.random) + a torchmetrics metric + self.log(on_step, on_epoch) -------------------
class MixupClassifier(Recorded):
    def __init__(self, *, naive_log_softmax: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10))
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=10)
        self.naive = naive_log_softmax

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        lam = float(np.random.beta(0.4, 0.4))
        perm = torch.from_numpy(np.random.permutation(len(x)))
        targets = F.one_hot(y, 10).float()
        logits = self.net(lam * x + (1 - lam) * x[perm])
        mixed = lam * targets + (1 - lam) * targets[perm]
        if self.naive:  # the bug: log of softmax, unstable (the seed's log-softmax lesson)
            log_p = torch.log(torch.softmax(logits, -1))
        else:
            log_p = F.log_softmax(logits, -1)
        loss = self.record(-(mixed * log_p).sum(-1).mean())
        self.accuracy(logits, y)
        self.log("train_acc", self.accuracy, on_step=True, on_epoch=True)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def build_mixup(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    np.random.seed(0)
    x, y = digits()
    return MixupClassifier(naive_log_softmax=sick), loader(x, y, batch_size=64), {"max_steps": 300}


# ---- 7. fine-tuning from a converged model -------------------------------------------------------
class FineTune(Recorded):
    def __init__(self, net: nn.Module, *, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.record(F.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def build_finetune(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    x, y = digits()
    x, y = x[:512], y[:512]
    net = pretrained_mlp(x, y, steps=400)  # memorises the 512 samples: loss ~1e-4 from step 0
    return FineTune(net, lr=1e-4 * (100 if sick else 1)), loader(x, y, batch_size=64), {"max_steps": 250}


# ---- 8. full-batch regression to the least-squares optimum ---------------------------------------
def regression_data(n: int = 512, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """As much noise as signal: the optimum's loss (~1) is about half the initial one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g) / math.sqrt(d)
    return x, x @ w + torch.randn(n, 1, generator=g)


class LinearRegression(Recorded):
    def __init__(self, d: int, *, lr: float) -> None:
        super().__init__()
        self.linear = nn.Linear(d, 1)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.record(F.mse_loss(self.linear(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def regression_lr_limit(x: torch.Tensor) -> float:
    """2 / lambda_max of the MSE Hessian (2/n [X 1]^T [X 1]): SGD diverges above it."""
    design = torch.cat([x, torch.ones(len(x), 1)], 1)
    return 2.0 / float(torch.linalg.eigvalsh(2.0 / len(x) * design.T @ design)[-1])


def least_squares_loss(x: torch.Tensor, y: torch.Tensor) -> float:
    """The MSE at the exact least-squares optimum (float64): where gradient descent must end."""
    design = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    residual = design @ torch.linalg.lstsq(design, y.double()).solution - y.double()
    return float(residual.pow(2).mean())


REGRESSION_OPTIMUM = least_squares_loss(*regression_data())


def build_regression(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    x, y = regression_data()
    limit = regression_lr_limit(x)
    lr = 1.1 * limit if sick else 0.5 * limit  # the bug: a step just past the stability limit
    return (
        LinearRegression(x.shape[1], lr=lr),
        loader(x, y, batch_size=len(x), shuffle=False),
        {"max_steps": 300},
    )


# ---- 9. a torch.compile'd model --------------------------------------------------------------------
class CompiledClassifier(Recorded):
    def __init__(self, *, deep_sigmoid: bool) -> None:
        super().__init__()
        if deep_sigmoid:  # the bug: 10 x (Linear, Sigmoid) with default init: gradients vanish
            layers: list[nn.Module] = []
            for i in range(10):
                layers += [nn.Linear(64 if i == 0 else 32, 32), nn.Sigmoid()]
            net = nn.Sequential(*layers, nn.Linear(32, 10))
        else:
            net = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 10))
        self.net = torch.compile(net, backend="eager")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.record(F.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def build_compiled(sick: bool) -> tuple[Recorded, DataLoader, dict[str, Any]]:
    x, y = digits()
    return CompiledClassifier(deep_sigmoid=sick), loader(x, y, batch_size=64), {"max_steps": 300}


RECIPES = [
    Recipe(
        "cnn_batchnorm_sgd_cosine",
        build_cnn,
        guards="BatchNorm, SGD momentum + nesterov, weight decay, cosine schedule per step",
        bug="`nn.Softmax` at the end of the model, then `F.cross_entropy`",
        code="logits.probabilities",
        final_loss=0.1,
    ),
    Recipe(
        "transformer_lm_bf16_warmup",
        build_transformer_lm,
        guards="AdamW with linear warm-up from lr 0 (`LambdaLR`, interval step), `bf16-mixed`, "
        "clipping 1.0, accumulation 2, dropout",
        bug="learning rate 100x too high (0.3)",
        code="loss.divergence",
        final_loss=1.5,
    ),
    Recipe(
        "fp16_gradscaler_overflow",
        build_fp16_scaler,
        guards="`16-mixed` with a real `GradScaler`: its first steps overflow and are skipped",
        bug="learning rate 100x too high: the loss turns NaN, the scale collapses to 0",
        code="loss.nonfinite",
        final_loss=15.0,  # summed over 64 samples,
    ),
    Recipe(
        "lora_finetune",
        build_lora,
        guards="frozen pre-trained weights, LoRA adapters with B = 0 (A's gradient is zero at step 0)",
        bug="A and B both zero-initialised: neither ever gets a gradient",
        code="grad.zero",
        final_loss=0.5,
    ),
    Recipe(
        "gan_two_optimizers",
        build_gan,
        guards="manual optimisation, two optimizers per batch, the loss of each step",
        bug="a `Sigmoid` at the end of the discriminator, then `binary_cross_entropy_with_logits`",
        code="logits.probabilities",
        final_loss=None,
    ),
    Recipe(
        "mixup_torchmetrics_self_log",
        build_mixup,
        guards="`np.random` mixup, soft-target cross-entropy, a torchmetrics metric and "
        "`self.log(on_step=True, on_epoch=True)`, dropout",
        bug="`torch.log(torch.softmax(z))` for the soft-target cross-entropy",
        code="logits.naive_log_softmax",
        final_loss=1.0,
    ),
    Recipe(
        "finetune_from_converged",
        build_finetune,
        guards="a loss of ~2e-5 from the first step (no divergence baseline on noise)",
        bug="learning rate 100x too high (1e-2)",
        code="loss.divergence",
        final_loss=1e-3,
    ),
    Recipe(
        "full_batch_regression_to_optimum",
        build_regression,
        guards="full-batch gradient descent that reaches the least-squares optimum (the gradient "
        "vanishes because the run is done)",
        bug="step size 1.1 x 2/lambda_max",
        code="loss.divergence",
        final_loss=REGRESSION_OPTIMUM * (1 + 1e-5),
    ),
    Recipe(
        "torch_compile",
        build_compiled,
        guards="a `torch.compile`d network (`backend='eager'`)",
        bug="10 x (Linear, Sigmoid) with default init",
        code="grad.vanishing",
        final_loss=0.1,
    ),
]
