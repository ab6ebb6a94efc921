"""ModuleStack: the innermost module whose forward runs, through nesting, errors and removal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from healthmon.numerics.nonfinite.module_stack import ModuleStack


class Probe(nn.Module):
    """Records the innermost module the stack reports while it runs."""

    def __init__(self, stack: list[ModuleStack], fail: bool = False) -> None:
        super().__init__()
        self.stacks, self.seen, self.fail = stack, [], fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.stacks[0].current())
        if self.fail:
            raise RuntimeError("inside the probe")
        return x


def test_the_innermost_running_module_is_named_with_its_class() -> None:
    holder: list[ModuleStack] = []
    probe = Probe(holder)
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(probe))
    stack = ModuleStack(model)
    holder.append(stack)
    assert stack.current() is None
    model(torch.ones(1, 2))
    assert probe.seen == ["1.0 (Probe)"]
    assert stack.current() is None  # every forward popped


def test_the_root_module_is_named_by_its_forward() -> None:
    holder: list[ModuleStack] = []
    probe = Probe(holder)
    holder.append(ModuleStack(probe))
    probe(torch.ones(1))
    assert probe.seen == ["Probe.forward"]


def test_a_failing_forward_still_pops_and_removed_hooks_stop_tracking() -> None:
    holder: list[ModuleStack] = []
    probe = Probe(holder, fail=True)
    model = nn.Sequential(probe)
    stack = ModuleStack(model)
    holder.append(stack)
    with pytest.raises(RuntimeError, match="inside the probe"):
        model(torch.ones(1))
    assert probe.seen == ["0 (Probe)"]
    assert stack.stack == []  # the post-hooks run even when the forward raises
    stack.remove()
    probe.fail = False
    model(torch.ones(1))
    assert probe.seen == ["0 (Probe)", None]
    assert ModuleStack(None).current() is None
