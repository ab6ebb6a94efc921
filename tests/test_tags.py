"""healthmon/tags.py is the one home of every tag: the monitors and the README use no other.

``test_every_tag_literal_in_the_monitors_is_declared`` reads the monitors' source (no import):
no string literal starting with ``healthmon/`` (nor a constant or ``+`` expression built from
such literals) may appear in the monitors, the integrations or the engine: they take every tag
from ``healthmon.tags``, so renaming a tag there renames it everywhere.
"""

from __future__ import annotations

import ast
import glob
import os
import re

import pytest

from healthmon import tags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MONITORS = sorted(
    glob.glob(os.path.join(ROOT, "healthmon", "monitors", "*.py"))
    + glob.glob(os.path.join(ROOT, "healthmon", "integrations", "*.py"))
    + glob.glob(os.path.join(ROOT, "healthmon", "engine", "*.py"))
)


def _known() -> set[str]:
    families = [*tags.FAMILIES, *tags.GROUPS]
    return (
        set(tags.ALL_TAGS)
        | {f.prefix for f in families}
        | {f.pattern for f in families}
        | set(tags.PREFIXES)
        | {tags.OPTIMIZER_PATTERN}
    )


def _fold(node: ast.AST, names: dict[str, str]) -> str | None:
    """The string value of a literal, a known constant, or a ``+`` of those; else ``None``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _fold(node.left, names), _fold(node.right, names)
        return left + right if left is not None and right is not None else None
    return None


def tag_literals(source: str) -> set[str]:
    """Every tag-like string a module spells out: ``healthmon/...`` literals and what folds from them."""
    tree = ast.parse(source)
    docstrings = {
        id(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
    }
    names: dict[str, str] = {}
    for stmt in tree.body:  # module-level constants, in order (TAG_X = TAG + "x")
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            value = _fold(stmt.value, names)
            if value is not None:
                names[stmt.targets[0].id] = value
    found = {v for v in names.values() if v.startswith(tags.ROOT)}
    for node in ast.walk(tree):
        if id(node) in docstrings:
            continue
        value = _fold(node, names) if isinstance(node, (ast.Constant, ast.BinOp)) else None
        if value is not None and value.startswith(tags.ROOT):
            found.add(value)
        if isinstance(node, ast.JoinedStr) and len(node.values) >= 2:  # f"{TAG}lambda_{i}"
            head, text = node.values[0], node.values[1]
            if isinstance(head, ast.FormattedValue) and isinstance(text, ast.Constant):
                prefix = _fold(head.value, names)
                if prefix is not None and prefix.startswith(tags.ROOT):
                    found.add(prefix + str(text.value))
    return found


def test_the_scanner_finds_literals_constants_and_fstrings() -> None:
    source = (
        '"""Docstring about healthmon/loss."""\n'
        'TAG = "healthmon/hessian/"\n'
        'TAG_MAX = TAG + "lambda_max"\n'
        "def f(i, name):\n"
        '    """healthmon/not/a/tag in a docstring"""\n'
        '    return {f"{TAG}lambda_{i}": 1, "healthmon/grad/layer/" + name: 2, TAG + ".*": 3}\n'
    )
    assert tag_literals(source) == {
        "healthmon/hessian/",
        "healthmon/hessian/lambda_max",
        "healthmon/hessian/lambda_",
        "healthmon/grad/layer/",
        "healthmon/hessian/.*",
    }


@pytest.mark.parametrize("path", MONITORS, ids=os.path.basename)
def test_monitors_spell_out_no_tag(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        found = tag_literals(f.read())
    name = os.path.basename(path)
    assert not found, f"{name} spells out tags instead of taking them from healthmon/tags.py: {sorted(found)}"


def _readme_tags() -> list[str]:
    """The tags of the README's TensorBoard table, placeholders filled in."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        rows = [line for line in f if line.startswith("| `healthmon/")]
    out = []
    for row in rows:
        for token in re.findall(r"`(healthmon/[^`]+)`", row.split("|")[1]):
            token = token.replace("<k>", "1")
            token = re.sub(r"<[^>]+>", "x", token)
            match = re.search(r"\{([^}]+)\}", token)
            options = match.group(1).split(",") if match else [""]
            out += [token.replace(match.group(0), o) if match else token for o in options]
    return out


def test_every_tag_of_the_readme_table_is_declared() -> None:
    documented = _readme_tags()
    assert len(documented) >= 30 and tags.GRAD_NORM in documented
    assert [t for t in documented if not tags.is_known(t)] == []


def test_every_declared_tag_is_under_the_root_and_unique() -> None:
    families = [*tags.FAMILIES, *tags.GROUPS]
    assert all(t.startswith(tags.ROOT) for t in tags.ALL_TAGS | {f.prefix for f in families})
    assert len({f.prefix for f in families}) == len(families)
    for group in tags.GROUPS:  # a group is a folder of exact tags, each declared
        assert any(t.startswith(group.prefix) for t in tags.ALL_TAGS)


def test_families_and_optimizer_tags() -> None:
    assert tags.GRAD_LAYER("net.0") == "healthmon/grad/layer/net.0"
    assert tags.GRAD_LAYER.pattern == "healthmon/grad/layer/.*"
    assert tags.GRAD_LAYER.member("healthmon/grad/layer/net.0") == "net.0"
    assert tags.GRAD_LAYER.member("healthmon/grad/layer/") is None
    assert tags.HESSIAN_LAMBDA(2) == "healthmon/hessian/lambda_2"
    assert tags.optimizer_tag(tags.LOSS, 0) == "healthmon/loss"
    assert tags.optimizer_tag(tags.GRAD_NORM, 2) == "healthmon/optimizer_2/grad/norm"
    assert tags.optimizer_family(tags.GRAD_GROUP, 1)(0) == "healthmon/optimizer_1/grad/group/0"
    assert re.fullmatch(tags.OPTIMIZER_PATTERN, tags.optimizer_tag(tags.LOSS, 3))
    assert tags.is_known("healthmon/optimizer_1/grad/group/0") and tags.is_known(tags.ALERT_RECORDS)
    assert not tags.is_known("healthmon/optimizer_0/loss") and not tags.is_known("healthmon/grad/nrm")
