"""The README's recipe: docs/recipe.py runs as a complete training script, and the README's first
example is its recipe part, verbatim."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch

import steadystep as ss

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "docs" / "recipe.py"
MARKER = "# --- recipe ---\n"


def recipe_part() -> str:
    _, part, _ = RECIPE.read_text().split(MARKER)
    return part


def test_readme_leads_with_the_recipe():
    readme = (ROOT / "README.md").read_text()
    first_python = re.search(r"^```python\n(.*?)^```", readme, re.S | re.M)
    assert first_python is not None
    assert "import steadystep as ss" in first_python.group(1)
    assert first_python.group(1).endswith(recipe_part())
    # it comes right after the introduction, before any other section
    assert readme.index("```python") < readme.index("\n## ")


def code_lines(path: Path) -> int:
    """Lines of a script that are neither blank, comments, nor its module docstring."""
    import ast

    source = path.read_text()
    docstring_end = ast.parse(source).body[0].end_lineno or 0
    lines = source.splitlines()[docstring_end:]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def test_readme_states_the_scripts_length():
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"with evaluation and resuming: (\d+) lines of code", readme)
    assert stated is not None and int(stated.group(1)) == code_lines(RECIPE)


def test_recipe_script_trains_and_checkpoints_every_component(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        namespace = runpy.run_path(str(RECIPE), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    accuracy = float(re.search(r"accuracy ([0-9.]+)", printed).group(1))
    assert accuracy > 0.9  # a 4-class task: chance is 0.25
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    # the flat checkpoint (Note [flat checkpoints]): the guard's and the recipe's parts ride in
    # the first group, the per-parameter copies in the state
    assert {"state", "param_groups", "class"} <= set(state["opt"])
    assert {"stabilized", "guard"} <= set(state["opt"]["param_groups"][0])
    opt = namespace["opt"]
    assert int(opt.stats()["guard/steps"]) == 3 * len(namespace["loader"])
    if isinstance(opt.guard.detector, ss.PageHinkley):  # the sizes configured the detector
        assert pytest.approx(opt.guard.detector.rho) == 32 / 2048
