"""The monitors and scale-invariant layers (a Linear/conv whose output a normalisation takes).

A CNN with BatchNorm after each conv (the CNN recipe's model): the first-step rule judges the
convs by their sensitivity only and the Hessian leaves their weights out, while a learning rate
100x too high is still caught (the sharpness of the other parameters, the loss's divergence).
"""

from __future__ import annotations

from typing import Any

from models import trainer
from recipes.cases import DigitsCNN
from recipes.common import digit_images, loader

from healthmon import HealthMonitor
from healthmon.monitors.gradient_norm import GradientNormMonitor
from healthmon.monitors.hessian import HessianEigenMonitor


def _fit(tmp_path: Any, lr: float, steps: int) -> tuple[HealthMonitor, DigitsCNN]:
    mon, model = HealthMonitor(summary=False), DigitsCNN(lr=lr, max_steps=300)
    x, y = digit_images()
    trainer(tmp_path, [mon], max_steps=steps).fit(model, loader(x, y, batch_size=64))
    return mon, model


def test_both_monitors_find_the_convs_feeding_batchnorm(tmp_path: Any) -> None:
    mon, model = _fit(tmp_path, 0.05, 2)
    hessian = next(m for m in mon.monitors if isinstance(m, HessianEigenMonitor))
    grads = next(m for m in mon.monitors if isinstance(m, GradientNormMonitor))
    assert hessian.scale_invariant == ["net.0.weight", "net.4.weight"]
    assert grads.scale_invariant_layers == {"net.0", "net.4"}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())  # hooks removed
    assert not [a for a in mon.alerts if a.severity != "info"]


def test_a_learning_rate_100x_too_high_on_a_batchnorm_cnn_is_still_caught(tmp_path: Any) -> None:
    mon, _ = _fit(tmp_path, 5.0, 30)  # the recipe's lr is 0.05
    sharp = next(a for a in mon.alerts if a.code == "hessian.sharpness")
    assert sharp.step == 0 and "2 scale-invariant tensor(s) feeding a normalisation left out" in sharp.message
    assert "loss.divergence" in [a.code for a in mon.alerts]
