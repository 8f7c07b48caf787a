"""The structure the project keeps: the guard and the optimizers side by side on the contract
layer (steadystep.compose), private modules private, modules of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "steadystep"
MAX_LINES = 600


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _imports(path: Path) -> list[str]:
    """Every module an ``import`` / ``from ... import`` in ``path`` names (absolute imports)."""
    tree = ast.parse(path.read_text())
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _package(path: Path) -> str:
    return ".".join(("steadystep", *path.relative_to(SRC).with_suffix("").parts))


def test_nothing_outside_optim_imports_a_private_optim_module():
    offenders = []
    for path in _modules():
        here = _package(path)
        if here.startswith("steadystep.optim"):
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[:2] == ["steadystep", "optim"] and any(
                p.startswith("_") and not p.startswith("__") for p in parts[2:-1]
            ):
                offenders.append(f"{here} imports {name}")
            # a private module imported by name: from steadystep.optim import _alera_core
            if parts[:2] == ["steadystep", "optim"] and parts[-1].startswith("_"):
                if (SRC / Path(*parts[1:])).with_suffix(".py").exists():
                    offenders.append(f"{here} imports {name}")
    assert offenders == []


@pytest.mark.parametrize(
    "module", ["guard", "_guard_decision", "_guard_checkpoint", "salera", "detectors", "compose"]
)
def test_the_guard_side_stands_on_the_contract_layer_not_on_optim_internals(module):
    """guard.py and the detectors import the contract layer (steadystep.compose), never an
    optimizer's module (SALeRA composes ALeRA by its public class)."""
    paths = [SRC / f"{module}.py"] if (SRC / f"{module}.py").exists() else []
    paths += sorted((SRC / module).rglob("*.py")) if (SRC / module).is_dir() else []
    assert paths
    allowed = (
        {"steadystep.optim.alera", "steadystep.optim.alera.ALeRA"} if module == "salera" else set()
    )
    for path in paths:
        optim = [n for n in _imports(path) if n.startswith("steadystep.optim")]
        assert set(optim) <= allowed, (path.name, optim)


def test_the_contract_layer_imports_no_component():
    """compose/ is below the guard, the optimizers, stabilize and the detectors."""
    for path in sorted((SRC / "compose").rglob("*.py")):
        for name in _imports(path):
            assert not name.startswith(
                (
                    "steadystep.guard",
                    "steadystep.optim",
                    "steadystep.stabilize",
                    "steadystep.detectors",
                )
            ), (path.name, name)


def test_the_lazy_export_table_matches_the_type_checking_imports_and_all():
    """Note [lazy exports]: the name -> module table, the TYPE_CHECKING imports and __all__
    list the same public names, each from the same module."""
    tree = ast.parse((SRC / "__init__.py").read_text())
    table: dict[str, str] = {}
    typed: dict[str, str] = {}
    listed: list[str] = []
    for node in tree.body:
        target = getattr(node.targets[0], "id", None) if isinstance(node, ast.Assign) else None
        if target == "_EXPORTS":
            table = ast.literal_eval(node.value)
        if target == "__all__":
            listed = ast.literal_eval(node.value)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for imp in node.body:
                for alias in imp.names:
                    typed[alias.name] = imp.module
    submodules = {name for name, module in typed.items() if module == "steadystep"}
    assert {k: v for k, v in typed.items() if k not in submodules} == table
    assert sorted(listed) == sorted(set(table) | submodules)


def test_no_module_is_over_600_lines():
    long = {
        str(p.relative_to(SRC)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
