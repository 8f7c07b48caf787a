"""The ``steadystep`` command at a tiny scale: files written, results.json sound, report
rebuilt, Ctrl-C keeps finished runs, same seed gives the same results, clear errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

import steadystep
from steadystep import cli
from steadystep.experiments import EXPERIMENTS, get_experiment

HAS_CPROP = hasattr(steadystep, "CProp")


def _numbers(obj, path="$"):
    """Every number in a JSON tree, with its path."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


def _check_run_dir(out, experiments):
    for name in ("report.md", "results.json", "timings.json", "config.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"command", "settings", "experiments", "steadystep_version"}
    assert sorted(results["experiments"]) == sorted(experiments)
    for name in experiments:
        entry = results["experiments"][name]
        assert entry["status"] == "complete", entry.get("reason")
        assert entry["runs_finished"] == entry["runs_planned"] > 0
        assert entry["summary"]["claims"], name
        for c in entry["summary"]["claims"]:
            assert c["verdict"] in ("reproduced", "not reproduced", "inconclusive")
        for fig in entry["figures"]:
            assert (out / fig).is_file() and (out / fig).stat().st_size > 1000
            assert fig in (out / "report.md").read_text()
        csvs = sorted((out / "runs" / name).glob("*.csv"))
        jsons = sorted((out / "runs" / name).glob("*.json"))
        assert len(csvs) == len(jsons) == entry["runs_planned"]
        for run in entry["runs"]:
            for key, value in run["summary"].items():
                if isinstance(value, float):
                    assert math.isfinite(value) or key == "alarms", (name, run["run_id"], key)
    bad = [(p, v) for p, v in _numbers(results) if not math.isfinite(v)]
    assert not bad
    return results


def test_help_explains_every_option(capsys):
    for argv in (["--help"], ["demo", "--help"], ["reproduce", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--device", "--seeds", "--scale", "--data-dir", "--dataset", "RUN_DIR"):
        assert option in text
    assert "'tiny'" in text  # every scale the command accepts is in its help


def test_reproduce_alrc_and_report_rebuild(tmp_path, capsys):
    out = tmp_path / "alrc"
    assert (
        cli.main(["reproduce", "alrc", "--scale", "tiny", "--device", "cpu", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "ALRC, quartic errors" in printed and "report.md" in printed
    results = _check_run_dir(out, ["alrc"])
    table = results["experiments"]["alrc"]["summary"]["table"]
    assert set(table) == {"squared", "quartic"} and set(table["quartic"]) == {"3", "inf"}
    assert "(3.88)" in (out / "report.md").read_text()  # the paper's value beside ours
    before = (out / "results.json").read_text()
    for name in ("report.md", "results.json"):
        (out / name).unlink()
    shutil.rmtree(out / "figures")
    assert cli.main(["report", str(out)]) == 0
    assert (out / "results.json").read_text() == before
    assert (out / "figures" / "alrc_learning_curves.png").is_file()


def test_reproduce_salera(tmp_path):
    out = tmp_path / "salera"
    assert (
        cli.main(["reproduce", "salera", "--scale", "tiny", "--device", "cpu", "--out", str(out)])
        == 0
    )
    results = _check_run_dir(out, ["salera"])
    summary = results["experiments"]["salera"]["summary"]
    assert set(summary["best"]["M2"]) == {
        "NAG",
        "Adagrad",
        "Adam",
        "Ag-Adam",
        "ALeRA",
        "SALeRA",
        "SPALeRA",
    }
    assert summary["failures"]["ALeRA"]["runs"] == summary["failures"]["SALeRA"]["runs"] >= 1
    assert set(summary["failures"]["grid"]) == {"alpha", "C", "lr"}
    report = (out / "report.md").read_text()
    assert "Verdict rule:" in report and "SALeRA failed" in report
    assert (out / "figures" / "salera_fig1.png").is_file()


@pytest.mark.skipif(not HAS_CPROP, reason="steadystep.CProp has not landed")
def test_reproduce_cprop(tmp_path):
    out = tmp_path / "cprop"
    assert (
        cli.main(["reproduce", "cprop", "--scale", "tiny", "--device", "cpu", "--out", str(out)])
        == 0
    )
    results = _check_run_dir(out, ["cprop"])
    summary = results["experiments"]["cprop"]["summary"]
    assert set(summary["table"]["FC"]["Adam"]) == {"0.001", "0.003"}  # paper lr x 1, x 3
    assert set(summary["table"]["FC"]["Adam"]["0.001"]) == {"plain", "c=1", "c=3"}
    assert summary["best_lr"]["FC"]["Adam"] in {"0.001", "0.003"}
    assert summary["scale_stats"] is not None
    assert (out / "figures" / "cprop_scale_histogram.png").is_file()


def test_demo_is_deterministic(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert cli.main(["demo", "--scale", "tiny", "--device", "cpu", "--out", str(out)]) == 0
        runs.append((out / "results.json").read_text())
    assert runs[0] == runs[1]
    expected = [n for n in EXPERIMENTS if n != "cprop" or HAS_CPROP]
    results = _check_run_dir(tmp_path / "a", expected) if HAS_CPROP else json.loads(runs[0])
    assert results["command"] == "demo"
    if not HAS_CPROP:
        assert results["experiments"]["cprop"]["status"] == "unavailable"


def test_ctrl_c_keeps_finished_runs_and_resumes(tmp_path, monkeypatch):
    module = get_experiment("alrc")
    real_run = module.run
    calls = []

    def interrupted(spec, ctx):
        calls.append(spec.run_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run(spec, ctx)

    monkeypatch.setattr(module, "run", interrupted)
    out = tmp_path / "run"
    argv = ["reproduce", "alrc", "--scale", "tiny", "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 130
    results = json.loads((out / "results.json").read_text())
    entry = results["experiments"]["alrc"]
    assert entry["status"] == "partial" and entry["runs_finished"] == 2
    assert "Partial: 2 of 8 runs" in (out / "report.md").read_text()
    monkeypatch.setattr(module, "run", real_run)
    assert cli.main(argv) == 0  # continues: only the 6 missing runs
    assert (
        json.loads((out / "results.json").read_text())["experiments"]["alrc"]["status"]
        == "complete"
    )
    # Other settings into the same directory are refused.
    assert cli.main([*argv, "--seeds", "2"]) == 2


def test_clear_errors(tmp_path, capsys, monkeypatch):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a steadystep run directory" in capsys.readouterr().err
    argv = [
        "reproduce",
        "salera",
        "--scale",
        "tiny",
        "--dataset",
        "mnist",
        "--data-dir",
        str(tmp_path),
    ]
    assert cli.main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "MNIST/raw" in err
    assert not (tmp_path / "x").exists()
    assert (
        cli.main(["reproduce", "alrc", "--dataset", "mnist1d", "--out", str(tmp_path / "y")]) == 2
    )
    assert "crops" in capsys.readouterr().err
    assert cli.main(["demo", "--seeds", "0"]) == 2
    monkeypatch.setattr("steadystep.experiments.missing_api", lambda name: ["CProp"])
    assert cli.main(["reproduce", "cprop", "--scale", "tiny", "--out", str(tmp_path / "z")]) == 2
    assert "lacks CProp" in capsys.readouterr().err


def test_report_of_a_missing_path_names_the_argument_and_what_it_expects(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert cli.main(["report", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("steadystep report: error: argument RUN_DIR: ") and err.count("\n") == 1
    assert str(missing) in err and "does not exist" in err
    assert "--out directory" in err and "Monitor CSV" in err  # what it expects instead
    assert not missing.exists()  # nothing created


def test_tiny_scale_report_says_its_verdicts_decide_nothing(tmp_path, capsys):
    out = tmp_path / "alrc"
    argv = ["reproduce", "alrc", "--scale", "tiny", "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    note = "verdicts at scale tiny decide nothing"
    head = printed.split("\n\n")[0]
    assert note in " ".join(head.split()), printed  # first, above the verdicts
    report = (out / "report.md").read_text()
    assert note in report.split("| method |")[0]  # before the table of verdicts
    # at a real scale the same report carries no such note
    config = json.loads((out / "config.json").read_text())
    config["settings"]["scale"] = "demo"
    (out / "config.json").write_text(json.dumps(config))
    assert cli.main(["report", str(out)]) == 0
    assert note not in capsys.readouterr().out and note not in (out / "report.md").read_text()


def test_report_renders_a_directory_of_monitor_csvs(tmp_path, capsys):
    # what the README says: `steadystep report RUN_DIR` plots a Monitor CSV
    import torch

    import steadystep as ss
    from steadystep.telemetry import read_csv

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = ss.stabilize(torch.optim.AdamW(model.parameters(), lr=1e-2), guard=ss.PageHinkley(1.0))
    (tmp_path / "sub").mkdir()
    with ss.Monitor(("opt", opt), every=10, csv_path=tmp_path / "sub" / "train.csv") as monitor:
        for step in range(30):
            x = torch.randn(8, 4)
            per_sample = (model(x) - 1).pow(2).squeeze(1) * (100.0 if step == 20 else 1.0)
            loss = opt.clip(per_sample).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss=loss.detach())
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")  # not a Monitor CSV: ignored
    assert cli.main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert "sub/train.csv" in report and "30 rows, steps 0 to 29" in report
    assert "`opt/guard/rollbacks`" in report and "grew at steps" in report
    assert "notes.csv" not in report
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures and all(name.startswith("sub__train") for name in figures)
    assert all(f"figures/{name}" in report for name in figures)
    columns = read_csv(tmp_path / "sub" / "train.csv")
    assert all(f"`{column}`" in report for column in columns if column != "step")
    assert "opt/guard/alarms" in printed and "report.md" in printed  # a skipped batch
    # one file works too; a directory with neither a run nor a Monitor CSV is an error
    assert cli.main(["report", str(tmp_path / "sub" / "train.csv")]) == 0
    assert (tmp_path / "sub" / "train_report.md").is_file()
    (tmp_path / "sub" / "none").mkdir()
    assert cli.main(["report", str(tmp_path / "sub" / "none")]) == 2
    assert "holds no Monitor CSV" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Torn files and kills: every file the command writes is written atomically
# --------------------------------------------------------------------------------------------

ALRC_TINY = ["reproduce", "alrc", "--scale", "tiny", "--device", "cpu"]


def _mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "runs" / "alrc").glob("*.json")}


def test_torn_files_are_treated_as_missing_and_a_rerun_recovers(tmp_path, capsys):
    """A 0-byte config.json, a truncated run summary and a truncated results.json (what a
    kill during an in-place write, a full disk or a cut copy leaves) are reported and treated
    as missing: ``report`` says how to recover, a rerun rewrites config.json without redoing
    finished runs, redoes exactly the run whose summary is torn, and ``report`` works again."""
    out = tmp_path / "run"
    argv = [*ALRC_TINY, "--out", str(out)]
    assert cli.main(argv) == 0
    config = (out / "config.json").read_text()
    before = _mtimes(out)
    (out / ".config.json.x1.tmp").write_text("{")  # a temporary file a kill left behind
    capsys.readouterr()

    (out / "config.json").write_text("")
    assert cli.main(["report", str(out)]) == 2
    assert "torn" in capsys.readouterr().err
    assert cli.main(argv) == 0
    assert "torn" in capsys.readouterr().err
    assert (out / "config.json").read_text() == config
    assert _mtimes(out) == before  # nothing was run again
    assert not list(out.glob(".*.tmp"))

    torn = sorted(before)[3]
    path = out / "runs" / "alrc" / torn
    path.write_text(path.read_text()[:40])
    assert cli.main(["report", str(out)]) == 0
    assert torn in capsys.readouterr().err
    entry = json.loads((out / "results.json").read_text())["experiments"]["alrc"]
    assert entry["status"] == "partial" and entry["runs_finished"] == len(before) - 1
    assert cli.main(argv) == 0
    after = _mtimes(out)
    assert [n for n in before if after[n] != before[n]] == [torn]  # only the torn run redone

    results = (out / "results.json").read_text()
    (out / "results.json").write_text(results[: len(results) // 2])
    assert cli.main(["report", str(out)]) == 0
    assert (out / "results.json").read_text() == results
    _check_run_dir(out, ["alrc"])


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    from steadystep.experiments._files import atomic_write, write_text

    path = tmp_path / "results.json"
    write_text(path, '{"old": 1}\n')

    def crash(f):
        f.write('{"new": ')
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_text() == '{"old": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_the_rerun_completes_and_report_works(tmp_path):
    """The CLI in a subprocess, killed with SIGKILL three times at seeded random moments after
    it started writing; the same command then finishes the directory and ``steadystep report``
    rebuilds it (at ``--scale tiny``, one experiment, to stay within seconds)."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "steadystep.cli", *ALRC_TINY, "--out", str(out)]
    src = str(Path(steadystep.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not (out / "config.json").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the CLI did not start"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = subprocess.run(
        [sys.executable, "-m", "steadystep.cli", "report", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    _check_run_dir(out, ["alrc"])
    assert not list(out.rglob(".*.tmp"))
