"""The whole-step benchmark (benchmarks/bench_step.py --quick): it runs every arm on every CPU
model and writes a result that docs/performance.md's step tables render from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_step  # noqa: E402


@pytest.mark.slow
def test_quick_run_writes_every_model_and_arm(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        bench_step.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the benchmark runs on one thread
    result = json.loads((tmp_path / "step.json").read_text())
    assert result["benchmark"] == "step"
    assert result["settings"]["quick"] is True
    assert result["machine"]["device"] == "cpu"
    assert [r["model"] for r in result["results"]] == ["mlp-40k", "char-lm", "mlp-8m"]
    for r in result["results"]:
        assert r["plain_ms"] > 0 and r["n_params"] > 0 and r["tensors"] > 0
        assert r["baseline"].startswith(bench_step.PLAIN)
        assert sorted(r["rows"]) == sorted(bench_step.ARMS[1:])  # every arm but the baseline
        for arm, row in r["rows"].items():
            assert row["ms"] > 0 and row["ratio"] > 0
            if arm in (bench_step.GUARD, bench_step.RECIPE):
                assert row["target"] == bench_step.TARGETS[r["model"]]
                assert row["met"] == (row["ratio"] <= row["target"])
                assert isinstance(row["host_us"], float)
            else:
                assert row["target"] is None and row["met"] is None and row["host_us"] is None


def test_step_tables_render_a_result_and_say_not_run_without_one(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    import render_docs

    results = json.loads((ROOT / "benchmarks" / "results" / "step.json").read_text())
    text = render_docs.step(results)
    for r in results["results"]:
        assert f"**{r['model']}**" in text
    block = render_docs.BLOCKS["step-gpu"]
    assert render_docs.rendered("step-gpu", block, root=tmp_path).startswith("Not run")
