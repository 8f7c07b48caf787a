"""The slow-fault benchmark (benchmarks/bench_escalation.py) at its --quick size: the JSON's
shape, the summary recomputed from the runs, and docs/ladder.md's tables rendered from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.tool_modules import render_docs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_the_quick_benchmark_writes_every_case_arm_and_the_ring_cost(tmp_path):
    import bench_escalation as bench

    results = bench.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "escalation.json").read_text())
    assert saved["command"].startswith("python benchmarks/bench_escalation.py --quick")
    assert {"torch", "python", "cpu_count", "date"} <= set(saved["machine"])
    settings = saved["settings"]
    assert settings["seeds"] == 1 and settings["quick"]
    assert set(settings["cases"]) == set(bench.CASES)
    edge = settings["edge"]
    assert edge["stable"] < edge["edge"] in bench.EDGE_GRID
    assert settings["cases"]["slow_divergence"]["lr"] == edge["edge"]

    # every case, with and without its fault, every arm, one seed
    cells = {(r["case"], r["fault"], r["arm"]) for r in saved["runs"]}
    assert cells == {(c, f, a) for c in bench.CASES for f in (True, False) for a in bench.ARMS}
    for r in saved["runs"]:
        assert r["val_loss"] is None or r["val_loss"] > 0
        if r["arm"] != "none":
            assert {"alarms", "skips", "rollbacks", "level_shifts"} <= set(r)
        if r["arm"] == "escalation":
            done = [h for h in r["escalations"] if h["restored_to"] is not None]
            assert r["steps_redone"] == sum(h["step"] - h["restored_to"] + 1 for h in done)
    # no fault, no alarm: the ring only copies, the run is the one-step guard's
    for r in saved["runs"]:
        if not r["fault"] and r["arm"] == "escalation" and r["alarms"] == 0:
            assert r["escalations"] == []
            assert saved["summary"][r["case"]]["clean"]["escalation"]["bitwise_guard"]
    # the stretch of x100 inputs escalates (the promise of tests/test_escalation.py, here too)
    assert saved["summary"]["inputs_x100"]["fault"]["escalation"]["escalations"] >= 1
    assert bench.summarize(saved["runs"]) == json.loads(json.dumps(results["summary"]))

    cost = saved["ring_cost"]
    assert set(cost["take"]) == {"None", '"cpu"', "a directory"}
    assert cost["take"]["a directory"]["bytes_per_snapshot"] == 0
    assert cost["take"]["a directory"]["bytes_on_disk_per_snapshot"] >= cost["live_bytes"]
    assert cost["take"]['"cpu"']["bytes_per_snapshot"] == cost["live_bytes"]
    assert all(row["median_seconds"] > 0 for row in cost["take"].values())
    assert cost["amortized_over_guard"] > 0

    render = render_docs()
    table = render.escalation(saved)
    assert all(f"`{case}`" in table for case in bench.CASES)
    assert "+ escalation" in table and "steps redone" in table
    assert "MiB in memory per snapshot" in render.escalation_cost(saved)
