"""healthmon.numerics.scale_invariance: structural detection, checked against brute-force scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from healthmon.numerics.scale_invariance import normalises_batch, scale_invariant_parameters


class Net(nn.Module):
    """Conv-BN-ReLU, Linear-BN, Linear-LayerNorm, Conv-GroupNorm, a Linear before ReLU, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv_gn = nn.Conv2d(4, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.fc_bn = nn.Linear(16, 8)
        self.bn1d = nn.BatchNorm1d(8)
        self.fc_ln = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.fc_relu = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.relu(self.gn(self.conv_gn(h)))
        h = nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)
        h = torch.relu(self.bn1d(self.fc_bn(h)))
        h = torch.relu(self.ln(self.fc_ln(h)))
        h = torch.relu(self.fc_relu(h))
        return self.head(h)


INVARIANT = {
    "conv.weight",
    "conv_gn.weight",
    "conv_gn.bias",
    "fc_bn.weight",
    "fc_bn.bias",
    "fc_ln.weight",
    "fc_ln.bias",
}


def _setup() -> tuple[Net, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return Net(), torch.randn(32, 1, 6, 6), torch.randint(0, 3, (32,))


def _loss(model: Net, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def _detect(model: Net, x: torch.Tensor) -> set[str]:
    return scale_invariant_parameters(model, lambda: model(x))


def test_detects_the_layers_feeding_a_normalisation() -> None:
    model, x, _ = _setup()
    assert _detect(model, x) == INVARIANT


def _scaled_loss(model: Net, layer: str, alpha: float, x: torch.Tensor, y: torch.Tensor) -> float:
    module = model.get_submodule(layer)
    saved = [p.detach().clone() for p in module.parameters()]
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(alpha)
    scaled = _loss(model, x, y)
    with torch.no_grad():
        for p, s in zip(module.parameters(), saved, strict=True):
            p.copy_(s)
    return scaled


@pytest.mark.parametrize("alpha", [0.5, 4.0])
def test_detected_layers_are_scale_invariant_and_the_others_are_not(alpha: float) -> None:
    model, x, y = _setup()
    base = _loss(model, x, y)
    for layer in sorted({name.rsplit(".", 1)[0] for name in INVARIANT}):
        # equal up to the norms' eps
        assert abs(_scaled_loss(model, layer, alpha, x, y) - base) < 1e-4 * base, layer
    for layer in ("fc_relu", "head"):  # not detected, and the loss depends on their scale
        assert abs(_scaled_loss(model, layer, alpha, x, y) - base) > 1e-3 * base, layer


def test_eval_mode_batchnorm_is_not_normalising() -> None:
    model, x, _ = _setup()
    model.eval()
    found = _detect(model, x)
    assert "conv.weight" not in found and "fc_bn.weight" not in found
    assert {"conv_gn.weight", "fc_ln.weight"} <= found  # GroupNorm and LayerNorm use the sample's own scale
    assert normalises_batch(nn.BatchNorm2d(2, track_running_stats=False).eval())


def test_an_op_between_the_layer_and_the_norm_breaks_it() -> None:
    lin, ln = nn.Linear(4, 4), nn.LayerNorm(4)
    model = nn.ModuleDict({"lin": lin, "ln": ln})
    assert scale_invariant_parameters(model, lambda: ln(torch.relu(lin(torch.randn(3, 4))))) == set()
    assert scale_invariant_parameters(model, lambda: ln(lin(torch.randn(3, 4)))) == {"lin.weight", "lin.bias"}


def test_hooks_are_removed_and_frozen_parameters_left_out() -> None:
    model, x, _ = _setup()
    model.conv.weight.requires_grad_(False)
    assert "conv.weight" not in _detect(model, x)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
