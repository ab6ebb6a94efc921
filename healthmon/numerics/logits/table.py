"""The table of interesting torch functions: which rule of :class:`LogitsRules` judges each one.

Every spelling of an operation goes through the torch function layer as its own callable
(``torch.exp``, ``Tensor.exp``, ``Tensor.exp_``, ``torch.special.*``), so each rule is listed
under all of them. Functions not in :data:`RULES` are handed through without a look.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from healthmon.numerics.logits.rules import LogitsRules
from healthmon.numerics.views import CASTS_AND_VIEWS

Rule = Callable[[LogitsRules, tuple[Any, ...], dict[str, Any]], "str | None"]


def _funcs(torch_names: tuple[str, ...] = (), tensor_names: tuple[str, ...] = (), extra: tuple = ()) -> list:
    """The callables named: ``torch.*``/``torch.special.*`` functions, ``Tensor`` methods, ``extra``."""
    found: list[Any] = list(extra)
    for name in torch_names:
        for namespace in (torch, torch.special):
            if hasattr(namespace, name):
                found.append(getattr(namespace, name))
    for name in tensor_names:
        for cls in (torch.Tensor, torch._C.TensorBase):
            if hasattr(cls, name):
                found.append(getattr(cls, name))
    return found


def _build_rules() -> dict[Any, Rule]:
    """Map every callable of every spelling to its rule."""
    L = LogitsRules
    table: list[tuple[list[Any], Rule]] = [
        (
            _funcs(
                tensor_names=(
                    *CASTS_AND_VIEWS,
                    "detach",
                    "bfloat16",
                    "type",
                    "view_as",
                    "reshape_as",
                    "t",
                    "clamp_max",
                    "__getitem__",
                ),
                torch_names=("clamp_max", "reshape", "flatten", "squeeze"),
            ),
            L._pass,
        ),
        (
            _funcs(
                ("clamp", "clip", "clamp_min"),
                ("clamp", "clamp_", "clamp_min", "clamp_min_", "clip", "clip_"),
            ),
            L._clamp,
        ),
        (_funcs(("relu", "relu_"), ("relu", "relu_"), (F.relu,)), L._relu),
        ([F.hardtanh], L._hardtanh),
        ([F.relu6], L._relu6),
        (
            _funcs(
                ("add", "mul", "multiply"),
                ("add", "add_", "__add__", "__radd__", "__iadd__", "mul", "mul_", "__mul__", "__rmul__"),
            ),
            L._arith,
        ),
        (_funcs(("rsub",), ("__rsub__",)), L._rsub),
        (_funcs(("sub", "subtract"), ("sub", "sub_", "subtract", "__sub__", "__isub__")), L._sub),
        (_funcs(("max", "amax", "logsumexp"), ("max", "amax", "logsumexp")), L._max),
        (_funcs(("softmax",), ("softmax",), (F.softmax,)), L._softmax),
        (_funcs(("sigmoid", "expit"), ("sigmoid", "sigmoid_"), (F.sigmoid,)), L._sigmoid),
        (_funcs(("log_softmax",), ("log_softmax",), (F.log_softmax,)), L._log_softmax),
        (_funcs(("log",), ("log", "log_")), L._log),
        (_funcs(("exp",), ("exp", "exp_")), L._exp),
        (_funcs(("sum",), ("sum",)), L._sum),
        (
            _funcs(
                ("div", "divide", "true_divide"),
                ("div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__"),
            ),
            L._div,
        ),
        ([F.cross_entropy], L._cross_entropy),
        ([F.nll_loss], L._nll_loss),
        ([F.kl_div], L._kl_div),
        ([F.binary_cross_entropy_with_logits, torch.binary_cross_entropy_with_logits], L._bce_with_logits),
        ([F.binary_cross_entropy], L._bce),
    ]
    rules: dict[Any, Rule] = {}
    for funcs, rule in table:
        for f in funcs:
            rules[f] = rule
    return rules


#: torch callable -> the rule that judges it.
RULES: dict[Any, Rule] = _build_rules()
