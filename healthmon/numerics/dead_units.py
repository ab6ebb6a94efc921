"""Dead units: ReLU-family units that passed no gradient for a whole batch.

A unit whose activation derivative is zero for every sample and position of the batch passes no
gradient back (a dying ReLU: its output is ``<= 0`` everywhere). This is measured in the forward
pass, from the activation's output only (so ``inplace=True`` modules work), by forward hooks that
:class:`UnitRecorder` installs for the batches of a monitored optimizer step; the micro-batches of
one step are combined (a unit alive in any of them is alive). The dead share per module is a
device scalar, fetched with the monitor's next host synchronisation and judged by
:func:`dead_unit_findings`.

This module is pure torch: no Lightning, no logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from healthmon.numerics.findings import Finding

#: Activations whose derivative is exactly zero on part of their domain (dying-unit candidates).
#: ``nn.ReLU6`` is a subclass of ``nn.Hardtanh``.
RELU_FAMILY: tuple[type[nn.Module], ...] = (nn.ReLU, nn.Hardtanh)


def unit_axis(output: Tensor) -> int:
    """The axis that indexes units: features for ``(N, F)`` and ``(N, T, F)``, channels for conv maps.

    Outputs of rank 4 or more (``(N, C, H, W)``...) are treated as convolution feature maps;
    rank 1, 2 and 3 outputs as feature vectors along the last axis.
    """
    return 1 if output.dim() >= 4 else output.dim() - 1


def active_units(module: nn.Module, output: Tensor) -> Tensor:
    """Per unit, True when the activation's derivative was nonzero for at least one input of the batch.

    A unit whose derivative is zero for every sample and position passes no gradient back: for
    ``nn.ReLU`` the output was ``<= 0`` everywhere (a dying ReLU); for ``nn.Hardtanh`` / ``nn.ReLU6``
    the input sat on a flat side. Measured from the forward output only (no backward hook), so it
    works with ``inplace=True`` activations.
    """
    out = output.detach()
    if isinstance(module, nn.Hardtanh):
        live = (out > module.min_val) & (out < module.max_val)
    elif isinstance(module, nn.ReLU):
        live = out > 0
    else:
        raise TypeError(f"`module`: expected one of {[c.__name__ for c in RELU_FAMILY]}, got {module!r}.")
    axis = unit_axis(out)
    units = live.shape[axis] if live.dim() else 1
    return live.movedim(axis, -1).reshape(-1, units).any(dim=0)


def dead_fraction(active: Tensor) -> Tensor:
    """Fraction of units that were not active (device scalar, float32)."""
    return (~active).float().mean() if active.numel() else torch.zeros((), device=active.device)


class UnitRecorder:
    """Forward hooks on ReLU-family modules that record which units were alive, only while attached.

    Args:
        modules: ``(name, module)`` pairs to watch (see :func:`relu_modules`).
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]] = ()) -> None:
        self.modules = list(modules)
        self.alive: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    @property
    def attached(self) -> bool:
        """Whether the forward hooks are installed."""
        return bool(self._handles)

    def attach(self) -> None:
        """Install the hooks (once; a no-op while attached)."""
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules]

    def detach(self) -> None:
        """Remove the hooks; what was recorded stays until :meth:`take` or :meth:`clear`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Forget what was recorded since the last :meth:`take`."""
        self.alive = {}

    def take(self) -> dict[str, Tensor]:
        """Dead share per watched module seen since the last take (device scalars); forgets them."""
        dead = {name: dead_fraction(live) for name, live in self.alive.items()}
        self.alive = {}
        return dead

    def kind(self, name: str) -> str:
        """The class name of the watched module ``name``."""
        return type(dict(self.modules).get(name)).__name__

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor) and module.training:
                live = active_units(module, output)
                seen = self.alive.get(name)
                self.alive[name] = live if seen is None or seen.shape != live.shape else seen | live

        return hook


def relu_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ReLU-family modules of ``model`` with their names (``(root)`` for the model itself)."""
    return [(n or "(root)", m) for n, m in model.named_modules() if isinstance(m, RELU_FAMILY)]


def dead_unit_findings(
    names: Sequence[str], kinds: Sequence[str], fractions: Sequence[float], threshold: float
) -> list[Finding]:
    """``grad.dead_units`` for each module whose dead share reaches ``threshold``.

    Args:
        names: module names.
        kinds: their class names (``ReLU``, ``ReLU6``...).
        fractions: their shares of units that passed no gradient for the whole batch.
        threshold: the share that is reported.
    """
    return [
        Finding(
            "grad.dead_units",
            f"{frac:.0%} of the units of {name} ({kind}) passed no gradient for the whole batch.",
            where=name,
            value=frac,
        )
        for name, kind, frac in zip(names, kinds, fractions, strict=True)
        if frac >= threshold
    ]
