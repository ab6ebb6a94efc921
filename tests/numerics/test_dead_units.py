"""Dead units: active units from forward outputs, the recorder's hooks, and the finding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from healthmon.numerics.dead_units import (
    UnitRecorder,
    active_units,
    dead_fraction,
    dead_unit_findings,
    relu_modules,
)


@pytest.mark.parametrize(
    ("module", "x", "dead"),
    [
        (nn.ReLU(), torch.tensor([[1.0, -1.0, 0.0], [2.0, -3.0, 0.0]]), [False, True, True]),
        (nn.ReLU6(), torch.tensor([[7.0, 3.0, -1.0], [8.0, -2.0, -1.0]]), [True, False, True]),
        (nn.Hardtanh(), torch.tensor([[0.5, 2.0], [-2.0, 3.0]]), [False, True]),
    ],
)
def test_active_units_brute_force(module, x, dead):
    out = module(x)
    act = active_units(module, out)
    assert (~act).tolist() == dead
    assert dead_fraction(act).item() == pytest.approx(sum(dead) / len(dead))


def test_active_units_conv_channels_and_sequences():
    relu = nn.ReLU()
    x = torch.randn(2, 3, 4, 4)
    x[:, 1] = -1.0
    assert (~active_units(relu, relu(x))).tolist() == [False, True, False]
    seq = torch.randn(2, 5, 6)
    seq[..., 4] = -1.0
    assert (~active_units(relu, relu(seq))).tolist() == [False] * 4 + [True, False]
    with pytest.raises(TypeError, match="`module`"):
        active_units(nn.Sigmoid(), x)


def test_recorder_combines_micro_batches_and_removes_its_hooks():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU6())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]]))
        model[0].bias.zero_()
    recorder = UnitRecorder(relu_modules(model))
    assert [name for name, _ in recorder.modules] == ["1", "3"]
    model(torch.tensor([[1.0, -1.0]]))  # not attached: nothing recorded
    assert recorder.alive == {}
    recorder.attach()
    recorder.attach()  # once only
    assert len(model[1]._forward_hooks) == 1
    model(torch.tensor([[1.0, -1.0]]))  # units 0 alive
    model(torch.tensor([[-1.0, 1.0]]))  # units 1 and 2 alive: unit 3 never
    dead = recorder.take()
    assert dead["1"].item() == 0.25 and recorder.alive == {}
    recorder.detach()
    assert not recorder.attached and not model[1]._forward_hooks and not model[3]._forward_hooks
    assert recorder.kind("3") == "ReLU6"
    model.eval()
    recorder.attach()
    model(torch.tensor([[1.0, -1.0]]))  # evaluation passes are not training batches
    assert recorder.alive == {}


def test_dead_unit_findings_at_the_threshold():
    found = dead_unit_findings(["net.1", "net.3"], ["ReLU", "ReLU6"], [0.5, 0.4999], 0.5)
    assert [(f.code, f.where, f.value) for f in found] == [("grad.dead_units", "net.1", 0.5)]
    assert found[0].message == "50% of the units of net.1 (ReLU) passed no gradient for the whole batch."
    assert dead_unit_findings([], [], [], 0.5) == []
