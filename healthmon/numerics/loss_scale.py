"""When a dynamic loss scaler (fp16 ``GradScaler``) is in trouble rather than doing its job.

A ``GradScaler`` multiplies the loss by a scale before backward so that small float16 gradients
do not underflow. When the scaled gradients overflow it skips that optimizer step and halves the
scale; after ``growth_interval`` clean steps it doubles it again. Skipped steps are therefore
normal: a run starting at the default scale 2**16 skips a few steps until the scale fits its
gradients, and a long run skips one now and then when the scale probes upwards.

The scaler is in trouble when no scale works:

* many optimizer steps in a row are skipped: the gradients are non-finite at every scale tried
  (a NaN/Inf produced by the model itself, or an overflow that no scale can avoid), and the
  weights are not being updated;
* the scale falls below a floor (default 1, the ``min_loss_scale`` default of DeepSpeed and
  Megatron-LM): the gradients were non-finite even without any amplification (a NaN from the
  model, or an overflow of float16's range), and the scaler is now shrinking them, so small
  gradients underflow instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LossScaleRule:
    """Watches a dynamic loss scaler step by step and says when it is in trouble.

    Args:
        max_consecutive_skips: this many skipped optimizer steps in a row is trouble (default 20:
            from the default initial scale 2**16, a healthy run finds a working scale within 16
            skips, one halving each).
        min_scale: a scale below this is trouble.
    """

    max_consecutive_skips: int = 20
    min_scale: float = 1.0
    consecutive: int = 0
    below_floor: bool = False

    def update(self, skipped: bool, scale: float | None) -> str | None:
        """Feed one optimizer step: whether the scaler skipped it and the scale it used.

        Returns a reason once per episode (when a run of skips reaches the limit, or when the
        scale first falls below the floor), else None.
        """
        self.consecutive = self.consecutive + 1 if skipped else 0
        if self.consecutive == self.max_consecutive_skips:
            where = "" if scale is None else f" (loss scale now {scale:g})"
            return (
                f"skipped {self.consecutive} optimizer steps in a row{where}: the gradients are "
                "non-finite at every scale it tried, so the weights are not being updated"
            )
        if scale is None or not math.isfinite(scale):
            return None
        was_below, self.below_floor = self.below_floor, scale < self.min_scale
        if self.below_floor and not was_below:
            return (
                f"let its loss scale fall to {scale:g}, below {self.min_scale:g}: the gradients were "
                "non-finite even unscaled, which loss scaling cannot fix, and the scaler now "
                "shrinks them"
            )
        return None
