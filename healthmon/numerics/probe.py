"""The probe batch of the curvature estimates: its parts, their weights and the loss they give.

Why: the Hessian is measured on the loss the first optimizer step descends, which under gradient
accumulation is spread over several micro-batches. :class:`ProbeBatch` gathers them, knows when
the step's batch is whole, and splits it into weighted chunks whose summed products are those of
the mean loss over every probe sample. Pure Python over torch tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from healthmon.numerics.batches import batch_size, split_batch


def loss_of(output: Any) -> Tensor:
    """The differentiable loss of a ``training_step`` output (a Tensor or a dict with 'loss').

    Raises:
        TypeError: the output holds no loss that requires grad.
    """
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, Tensor) or not loss.requires_grad:
        raise TypeError(
            "training_step did not return a differentiable loss (a Tensor or a dict with 'loss')."
        )
    return loss


class ProbeBatch:
    """The (micro-)batches of the probe, each with its batch index and row count.

    Attributes:
        parts: ``(batch, batch_idx, rows)`` in the order added (rows: 1 when unknown).
        rows: all rows of the probe.
        complete: the probe holds the whole first optimizer step's batch.
    """

    def __init__(self) -> None:
        self.parts: list[tuple[Any, int, int]] = []
        self.rows = 0
        self.complete = False

    def add(self, batch: Any, batch_idx: int) -> None:
        """Append a (micro-)batch (already copied to the device), weighted by its rows."""
        rows = batch_size(batch) or 1
        self.parts.append((batch, batch_idx, rows))
        self.rows += rows

    def close_after(self, accumulate_grad_batches: Any, available: float = math.inf) -> bool:
        """Mark the probe complete once it holds a whole optimizer step's micro-batches.

        Args:
            accumulate_grad_batches: micro-batches per optimizer step (None or 0 count as 1).
            available: batches an epoch has (a shorter epoch completes the probe sooner).

        Returns:
            Whether the probe is now complete.
        """
        micro_batches = max(int(accumulate_grad_batches or 1), 1)
        self.complete = len(self.parts) >= min(micro_batches, available)
        return self.complete

    def chunks(self, chunk_size: int | None) -> list[tuple[Any, int, float]]:
        """``(chunk, batch_idx, weight)``: every part cut into chunks of at most ``chunk_size`` rows.

        A chunk's weight is its share of all probe rows, so for mean-reduced losses
        ``sum weight * loss(chunk)`` is the mean loss over the whole probe.
        """
        return [
            (chunk, idx, weight * rows / self.rows)
            for probe, idx, rows in self.parts
            for chunk, weight in split_batch(probe, chunk_size)
        ]

    def losses(
        self, step_fn: Callable[[Any, int], Any], chunk_size: int | None, before: Callable[[], None]
    ) -> list[tuple[Callable[[], Tensor], float]]:
        """The ``(loss_fn, weight)`` pair of each chunk.

        ``loss_fn()`` calls ``before()`` (e.g. restore the RNG state) then ``step_fn(chunk, batch_idx)``
        and returns its loss (see :func:`loss_of`).
        """

        def closure(chunk: Any, idx: int) -> Callable[[], Tensor]:
            def loss() -> Tensor:
                before()
                return loss_of(step_fn(chunk, idx))

            return loss

        return [(closure(c, idx), w) for c, idx, w in self.chunks(chunk_size)]
