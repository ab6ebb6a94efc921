"""The ``TorchFunctionMode`` that watches a forward pass for unstable logits formulas.

While active it sees every call that goes through the torch function layer, looks each one up in
:data:`~healthmon.numerics.logits.table.RULES`, lets the rule judge the inputs, runs the call
untouched and tags the result with the kind the rule returned (provenance for the next call).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode

from healthmon.numerics.logits.rules import LogitsRules
from healthmon.numerics.logits.table import RULES


class LogitsInterceptor(LogitsRules, TorchFunctionMode):
    """A ``TorchFunctionMode`` that spots unstable logits formulas; results are never changed.

    Use it as a context manager around a forward pass (or ``__enter__``/``__exit__`` across hooks),
    then call :meth:`findings` once. A fresh instance per interception window keeps the
    provenance table short-lived; pass the caller's own
    :class:`~healthmon.numerics.source_lines.SourceLineFinder` as ``source_lines`` to keep its
    caches across windows.

    Args:
        source_lines: the finder naming the user's line of each finding (a fresh one when None).

    Attributes:
        checks: number of interesting calls (losses, softmax/log/exp/sum/division...) inspected.
        errors: internal errors of the rules (a rule that fails is skipped; the call still runs).
    """

    # -- dispatch ------------------------------------------------------------------------------
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        rule = RULES.get(func)
        if rule is None:
            return func(*args, **kwargs)
        kind: str | None = None
        try:
            kind = rule(self, args, kwargs)
        except Exception as exc:  # a rule must never break the user's step
            self.errors.append(f"{getattr(func, '__name__', func)}: {type(exc).__name__}: {exc}")
        out = func(*args, **kwargs)
        target = out[0] if isinstance(out, tuple) and out else out
        if isinstance(target, Tensor):
            if kind is not None:
                self._tags[target] = kind
            elif target in self._tags:  # an in-place op overwrote a tagged tensor
                del self._tags[target]
        return out
