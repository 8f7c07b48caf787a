"""Every ```python block of README.md and docs/*.md runs as written.

Blocks of one file run in order in one namespace, like a notebook, in a temporary working
directory, so a later block may use what an earlier one defined.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from tests.tool_modules import render_docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)], ids=lambda p: p.name)
def test_code_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for i, block in enumerate(python_blocks(path)):
        code = compile(block, f"{path.name}[block {i}]", "exec")
        exec(code, namespace)
    assert os.getcwd() == str(tmp_path)


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block


def test_generated_blocks_match_their_result_files(capsys):
    """Every table rendered from a result file (tools/render_docs.py) is what that file renders
    today: a number in the README or docs that drifts from its JSON fails here."""
    assert render_docs().main(["--check"]) == 0, capsys.readouterr().err


def test_a_drifted_number_is_caught(tmp_path, capsys):
    render = render_docs()
    for block in render.BLOCKS.values():
        for rel in (block.page, block.source):
            if not (ROOT / rel).is_file() and block.absent is not None:
                continue  # a result not written yet (step_gpu.json): the block says so
            target = tmp_path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((ROOT / rel).read_bytes())
    page = tmp_path / "docs" / "performance.md"
    text = page.read_text()
    begin = text.index("<!-- begin:speed-cpu -->")
    digit = next(i for i in range(begin, len(text)) if text[i].isdigit() and text[i] != "0")
    page.write_text(text[:digit] + "0" + text[digit + 1 :])  # one digit of one figure changed
    assert render.main(["--check"], root=tmp_path) == 1
    assert "speed-cpu" in capsys.readouterr().err
    assert render.main([], root=tmp_path) == 0  # rendering restores it
    assert page.read_text() == (ROOT / "docs" / "performance.md").read_text()


def test_docs_site_builds_without_warnings(tmp_path):
    """`make docs`: the mkdocs site with the API reference from the docstrings, strict (a
    broken link, an unknown cross-reference or a docstring griffe cannot read fails)."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "WARNING" not in output, output[-4000:]
    api = (tmp_path / "api" / "index.html").read_text()
    for name in ("stabilize", "CPropAdamW", "SALeRA", "CatastropheGuard", "SpikeDetector"):
        assert name in api
