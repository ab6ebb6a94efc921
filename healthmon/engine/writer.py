"""Writer: the small protocol every output of a run goes through (TensorBoard today).

The driver never names a file format: it hands scalars, texts and the custom-scalars layout to a
writer, which one integration opens (the Lightning ``Trainer``'s ``TensorBoardLogger``, a
``SummaryWriter`` the user passes to :func:`healthmon.watch`, the Hugging Face ``logging_dir``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Writer(Protocol):
    """Where a run's scalars and texts go. ``log_dir`` is where the report is written beside."""

    log_dir: str

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Write several scalars of one step."""

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        """Write the distribution of ``values`` (finite values only)."""

    def text(self, tag: str, text: str, step: int) -> None:
        """Write a text (alerts, configuration)."""

    def layout(self, layout: Mapping[str, Mapping[str, list[Any]]]) -> None:
        """Write the custom-scalars layout: {category: {chart: ["Multiline", [tags]]}}."""

    def flush(self) -> None:
        """Make what was written visible to readers."""

    def close(self) -> None:
        """Flush and release what the writer opened (not what the user passed in)."""
