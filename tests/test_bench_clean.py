"""The clean-run benchmark (benchmarks/bench_clean.py): its machinery at a tiny size, and the
table arithmetic (best lr, basin, paired relative gain) on hand-made numbers."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from clean.report import basin, best_lr, relative_gain, summarize, tables  # noqa: E402


def test_best_lr_takes_the_best_mean_and_counts_a_diverged_seed_as_worst():
    acc = {0.001: {0: 0.80, 1: 0.82}, 0.003: {0: 0.86, 1: 0.84}, 0.01: {0: 0.95, 1: None}}
    assert best_lr(acc, higher=True) == (0.003, pytest.approx(0.85))
    loss = {0.001: {0: 1.0, 1: 1.2}, 0.003: {0: 0.9, 1: 0.9}, 0.01: {0: 0.5, 1: None}}
    assert best_lr(loss, higher=False) == (0.003, pytest.approx(0.9))
    tie = {0.1: {0: 0.5}, 0.01: {0: 0.5}}
    assert best_lr(tie, higher=True)[0] == 0.01  # ties: the smaller lr


def test_basin_is_the_widest_run_of_consecutive_lrs_within_one_percent():
    # best any arm reached: 0.90; within 1%: >= 0.891
    cells = {
        0.001: {0: 0.85},
        0.003: {0: 0.895},
        0.006: {0: 0.90},
        0.01: {0: 0.892},
        0.03: {0: 0.80},  # breaks the run
        0.1: {0: 0.899},
    }
    assert basin(cells, 0.90, higher=True) == pytest.approx(0.01 / 0.003)
    assert basin({0.1: {0: 0.5}}, 0.9, higher=True) == 0.0  # none within
    assert basin({0.1: {0: 0.9}, 0.3: {0: 0.1}}, 0.9, higher=True) == 1.0  # a single lr
    # a lower-is-better metric: within 1% means at most 1.01 x the best
    losses = {0.001: {0: 1.005, 1: 1.0}, 0.003: {0: 1.0, 1: 1.0}, 0.01: {0: 1.05, 1: 1.0}}
    assert basin(losses, 1.0, higher=False) == pytest.approx(3.0)
    assert basin({0.01: {0: None}}, 1.0, higher=False) == 0.0  # a diverged run is out


def test_relative_gain_is_paired_over_seeds_and_signed_so_that_plus_is_better():
    plain = {0: 0.80, 1: 0.90, 2: 1.00}
    arm = {0: 0.81, 1: 0.90, 2: 1.02}  # +1, 0, +2 points over a mean of 0.90
    gain, se, n = relative_gain(arm, plain, higher=True)
    diffs = [0.01 / 0.9, 0.0, 0.02 / 0.9]
    assert n == 3
    assert gain == pytest.approx(sum(diffs) / 3)
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert se == pytest.approx(sd / math.sqrt(3))
    # the same numbers as losses: higher is worse, so the gain flips sign
    assert relative_gain(arm, plain, higher=False)[0] == pytest.approx(-gain)
    # only the common seeds are paired; a diverged run gives no number
    assert relative_gain({0: 0.9}, plain, higher=True)[2] == 1
    assert relative_gain({0: None, 1: 0.9}, plain, higher=True)[0] is None


def test_the_benchmark_runs_at_a_tiny_size_and_its_tables_come_from_the_runs(tmp_path):
    import bench_clean

    out = tmp_path / "results"
    results = bench_clean.main(
        [
            "--quick",
            "--tasks",
            "mnist1d_mlp",
            "--optimizers",
            "adamw",
            "--arms",
            "guard",
            "stabilize",
            "--seeds",
            "2",
            "--steps-scale",
            "0.05",
            "--no-extras",
            "--jobs",
            "1",
            "--no-docs",
            "--out",
            str(out),
        ]
    )
    saved = json.loads((out / "clean.json").read_text())
    assert saved["command"].startswith("python benchmarks/bench_clean.py --quick")
    assert {"torch", "python", "cpu_count"} <= set(saved["machine"])
    arms = {r["arm"] for r in saved["runs"]}
    assert arms == {"plain", "guard", "stabilize"}
    for r in saved["runs"]:
        assert r["steps"] == max(10, round(0.05 * bench_clean.STEPS["mnist1d_mlp"]))
        assert r["task"] == "mnist1d_mlp"
        assert r["metric"] is None or 0.0 <= r["metric"] <= 1.0
        if r["arm"] != "plain":
            assert {"alarms", "rollbacks", "lr_scale", "nonfinite_grads"} <= set(r["stats"])
    # the summary and the tables are recomputed from the runs alone
    assert summarize(saved) == json.loads(json.dumps(results["summary"]))
    key = "mnist1d_mlp/adamw/warmup_cosine/none"
    best = saved["summary"][key]["plain_best_lr"]
    assert best in {r["lr"] for r in saved["runs"] if r["arm"] == "guard"}  # on the arms' grid
    text = tables(saved)
    assert "MNIST-1D MLP" in text and "**Basin**" in text
