"""Run extra computation on the user's model without leaving a trace on the run.

Anything healthmon perturbs to look inside a training step (random number generators, BatchNorm
running statistics and other buffers, train/eval modes, parameter gradients) is saved here and put
back afterwards, so the trained weights are bit-identical with and without healthmon.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Save and restore the CPU and every CUDA device's RNG state."""
    cpu = torch.get_rng_state()
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def preserved_module_state(module: torch.nn.Module, *, grads: bool = True) -> Iterator[None]:
    """Save and restore buffers (BatchNorm statistics...), train/eval modes and gradients."""
    modes = [(m, m.training) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    saved_grads = [(p, p.grad) for p in module.parameters()] if grads else []
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for b, copy in buffers:
                b.copy_(copy)
        for p, g in saved_grads:
            p.grad = g


@contextmanager
def silenced_logging(pl_module: Any) -> Iterator[None]:
    """Make ``self.log`` / ``self.log_dict`` no-ops while healthmon replays a ``training_step``."""
    noop = lambda *args, **kwargs: None  # noqa: E731
    pl_module.__dict__["log"] = noop
    pl_module.__dict__["log_dict"] = noop
    try:
        yield
    finally:
        pl_module.__dict__.pop("log", None)
        pl_module.__dict__.pop("log_dict", None)


@contextmanager
def isolated(pl_module: Any) -> Iterator[None]:
    """All of the above: RNG, module state, gradients and logging restored on exit."""
    with preserved_rng(), preserved_module_state(pl_module), silenced_logging(pl_module):
        yield
