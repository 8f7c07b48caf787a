"""What a new user meets at the command line: --version, help that matches the code, warnings
for options that do nothing or cost days, one clear line when an optional package is missing,
and a summary that fits a terminal."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import steadystep
from steadystep import cli
from steadystep.experiments import EXPERIMENTS, get_experiment
from steadystep.experiments.runner import Settings

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"steadystep {steadystep.__version__}"


@pytest.mark.parametrize("command", ["demo", "reproduce"])
def test_help_lists_every_scale_and_the_seeds_each_experiment_runs(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for scale in ("tiny", "demo", "quick", "paper"):
        assert f"'{scale}':" in text, scale
        # the seeds each experiment runs at this scale, read from the plan itself
        m = re.search(rf"{scale}: ((?:\w+ \d+(?:, )?)+)", text)
        assert m, scale
        listed = dict(pair.split() for pair in m.group(1).split(", "))
        for name in EXPERIMENTS:
            plan = get_experiment(name).plan(Settings(scale=scale))
            assert int(listed[name]) == len({s.seed for s in plan}), (scale, name)


def test_data_dir_with_an_embedded_dataset_warns(tmp_path, capsys):
    code, _, err = _run_cli(
        [
            "reproduce",
            "alrc",
            "--scale",
            "tiny",
            "--device",
            "cpu",
            "--data-dir",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
        ],
        capsys,
    )
    assert code == 0
    assert "warning: --data-dir" in err and "is not read" in err and "crops" in err


def test_data_dir_with_a_real_dataset_does_not_warn(tmp_path, capsys):
    # a real dataset reads --data-dir: no warning (the missing files are the error instead)
    code, _, err = _run_cli(
        [
            "reproduce",
            "salera",
            "--scale",
            "tiny",
            "--device",
            "cpu",
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "run"),
        ],
        capsys,
    )
    assert code == 2
    assert "is not read" not in err


def test_paper_scale_on_a_cpu_warns_before_it_starts(tmp_path, capsys, monkeypatch):
    from steadystep.experiments import runner

    started = []

    def fake_prepare(*a, **k):  # the warning comes before any data is loaded
        started.append("prepare")
        raise KeyboardInterrupt

    monkeypatch.setattr(get_experiment("salera"), "prepare", fake_prepare)
    monkeypatch.setattr(runner, "run_all", lambda *a, **k: started.append("run"))
    with pytest.raises(KeyboardInterrupt):
        cli.main(
            ["reproduce", "salera", "--scale", "paper", "--device", "cpu", "--out", str(tmp_path)]
        )
    err = capsys.readouterr().err
    n_runs = len(get_experiment("salera").plan(runner.Settings(scale="paper", dataset="mnist")))
    assert started == ["prepare"]
    m = re.search(r"--scale paper on a CPU: (\d+) runs.*about ([\d.e+]+) floating-point", err)
    assert m, err
    assert int(m.group(1)) == n_runs
    assert float(m.group(2)) > 1e15  # the paper's grid is days of CPU at least
    assert re.search(r"roughly [\d.]+ (days|years)", err), err


def test_no_paper_warning_at_smaller_scales(tmp_path, capsys):
    code, _, err = _run_cli(
        ["reproduce", "alrc", "--scale", "tiny", "--device", "cpu", "--out", str(tmp_path)],
        capsys,
    )
    assert code == 0 and "--scale paper on a CPU" not in err


def test_summary_printed_at_the_end_fits_100_columns(tmp_path, capsys):
    code, out, _ = _run_cli(
        ["demo", "--scale", "tiny", "--device", "cpu", "--out", str(tmp_path)], capsys
    )
    assert code == 0
    assert "verdict" in out
    wide = [line for line in out.splitlines() if len(line) > 100]
    assert not wide, wide


_BLOCK_SKLEARN = (
    "import sys\n"
    "class _Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'sklearn' or name.startswith('sklearn.'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
    "sys.meta_path.insert(0, _Block())\n"
    "from steadystep.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_missing_optional_package_is_one_line_naming_the_extra(tmp_path):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCK_SKLEARN, "demo", "--scale", "tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "scikit-learn" in lines[0] and "pip install 'steadystep[exp]'" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


def test_missing_package_in_process(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    from steadystep.experiments import datasets

    monkeypatch.setattr(datasets._load_digits, "__wrapped__", datasets._load_digits.__wrapped__)
    datasets._load_digits.cache_clear()
    code, _, err = _run_cli(
        [
            "reproduce",
            "cprop",
            "--scale",
            "tiny",
            "--dataset",
            "digits",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    assert code == 2
    assert err.count("\n") == 1 and "scikit-learn" in err and "steadystep[exp]" in err


# --help, --version, a usage error and a missing RUN_DIR are answered from argparse and plain
# data: torch (seconds to import) and numpy stay unimported. Structural, not a wall-time bound.
_PARSE_ONLY = """
import sys
from steadystep.cli import main
for argv in (["--help"], ["--version"], ["demo", "--help"], ["reproduce", "--help"],
             ["report", "--help"], ["reproduce", "nope"], ["--bogus"], ["demo", "--seeds", "x"],
             ["reproduce", "alrc", "--scale", "huge"]):
    try:
        main(argv)
    except SystemExit as e:
        print("exit", e.code, *argv)
    else:
        raise AssertionError(f"{argv} did not exit")
print("exit", main(["report", sys.argv[1]]), "report")
loaded = [m for m in ("torch", "numpy") if m in sys.modules]
assert not loaded, f"imported {loaded}"
"""


def test_help_version_and_usage_errors_answer_without_importing_torch(tmp_path):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", _PARSE_ONLY, str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    codes = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("exit ")]
    assert codes == ["0"] * 5 + ["2"] * 5, proc.stdout
    assert "Traceback" not in proc.stderr


def test_the_package_exports_load_on_first_use():
    # `import steadystep` is light (the command's start-up), and every public name still resolves
    code = (
        "import sys, steadystep as ss\n"
        "assert 'torch' not in sys.modules\n"
        "import steadystep.stabilize\n"  # the submodule does not hide the function
        "assert ss.stabilize is sys.modules['steadystep.stabilize'].stabilize\n"
        "from steadystep import *\n"
        "assert all(hasattr(ss, n) and n in dir(ss) for n in ss.__all__)\n"
        "assert ss.optim.AgAdam is ss.AgAdam and ss.agnostic.__name__ == 'steadystep.agnostic'\n"
        "assert not hasattr(ss, 'no_such_name')\n"
    )
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
