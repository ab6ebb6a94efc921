"""healthmon.numerics.logits.table: every spelling of an interesting function reaches its rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from healthmon.numerics.logits.rules import LogitsRules
from healthmon.numerics.logits.table import RULES


def test_each_spelling_maps_to_the_same_rule() -> None:
    assert RULES[torch.exp] is RULES[torch.Tensor.exp] is LogitsRules._exp
    assert RULES[F.softmax] is RULES[torch.softmax] is LogitsRules._softmax
    assert RULES[torch.Tensor.__truediv__] is RULES[torch.div] is LogitsRules._div
    assert RULES[F.cross_entropy] is LogitsRules._cross_entropy
    assert RULES[F.binary_cross_entropy_with_logits] is LogitsRules._bce_with_logits


def test_every_rule_is_a_method_of_the_rules_and_plain_ops_are_not_listed() -> None:
    assert all(getattr(LogitsRules, rule.__name__) is rule for rule in RULES.values())
    assert torch.matmul not in RULES and torch.Tensor.__matmul__ not in RULES
