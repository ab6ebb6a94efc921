"""NaN/Inf that was there before the step: in the batch, a weight, a buffer or a captured tensor.

The batch is blamed only when it really holds NaN/Inf, and then by the path of the tensor
(``batch[0]``, ``batch["x"]``) and the indices of the samples that hold them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from healthmon.numerics.nonfinite.hints import HINT_BATCH, HINT_GENERIC, HINT_MASK, HINT_WEIGHTS
from healthmon.numerics.nonfinite.operations import TracedOp, display_name
from healthmon.numerics.nonfinite.origin import Origin
from healthmon.numerics.nonfinite.values import NAN, NEGINF, kinds_text, real_view

#: Sample indices named in a batch origin (the count says how many more).
MAX_SAMPLES = 10


def batch_names(batch: Any, prefix: str = "batch", depth: int = 0) -> Iterator[tuple[Tensor, str]]:
    """Every tensor inside a batch with its path: ``batch[0]``, ``batch["x"]``, ``batch.x``."""
    if isinstance(batch, Tensor):
        yield batch, prefix
    elif depth > 4:
        return
    elif isinstance(batch, dict):
        for k, v in batch.items():
            yield from batch_names(v, f"{prefix}[{k!r}]", depth + 1)
    elif isinstance(batch, (list, tuple)):
        fields = getattr(batch, "_fields", None)
        for i, v in enumerate(batch):
            yield from batch_names(v, f"{prefix}.{fields[i]}" if fields else f"{prefix}[{i}]", depth + 1)
    elif hasattr(batch, "__dataclass_fields__"):
        for k in batch.__dataclass_fields__:
            yield from batch_names(getattr(batch, k, None), f"{prefix}.{k}", depth + 1)


def tensor_names(module: torch.nn.Module | None, batch: Any) -> WeakIdKeyDictionary:
    """The tensors made before the step, by what they are: ``{tensor: ("parameter", "net.0.weight")}``."""
    names: WeakIdKeyDictionary = WeakIdKeyDictionary()
    if module is not None:
        for n, b in module.named_buffers():
            names[b] = ("buffer", n)
        for n, p in module.named_parameters():
            names[p] = ("parameter", n)
    for t, path in batch_names(batch):
        names[t] = ("batch", path)
    return names


def input_origin(
    t: Tensor, kinds: frozenset[str], kind: str, name: str, op: TracedOp | None, seq: int
) -> Origin:
    """The origin of NaN/Inf held by ``t`` before the step: what it is, and for a batch which samples.

    Args:
        t: the tensor holding NaN/Inf.
        kinds: the kinds of non-finite values it holds.
        kind: ``"batch"``, ``"parameter"``, ``"buffer"``, ``"untraced"`` (made by code the tracer
            does not see) or ``"tensor"``.
        name: which one (``batch[0]``, ``net.0.weight``).
        op: the traced operation where it first enters the computation, when known.
        seq: the order of that moment in the step.
    """
    used = ""
    if op is not None:
        inside = f" in {op.module}" if op.module else ""
        used = f" It first enters the computation at {display_name(op.func)}{inside} at {op.where}."
    intended = NAN not in kinds and (kind != "batch" or kinds == {NEGINF})
    what = kinds_text(kinds)
    samples: list[int] = []
    bad = size = 0
    if kind == "batch":
        with torch.no_grad():
            rows = ~torch.isfinite(real_view(t.detach()))
            rows = rows.reshape(rows.shape[0], -1).any(1) if rows.dim() > 0 else rows.reshape(1)
            idx = rows.nonzero().flatten()
            bad, size = int(idx.numel()), int(rows.numel())
            samples = idx[:MAX_SAMPLES].tolist()
        shown = ", ".join(map(str, samples)) + (" ..." if bad > len(samples) else "")
        cause = (
            f"The batch holds {what}: {name} has {what} in {bad} of its {size} samples "
            f"(indices {shown}).{used}"
        )
        hint = HINT_BATCH
    elif kind == "parameter":
        cause = (
            f"The weight {name} already holds {what} before the step (an earlier update corrupted it).{used}"
        )
        hint = HINT_WEIGHTS
    elif kind == "buffer":
        cause = f"The buffer {name} holds {what} (e.g. BatchNorm running statistics that absorbed NaN).{used}"
        hint = HINT_WEIGHTS
    elif kind == "untraced":
        cause = (
            f"{what} comes from {name} (a custom autograd Function, a C++/Triton extension or a "
            f"compiled region).{used}"
        )
        hint = HINT_GENERIC
    else:
        cause = f"A tensor made before the step (a captured constant or attribute) holds {what}.{used}"
        hint = HINT_MASK if intended else HINT_WEIGHTS
    return Origin(
        phase="input",
        op="",
        where=None,
        module=None,
        cause=cause,
        hint=hint,
        produced=kinds,
        source=name,
        source_kind=kind,
        samples=samples,
        bad_samples=bad,
        batch_size=size,
        intended=intended,
        seq=seq,
    )
