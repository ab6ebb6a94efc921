"""The fixes an origin suggests when its cause is not specific to one operation."""

from __future__ import annotations

import torch

HINT_GENERIC = (
    "Guard the inputs of this operation (clamp to its domain, add an epsilon) or use a stable form."
)
HINT_CONSTANT = "Remove the NaN literal (a placeholder or a debugging leftover)."
HINT_MASK = (
    "An infinite mask is fine as long as every row keeps at least one finite entry; nothing to change "
    "unless it reached the loss."
)
HINT_BATCH = (
    "Fix the data: find these samples in the dataset (the crash record has the batch index), drop or "
    "repair them (torch.nan_to_num, imputation), or check the transform that produced them."
)
HINT_WEIGHTS = (
    "See the alert of the step that corrupted them (update.nonfinite); restart from the last finite "
    "checkpoint."
)


def overflow_hint(dtype: torch.dtype) -> str:
    """The fix for a value beyond the maximum of ``dtype`` (float16 has its own remedies)."""
    if dtype == torch.float16:
        return (
            "float16 overflows above 65504: use bf16 (precision='bf16-mixed'), loss scaling "
            "(precision='16-mixed'), or keep this operation in float32; normalise the activations."
        )
    return (
        "Check the scale of the inputs (normalisation, initialisation, learning rate) "
        "or compute in a wider dtype."
    )
