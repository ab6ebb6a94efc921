"""SourceLineFinder: the first frame outside torch, Lightning, healthmon and the stdlib is the user's."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import traceback

import attr  # a third-party package in site-packages: its files count as the user's
import pytest
import torch
from torch import nn

from healthmon.numerics import source_lines
from healthmon.numerics.source_lines import SKIPPED_PACKAGES, SourceLineFinder

THIS_FILE = os.path.realpath(__file__)


def _here() -> int:
    """The line number of the caller's current line."""
    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno


def _split(where: str | None) -> tuple[str, int]:
    assert where is not None
    path, _, line = where.rpartition(":")
    return os.path.realpath(path), int(line)


def _library_caller(filename: str):
    """A function whose code claims to live in ``filename``; it asks the finder for the user's line."""
    namespace: dict = {}
    code = compile("def call(finder):\n    return finder.caller(1)\n", filename, "exec")
    exec(code, namespace)
    return namespace["call"]


# ---- which files are skipped ------------------------------------------------------------------
@pytest.mark.parametrize(
    "module",
    [torch, torch.nn.modules.module, source_lines, json, inspect],
    ids=["torch", "torch.nn", "healthmon", "stdlib-json", "stdlib-inspect"],
)
def test_library_files_are_skipped(module) -> None:
    assert SourceLineFinder().is_skipped(module.__file__)


def test_lightning_files_are_skipped() -> None:
    import lightning_utilities

    assert SourceLineFinder().is_skipped(lightning_utilities.__file__)


@pytest.mark.parametrize("name", ["<string>", "<frozen importlib._bootstrap>", "<stdin>"])
def test_synthetic_files_are_skipped(name: str) -> None:
    assert SourceLineFinder().is_skipped(name)


def test_user_and_third_party_files_are_not_skipped() -> None:
    finder = SourceLineFinder()
    assert not finder.is_skipped(__file__)
    assert not finder.is_skipped(attr.__file__)  # site-packages lies inside the stdlib dir on some installs


def test_the_skipped_packages_are_an_argument() -> None:
    finder = SourceLineFinder(skipped_packages=("attr",))
    assert finder.is_skipped(attr.__file__)
    assert not finder.is_skipped(torch.__file__)
    assert finder.is_skipped(json.__file__)  # the stdlib is always skipped


def test_bad_skipped_packages_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"`skipped_packages`.*\[''\]"):
        SourceLineFinder(skipped_packages=("torch", ""))


def test_caches_belong_to_the_instance() -> None:
    a, b = SourceLineFinder(), SourceLineFinder(skipped_packages=())
    assert a.is_skipped(torch.__file__) and not b.is_skipped(torch.__file__)
    assert a.is_skipped(torch.__file__)  # b's verdict did not leak into a


# ---- finding the line -------------------------------------------------------------------------
def test_caller_names_this_line() -> None:
    where = SourceLineFinder().caller()
    assert _split(where) == (THIS_FILE, _here() - 1)


def test_caller_with_depth_names_the_line_that_called_the_helper() -> None:
    finder = SourceLineFinder()

    def helper() -> str | None:  # a helper in the user's file: depth 2 skips it
        return finder.caller(2)

    where = helper()
    assert _split(where) == (THIS_FILE, _here() - 1)


def test_the_module_keeps_no_shared_finder() -> None:
    state = [v for v in vars(source_lines).values() if isinstance(v, SourceLineFinder)]
    assert state == []


def test_caller_walks_past_library_frames() -> None:
    finder = SourceLineFinder()
    from_torch = _library_caller(torch.nn.modules.module.__file__)
    from_string = _library_caller("<string>")
    assert _split(from_torch(finder)) == (THIS_FILE, _here())
    assert _split(from_string(finder)) == (THIS_FILE, _here())


def test_caller_inside_a_module_forward_names_the_forward() -> None:
    finder = SourceLineFinder()
    lines: list[int] = []

    class Net(nn.Module):
        def forward(self, x: torch.Tensor) -> str | None:
            lines.append(_here() + 1)
            return finder.caller()

    where = Net()(torch.zeros(1))  # called through torch's Module.__call__
    assert _split(where) == (THIS_FILE, lines[0])


def test_all_frames_skipped_gives_none() -> None:
    # Under `python -c` every frame is "<string>": there is no user file to name.
    code = "from healthmon.numerics.source_lines import SourceLineFinder as F; print(repr(F().caller()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_from_frame_includes_the_given_frame() -> None:
    frame = inspect.currentframe()
    assert _split(SourceLineFinder().from_frame(frame)) == (THIS_FILE, _here())


def test_from_entries_reads_a_recorded_stack() -> None:
    finder = SourceLineFinder()
    stack = traceback.extract_stack()  # outermost first
    line = _here() - 1
    inner = [(torch.__file__, 10), ("<string>", 1)] + [(s.filename, s.lineno) for s in reversed(stack)]
    assert _split(finder.from_entries(inner)) == (THIS_FILE, line)
    assert finder.from_entries([(torch.__file__, 3), (json.__file__, 5)]) is None


# ---- how the line is shown --------------------------------------------------------------------
def test_path_is_relative_inside_the_working_directory(tmp_path, monkeypatch) -> None:
    finder = SourceLineFinder()
    (tmp_path / "project" / "pkg").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    script = tmp_path / "project" / "pkg" / "train.py"
    script.write_text("")
    monkeypatch.chdir(tmp_path / "project")
    assert finder.format(str(script), 7) == os.path.join("pkg", "train.py") + ":7"
    monkeypatch.chdir(tmp_path / "elsewhere")  # the same file, now outside the working directory
    assert finder.format(str(script), 7) == f"{os.path.realpath(script)}:7"


def test_interceptor_and_tracer_hold_a_finder_or_take_the_callers() -> None:
    from healthmon.numerics.logits import LogitsInterceptor
    from healthmon.numerics.nonfinite.tracer import NonFiniteTracer

    for make in (LogitsInterceptor, lambda **kw: NonFiniteTracer(**kw)):
        own = make()
        assert isinstance(own.source_lines, SourceLineFinder)
        assert own.source_lines.skipped_packages == SKIPPED_PACKAGES
        assert make().source_lines is not own.source_lines  # no state shared between windows
        finder = SourceLineFinder()
        assert make(source_lines=finder).source_lines is finder


def test_source_lines_is_pure_python() -> None:
    code = "import sys, healthmon.numerics.source_lines; sys.exit(1 if 'torch' in sys.modules else 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
