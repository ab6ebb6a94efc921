"""What importing healthmon loads.

`import healthmon.numerics` never imports Lightning or TensorBoard; healthmon.report and
healthmon.tags never import torch, Lightning, TensorBoard or matplotlib; the top level loads lazily.
"""

from __future__ import annotations

import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import healthmon.numerics
import healthmon.report

HEAVY = ("pytorch_lightning", "lightning", "tensorboard", "torch.utils.tensorboard")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_numerics_are_pure_torch() -> None:
    names = [m.name for m in pkgutil.iter_modules(healthmon.numerics.__path__)]
    assert "gradients" in names and "trends" in names
    stmt = "; ".join(f"import healthmon.numerics.{n}" for n in names)
    loaded = _loaded_after(stmt)
    assert not [m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY]


def test_the_offline_side_is_light() -> None:
    """The CLI's modules load no Lightning, no torch; TensorBoard and matplotlib only when used."""
    names = [m.name for m in pkgutil.iter_modules(healthmon.report.__path__)]
    assert {"reader", "schema", "events", "charts", "html"} <= set(names)
    stmt = "; ".join(f"import healthmon.report.{n}" for n in names) + "; import healthmon.tags, healthmon.cli"
    loaded = _loaded_after(stmt)
    heavy = (*HEAVY, "torch", "matplotlib")
    assert not [m for m in loaded if m.split(".")[0] in heavy or m in heavy]


def test_top_level_import_is_lazy() -> None:
    loaded = _loaded_after("import healthmon; healthmon.Alert; healthmon.NumericalHealthError")
    assert "pytorch_lightning" not in loaded and "torch" not in loaded
    loaded = _loaded_after("import healthmon; healthmon.HealthMonitor")
    assert "pytorch_lightning" in loaded


def test_public_names() -> None:
    import healthmon

    for name in ("HealthMonitor", "Alert", "NumericalHealthError", "GradientNormMonitor", "NonFiniteMonitor"):
        assert getattr(healthmon, name).__name__ == name


def test_only_the_hf_integration_imports_transformers() -> None:
    """``transformers`` is an optional extra: no healthmon module but the HF callback imports it.

    Lightning itself loads parts of ``transformers`` when it is installed; healthmon's modules
    must load nothing of it (nor of ``accelerate``) beyond what Lightning does.
    """
    import healthmon

    names = [
        m.name
        for m in pkgutil.walk_packages(healthmon.__path__, "healthmon.")
        if m.name != "healthmon.integrations.hf"
    ]
    assert "healthmon.cli" in names and "healthmon.monitors.health" in names
    loaded = _loaded_after(f"import importlib; [importlib.import_module(n) for n in {names!r}]")
    assert "healthmon.monitors.health" in loaded
    baseline = _loaded_after("import pytorch_lightning, torch.utils.tensorboard")
    extra = [m for m in loaded - baseline if m.split(".")[0] in ("transformers", "accelerate")]
    assert not extra, f"healthmon imports {extra[:5]}"
    for name in names:  # and no module names them in an import
        source = Path(importlib.util.find_spec(name).origin or "").read_text()
        assert "import transformers" not in source and "from transformers" not in source, name
    top = _loaded_after("import healthmon; healthmon.Alert")
    assert not [m for m in top if m.split(".")[0] == "transformers"]
