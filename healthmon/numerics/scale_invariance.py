"""Scale-invariant parameters: the weights of layers whose output goes straight into a normalisation.

Why: a Linear or convolution whose output a BatchNorm (training mode), GroupNorm, LayerNorm or
InstanceNorm normalises leaves the loss unchanged when its parameters are scaled together,
``L(alpha * w) = L(w)`` (up to the norm's ``eps``). For such weights the gradient scales as
``1/||w||`` and the curvature as ``1/||w||^2``, so tiny weights (an init with std 0.02) show a huge
``lambda_max`` and a first update many times their size, and neither predicts divergence: a large
step only grows ``||w||``, which lowers the effective learning rate ``lr/||w||^2`` by itself (Arora,
Li & Lyu 2018, "auto rate-tuning" of batch normalisation). Euler's identity ``g . w = 0`` cannot find
them numerically at small scales (the norm's ``eps`` breaks it), so they are found structurally: one
forward pass with hooks records which module's output tensor is, itself, a normalisation's input.

Only the identical tensor counts (no op in between: a ReLU, a residual addition or a dropout
between the layer and the norm breaks the invariance). A bias added inside the layer is covered:
the layer's parameters scale together. Pure torch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

__all__ = ["SCALED_LAYERS", "NormalisedLayers", "normalises_batch", "scale_invariant_parameters"]

# The layers whose parameters scale their output as a whole (weight and bias together).
SCALED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

_ALWAYS_NORMALISING: tuple[type[nn.Module], ...] = (
    nn.GroupNorm,
    nn.LayerNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def normalises_batch(module: nn.Module) -> bool:
    """Whether ``module``, as it runs now, divides its input by the input's own scale.

    GroupNorm, LayerNorm (and RMSNorm) always do; BatchNorm and InstanceNorm do when they use the
    batch's statistics: in training mode, or without running statistics (in evaluation mode with
    running statistics they divide by a fixed scale, and the invariance is gone).

    >>> normalises_batch(nn.BatchNorm2d(3)), normalises_batch(nn.BatchNorm2d(3).eval())
    (True, False)
    >>> normalises_batch(nn.LayerNorm(4)), normalises_batch(nn.ReLU())
    (True, False)
    """
    if isinstance(module, _ALWAYS_NORMALISING):
        return True
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return module.training or not module.track_running_stats
    return False


class NormalisedLayers:
    """Forward hooks that find the layers whose output is, itself, a normalisation's input.

    :meth:`attach` hooks ``model``'s submodules; every forward pass until :meth:`detach` is
    watched: a layer of :data:`SCALED_LAYERS` whose output tensor (the same object, held by a
    weak reference so that a reused ``id`` cannot match) is the first input of a module for
    which :func:`normalises_batch` holds is recorded. The hooks only look, so they may watch the
    training step's own forward pass.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: set[str] = set()
        self._outputs: dict[int, tuple[str, weakref.ref[Tensor]]] = {}
        self._handles: list[Any] = []

    def _record(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                self._outputs[id(output)] = (name, weakref.ref(output))

        return hook

    def _check(self, module: nn.Module, args: Any) -> None:
        if not args or not isinstance(args[0], Tensor) or not normalises_batch(module):
            return
        entry = self._outputs.get(id(args[0]))
        if entry is not None and entry[1]() is args[0]:  # the same tensor, not a reused id
            self.layers.add(entry[0])

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return bool(self._handles)

    def attach(self) -> None:
        """Hook every submodule: layers record their outputs, the others check their input."""
        self.detach()
        for name, module in self.model.named_modules():
            if isinstance(module, SCALED_LAYERS):
                self._handles.append(module.register_forward_hook(self._record(name)))
            else:
                self._handles.append(module.register_forward_pre_hook(self._check))

    def detach(self) -> None:
        """Remove the hooks and forget the outputs seen."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def parameters(self) -> set[str]:
        """The trainable parameters (names as in ``model.named_parameters()``) of the layers found."""
        return {
            f"{layer}.{p}" if layer else p
            for layer in self.layers
            for p, param in self.model.get_submodule(layer).named_parameters(recurse=False)
            if param.requires_grad
        }


def scale_invariant_parameters(model: nn.Module, forward: Callable[[], Any]) -> set[str]:
    """The names (as in ``model.named_parameters()``) of the scale-invariant parameters.

    Runs ``forward()`` once under :class:`NormalisedLayers`' hooks: the parameters (weight and
    bias) of every layer whose output goes straight into a normalisation. The caller decides how
    the forward pass runs (e.g. inside :func:`~healthmon.engine.isolation.isolated`, without
    gradients).

    Args:
        model: the module whose parameters are named.
        forward: one forward pass through ``model`` (its result is ignored).

    Returns:
        The parameter names; empty when no layer feeds a normalisation directly.
    """
    watch = NormalisedLayers(model)
    watch.attach()
    try:
        forward()
    finally:
        watch.detach()
    return watch.parameters()
