"""Traced operations: how the user wrote each call, and the record the explanations read.

An origin is named the way the user wrote it (```torch.log```, ```/``` (div), ```F.softmax```,
```Tensor.sqrt```), and :class:`TracedOp` keeps what is needed to explain it later: its
source line, the module running it, its arguments (for the operations whose backward is
explained) and the operations that made its inputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

_OPERATORS = {
    "add": "+",
    "radd": "+",
    "iadd": "+=",
    "sub": "-",
    "rsub": "-",
    "isub": "-=",
    "mul": "*",
    "rmul": "*",
    "imul": "*=",
    "truediv": "/",
    "rtruediv": "/",
    "rdiv": "/",  # torch names Tensor.__rtruediv__ "__rdiv__"
    "itruediv": "/=",
    "pow": "**",
    "rpow": "**",
    "ipow": "**=",
    "matmul": "@",
    "rmatmul": "@",
}


def raw_name(func: Any) -> str:
    """The name torch reports for a function, method or operator (``__rtruediv__``, ``log_``)."""
    return str(getattr(func, "__name__", None) or getattr(func, "name", None) or func)


def base_name(func: Any) -> str:
    """``__rtruediv__`` -> ``rtruediv``, ``log_`` -> ``log``, ``softmax`` -> ``softmax``."""
    name = raw_name(func)
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return name.removeprefix("linalg_")


_ARITH = {
    "add": "+",
    "sub": "-",
    "rsub": "-",
    "mul": "*",
    "div": "/",
    "true_divide": "/",
    "pow": "**",
    "matmul": "@",
}


def display_name(func: Any) -> str:
    """How a user wrote the call: ```torch.log```, ```F.softmax```, ```/``` (div), ```Tensor.sqrt```."""
    raw = raw_name(func)
    name = base_name(func)
    qualname = str(getattr(func, "__qualname__", "") or "")
    module = str(getattr(func, "__module__", "") or "")
    if raw.startswith("__") and name in _OPERATORS:
        return f"`{_OPERATORS[name]}` ({name})"
    if raw.startswith("linalg_"):
        return f"`torch.linalg.{raw.removeprefix('linalg_')}`"
    if module.startswith(("torch.nn.functional", "torch._C._nn")):
        return f"`F.{raw}`"
    if qualname.startswith(("TensorBase.", "Tensor.")):
        if name in _ARITH:
            return f"`{_ARITH[name]}` ({name})"
        return f"`Tensor.{raw}`"
    return f"`torch.{raw}`"


def is_inplace(func: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> bool:
    """Whether the call overwrites its first argument.

    ``x.log_()``, ``x /= y``, ``x[i] = v``, and the ``torch.nn.functional`` calls given
    ``inplace=True``, by keyword or by position (``nn.ReLU(inplace=True)`` calls
    ``F.relu(x, inplace=True)``, ``nn.Dropout`` calls ``F.dropout(x, p, training, inplace)``).
    """
    raw = raw_name(func)
    if (
        raw == "__setitem__"
        or (raw.startswith("__i") and raw.endswith("__"))
        or (raw.endswith("_") and not raw.endswith("__"))
    ):
        return True
    if kwargs and kwargs.get("inplace") is True:
        return True
    index = _inplace_position(func)
    return index is not None and len(args) > index and args[index] is True


_INPLACE_POSITION: dict[Any, int | None] = {}


def _inplace_position(func: Any) -> int | None:
    """The position of a Python function's ``inplace`` parameter (None: it has none); cached."""
    try:
        return _INPLACE_POSITION[func]
    except (KeyError, TypeError):
        pass
    position = None
    code = getattr(func, "__code__", None)  # torch.nn.functional's Python functions; not builtins
    if code is not None:
        names = code.co_varnames[: code.co_argcount]
        position = names.index("inplace") if "inplace" in names else None
    with contextlib.suppress(TypeError):  # an unhashable callable is looked up each time
        _INPLACE_POSITION[func] = position
    return position


@dataclass
class TracedOp:
    """A traced operation: enough to explain its backward later."""

    seq: int
    func: Any
    name: str
    where: str | None
    module: str | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    parents: list[TracedOp | None]


def argument(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str) -> Any:
    """The ``i``-th positional argument of a call, or the keyword ``name``."""
    return args[i] if len(args) > i else kwargs.get(name)
