"""The report's figures and words: curves that coincide are found and marked, every panel has
a legend (where it has curves) and a y-label, a partial experiment says so in the summary table,
and the CProp histogram's caption states a fact that holds."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import math
import shutil

import numpy as np
import pytest
import torch

import steadystep as ss
from steadystep import cli
from steadystep.experiments import EXPERIMENTS
from steadystep.experiments._common import VERDICTS, mark_overlaps, overlaps, plt


def test_overlaps_finds_coinciding_curves_only():
    x = np.arange(10.0)
    a = np.linspace(1, 2, 10)
    curves = {"A": (x, a), "B": (x, a * (1 + 1e-4)), "C": (x, a * 1.5)}
    assert overlaps(curves) == [("A", "B")]
    assert overlaps({"A": (x, a), "C": (x, a * 1.5)}) == []
    # a curve that diverges (NaN) where the other does not is not hidden under it
    b = a.copy()
    b[5:] = np.nan
    assert overlaps({"A": (x, a), "B": (x, b)}) == []
    fig, ax = plt().subplots()
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label)
    notes = mark_overlaps(ax, curves)
    assert notes == ["A is under B (the curves coincide; dashed)"]
    assert [ln.get_linestyle() for ln in ax.get_lines()][-1] == "--"
    assert any("A is under B" in t.get_text() for t in ax.texts)
    plt().close(fig)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["demo", "--scale", "tiny", "--device", "cpu", "--out", str(out)]) == 0
    return out


def test_every_panel_has_a_y_label_and_a_legend(tiny_demo, monkeypatch):
    from steadystep.experiments.report import build_report

    figures = []
    for name in EXPERIMENTS:
        reporting = importlib.import_module(f"steadystep.experiments.{name}.reporting")
        original = reporting.save

        def keep(fig, path, original=original):
            figures.append((path.name, fig.axes))
            return original(fig, path)

        monkeypatch.setattr(reporting, "save", keep)
    with contextlib.redirect_stdout(io.StringIO()):
        build_report(tiny_demo)
    assert len(figures) >= 6
    for name, axes in figures:
        for ax in axes:
            assert ax.get_ylabel(), (name, ax.get_title())
            curves = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
            if curves:
                assert ax.get_legend() is not None, (name, ax.get_title())


def test_a_partial_experiment_says_so_in_the_summary_table(tiny_demo, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_demo, run)
    gone = sorted((run / "runs" / "salera").glob("*.json"))[0]
    gone.unlink()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli.main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    table = report.split("\n## ", 1)[0]  # the summary table, before the first section
    planned = len(list((tiny_demo / "runs" / "salera").glob("*.json")))
    salera_rows = [line for line in table.splitlines() if line.startswith("| salera")]
    assert salera_rows
    for row in salera_rows:
        assert f"(partial: {planned - 1} of {planned} runs)" in row
    assert not any("partial" in line for line in table.splitlines() if "| alrc" in line)
    assert "partial" in out.getvalue()  # the terminal table too
    for word, meaning in VERDICTS.items():
        assert f"**{word}**: {meaning}" in report


def test_single_gradient_elements_share_one_scale_as_the_caption_says():
    """The CProp histogram caption: an element whose gradient was non-zero at step 1 only has a
    scale that depends on the step alone (not on the gradient), erf(x / sqrt 2) with
    x^2 = w (n_t - 1) / (1 - w)."""
    from steadystep.experiments.cprop.reporting import HISTOGRAM_CAPTION

    beta = 0.999
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ss.CProp(torch.optim.SGD([p], lr=0.1), beta=beta, c=1.0, eps=1e-8)
    for t in range(1, 501):
        p.grad = torch.tensor([0.5, -3.0, 0.05]) if t == 1 else torch.zeros(3)
        opt.step()
        if t in (125, 500):
            w = (1 - beta) * beta ** (t - 1) / (1 - beta**t)
            n = (1 - beta**t) / (1 - beta)
            expected = math.erf(math.sqrt(w * (n - 1) / (1 - w) / 2))
            s = opt.scales()[p]
            # one value for all three gradients; the float64 formula within float32 EMA rounding
            assert (s.max() - s.min()).item() < 1e-4, s  # bins are 0.025 wide
            assert abs(s.mean().item() - expected) < 5e-4, (t, s, expected)
            assert f"{expected:.2f} at step {t}" in HISTOGRAM_CAPTION


def test_demo_docs_copy_holds_no_clock_and_links_its_figures(tiny_demo, tmp_path):
    """tools/demo_docs.py (make demo-docs): the committed copy of a demo run."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("demo_docs", root / "tools" / "demo_docs.py")
    demo_docs = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = demo_docs
    try:
        spec.loader.exec_module(demo_docs)
    finally:
        del sys.modules[spec.name]
    written = demo_docs.copy_demo(tiny_demo, root=tmp_path)
    report = (tmp_path / "docs" / "demo" / "report.md").read_text()
    assert "Compute time" in (tiny_demo / "report.md").read_text()
    assert "Compute time" not in report
    links = [line for line in report.splitlines() if line.startswith("![")]
    assert links and all("](../figures/" in line for line in links)
    for line in links:
        target = line.split("](", 1)[1].rstrip(")")
        assert (tmp_path / "docs" / "demo" / target).resolve().is_file(), target
    results = tmp_path / "docs" / "demo" / "results.json"
    assert results.read_bytes() == (tiny_demo / "results.json").read_bytes()
    assert str(tiny_demo) not in results.read_text()  # no absolute path of the run
    again = demo_docs.copy_demo(tiny_demo, root=tmp_path)
    assert again == written
