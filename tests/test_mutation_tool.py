"""The mutation-testing tool (tools/mutation.py): which mutants it makes, and that a run on a
small fake project kills, keeps and times out the right ones without touching the project."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "mutation.py"


@pytest.fixture(scope="module")
def mutation():
    spec = importlib.util.spec_from_file_location("mutation_tool_under_test", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


SNIPPET = '''\
"""Docstring with 1 + 2 in it."""
from typing import TYPE_CHECKING

import torch

__all__ = ["f"]
Alias = int | None

if TYPE_CHECKING:
    X = 1 + 2


def f(x: int = 1, *, y: float = 0.5) -> torch.Tensor:
    """Another docstring."""
    if x is None or not y:
        raise ValueError(f"bad x={x + 1}")
    z = torch.where(x > 0, -x, x ** 2)
    z.add_(torch.clamp(z, min=0.0))
    z = torch.minimum(z, ~z) & z
    return z
'''


def test_operators_and_skipped_code(mutation):
    mutants = mutation.generate_mutants(SNIPPET)
    ops = {(m.line, m.operator) for m in mutants}
    expected = {
        (13, "Const(1->0)"),
        (13, "Const(1->2)"),
        (13, "Const(0.5->1.0)"),
        (15, "Is->IsNot"),
        (15, "Or->And"),
        (15, "Not-del"),
        (17, "where-swap"),
        (17, "Gt->GtE"),
        (17, "Gt->LtE"),
        (17, "Const(0->1)"),
        (17, "USub-del"),
        (17, "Pow->Mult"),
        (17, "Const(2->3)"),
        (18, "Del-add_"),
        (18, "kw-min->max"),
        (18, "Const(0.0->1.0)"),
        (19, "minimum->maximum"),
        (19, "Invert-del"),
        (19, "BitAnd->BitOr"),
        (20, "Return-None"),
    }
    assert ops == expected  # nothing from docstrings, __all__, the alias, TYPE_CHECKING, raise
    for m in mutants:
        line, col, op = m.id.split(":", 2)
        assert (int(line), op) == (m.line, m.operator) and int(col) >= 1
        tree = ast.parse(m.source)
        assert ast.dump(tree) != ast.dump(ast.parse(SNIPPET))
        assert len(m.source.splitlines()) == len(SNIPPET.splitlines())  # lines keep their numbers
    # stable ids, one-line diffs
    assert [m.id for m in mutation.generate_mutants(SNIPPET)] == [m.id for m in mutants]
    where = next(m for m in mutants if m.operator == "where-swap")
    assert where.diff == (
        "z = torch.where(x > 0, -x, x ** 2)  -->  z = torch.where(x > 0, x ** 2, -x)"
    )
    drop = next(m for m in mutants if m.operator == "Del-add_")
    assert drop.diff == "z.add_(torch.clamp(z, min=0.0))  -->  pass"


def test_precedence_is_kept_by_parentheses(mutation):
    # Swapping the first & of a & b & c must give (a | b) & c, not a | (b & c).
    (m,) = [m for m in mutation.generate_mutants("r = a & b & c\n") if m.id == "1:7:BitAnd->BitOr"]
    assert m.diff == "r = a & b & c  -->  r = (a | b) & c"


FAKE_MODULE = """\
def clamp_add(a, b, hi):
    s = a + b
    if s > hi:
        return hi
    return s


def spin(n):
    i = 0
    while i < n:
        i += 2
    return i


def untested(x):
    return x * 3
"""

FAKE_TESTS = """\
from fakepkg.mod import clamp_add, spin


def test_clamp_add():
    assert clamp_add(1, 2, 10) == 3
    assert clamp_add(5, 6, 10) == 10


def test_spin():
    assert spin(4) == 4
"""


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_run_on_a_fake_project(tmp_path):
    project = tmp_path / "project"
    (project / "src" / "fakepkg").mkdir(parents=True)
    (project / "tests").mkdir()
    (project / "src" / "fakepkg" / "__init__.py").write_text("")
    (project / "src" / "fakepkg" / "mod.py").write_text(FAKE_MODULE)
    (project / "tests" / "test_mod.py").write_text(FAKE_TESTS)
    equivalents = tmp_path / "equivalent.json"
    entries = [
        {
            "id": "3:10:Gt->GtE",
            "diff": "if s > hi:  -->  if s >= hi:",
            "reason": "at s == hi both branches return the same value",
        },
        {"id": "99:1:Add->Sub", "diff": "gone  -->  gone", "reason": "an entry whose code left"},
    ]
    equivalents.write_text(json.dumps({"src/fakepkg/mod.py": entries}))
    before = _snapshot(project)
    out = tmp_path / "results" / "mod.json"
    cmd = [sys.executable, str(TOOL), "--module", "src/fakepkg/mod.py"]
    cmd += ["--tests", "tests/test_mod.py", "--root", str(project), "--timeout", "8", "--jobs", "2"]
    cmd += ["--equivalents", str(equivalents), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _snapshot(project) == before  # the project was never written to

    report = json.loads(out.read_text())
    status = {m["id"]: m["status"] for m in report["mutants"]}
    assert status == {
        "2:11:Add->Sub": "killed",
        "3:10:Gt->GtE": "equivalent",
        "3:10:Gt->LtE": "killed",
        "4:9:Return-None": "killed",
        "5:5:Return-None": "killed",
        "9:9:Const(0->1)": "killed",
        "10:13:Lt->LtE": "killed",
        "10:13:Lt->GtE": "killed",
        "11:11:Add->Sub": "timeout",  # i -= 2 never ends: a hang counts as detected
        "11:14:Const(2->3)": "killed",
        "12:5:Return-None": "killed",
        "16:5:Return-None": "survived",
        "16:14:Mult->Div": "survived",
        "16:16:Const(3->4)": "survived",
    }
    assert report["summary"] == {
        "total": 14,
        "killed": 9,
        "timeout": 1,
        "survived": 3,
        "equivalent": 1,
        "score": round(100 * 10 / 13, 2),
    }
    assert report["stale_equivalents"] == ["99:1:Add->Sub"]
    # only the tests that run a mutant's lines: test_spin never runs for clamp_add's mutants
    by_id = {m["id"]: m for m in report["mutants"]}
    assert by_id["2:11:Add->Sub"]["killed_by"] == "tests/test_mod.py::test_clamp_add"
    assert by_id["2:11:Add->Sub"]["tests_run"] == 1
    assert "16:14:Mult->Div" in res.stdout and "x * 3  -->  return x / 3" in res.stdout
