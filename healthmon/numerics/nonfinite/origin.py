"""What the NaN/Inf origin finder reports: one :class:`Origin` and the :class:`OriginTrace` of a step."""

from __future__ import annotations

from dataclasses import dataclass, field

from healthmon.numerics.nonfinite.operations import TracedOp, display_name
from healthmon.numerics.nonfinite.values import kinds_text


@dataclass
class Origin:
    """Where the first NaN/Inf of a step came from.

    Attributes:
        phase: ``"forward"`` (an operation of the forward pass), ``"backward"`` (the derivative of a
            forward operation), ``"input"`` (a tensor that already held NaN/Inf before the step:
            the batch, a weight, a buffer) or ``"constant"`` (an infinite/NaN literal).
        op: the operation as the user wrote it (```torch.log```, ```/```, ```F.softmax```).
        where: the user's source line ``path/file.py:LINE`` (None when there is no such frame).
        module: the module whose forward was running (``"net.0 (Linear)"``), or None.
        cause: what about the inputs produced the NaN/Inf.
        hint: the fix.
        produced: the kinds of non-finite value produced (``{"NaN", "+inf", "-inf"}``).
        source: for ``phase="input"``: what held them (``batch[0]``, ``batch["x"]``, a parameter).
        source_kind: ``"batch"``, ``"parameter"``, ``"buffer"`` or ``"tensor"`` for inputs.
        samples: for a batch tensor: indices along dim 0 that hold NaN/Inf (at most ten).
        bad_samples: how many samples hold NaN/Inf, and ``batch_size`` how many there are.
        intended: an infinity put there on purpose (a mask); never reported while a real origin exists.
        then: what the value became downstream, when that is telling (``-inf`` turning into NaN).
        seq: the order of the operation in the step.
    """

    phase: str
    op: str
    where: str | None
    module: str | None
    cause: str
    hint: str
    produced: frozenset[str] = frozenset()
    source: str | None = None
    source_kind: str | None = None
    samples: list[int] = field(default_factory=list)
    bad_samples: int = 0
    batch_size: int = 0
    intended: bool = False
    then: str | None = None
    seq: int = 0

    @classmethod
    def at_op(
        cls,
        phase: str,
        op: TracedOp,
        cause: str,
        hint: str,
        produced: frozenset[str],
        *,
        intended: bool = False,
    ) -> Origin:
        """An origin at a traced operation, named as the user wrote it, at its line and module."""
        return cls(
            phase=phase,
            op=display_name(op.func),
            where=op.where,
            module=op.module,
            cause=cause,
            hint=hint,
            produced=produced,
            intended=intended,
            seq=op.seq,
        )

    def describe(self) -> str:
        """One paragraph for an alert message."""
        produced = kinds_text(self.produced)
        if self.phase == "input":
            return self.cause
        place = f" at {self.where}" if self.where else ""
        inside = f" (in {self.module})" if self.module else ""
        then = f" {self.then}" if self.then else ""
        if self.phase == "backward":
            return (
                f"The forward pass is finite; the first {produced} appears in the backward of "
                f"{self.op}{place}{inside}: {self.cause}{then}"
            )
        return f"The first {produced} of the step is produced by {self.op}{place}{inside}: {self.cause}{then}"


@dataclass
class OriginTrace:
    """What a traced step showed.

    Attributes:
        loss_finite: whether the replayed loss was finite (None when the step returned no loss).
        forward: the origin of the loss's NaN/Inf (or of the first real NaN/Inf when the loss
            carries no provenance), or None when the forward pass was finite.
        backward: the backward origin, when the forward was finite and the backward was not.
        grads_finite: whether the replayed gradients were finite (None when backward was not run).
        ops: operations traced; ``errors``: internal errors of the tracer (it never breaks a step).
    """

    loss_finite: bool | None
    forward: Origin | None
    backward: Origin | None
    grads_finite: bool | None
    ops: int
    errors: list[str]

    @property
    def origin(self) -> Origin | None:
        """The forward origin, else the backward origin, else None."""
        return self.forward or self.backward
