"""Run a list of training runs, each writing its CSV log and JSON summary as soon as it ends.

Layout of a run directory::

    RUN_DIR/
      config.json            what was asked (command, experiments, scale, seeds, dataset, device)
      runs/<experiment>/<run_id>.csv   per-step log of one training run
      runs/<experiment>/<run_id>.json  its configuration and final numbers
      figures/*.png, report.md, results.json, timings.json   (written by ``report``)

A run whose JSON already exists is not run again, so an interrupted directory can be continued
by running the same command with the same ``--out``; ``steadystep report RUN_DIR`` rebuilds the
report from whatever runs have finished.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "Experiment",
    "RunContext",
    "RunLog",
    "RunSpec",
    "Settings",
    "load_records",
    "run_all",
    "seed_everything",
]

SCALES = ("tiny", "demo", "quick", "paper")


@dataclass(frozen=True)
class Settings:
    """What the user asked for; saved as ``config.json`` in the run directory."""

    scale: str = "quick"
    seeds: int | None = None
    device: str = "cpu"
    data_dir: str | None = None
    dataset: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "seeds": self.seeds,
            "device": self.device,
            "data_dir": self.data_dir,
            "dataset": self.dataset,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Settings:
        return cls(**{k: d.get(k) for k in ("scale", "seeds", "device", "data_dir", "dataset")})


@dataclass(frozen=True)
class RunSpec:
    """One training run: which experiment, a unique id, its configuration and seed.

    ``cost`` is a relative amount of work (used to weigh the overall progress bar / ETA);
    ``steps`` is the number of optimizer steps (the per-run progress bar).
    """

    experiment: str
    run_id: str
    config: dict[str, Any]
    seed: int
    steps: int
    cost: float = 1.0


class RunLog:
    """Collects per-step rows of one run and writes them as CSV."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self.rows: list[list[float]] = []

    def append(self, **values: float) -> None:
        self.rows.append([float(values.get(c, math.nan)) for c in self.columns])

    def column(self, name: str) -> list[float]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def write(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.columns)
            for r in self.rows:
                w.writerow([_fmt(v) for v in r])


def _fmt(v: float) -> str:
    # repr round-trips floats exactly, so a report rebuilt from CSV equals the live one.
    if not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if v == int(v) and abs(v) < 2**53:
        return str(int(v))
    return repr(v)


def read_csv(path: Path) -> dict[str, np.ndarray]:
    """A run's CSV as a dict of float64 columns."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [[float(x) for x in r] for r in reader]
    data = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(header))
    return {name: data[:, i] for i, name in enumerate(header)}


@dataclass
class RunContext:
    """What a running experiment may use: the device, a cache of loaded data, progress."""

    settings: Settings
    device: torch.device
    cache: dict[str, Any] = field(default_factory=dict)
    advance: Callable[[int], None] = lambda n: None

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


class Experiment(Protocol):
    """One paper's reproduction. Implemented by the modules in ``steadystep.experiments``."""

    name: str
    title: str
    requires: tuple[str, ...]

    def plan(self, settings: Settings) -> list[RunSpec]: ...

    def run(self, spec: RunSpec, ctx: RunContext) -> tuple[RunLog, dict[str, Any]]: ...

    def summarize(self, records: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]: ...

    def figures(
        self, summary: dict[str, Any], records: list[dict[str, Any]], run_dir: Path
    ) -> list[str]: ...

    def markdown(self, summary: dict[str, Any], figures: list[str], run_dir: Path) -> str: ...

    def terminal(self, summary: dict[str, Any]) -> str: ...


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random for one run (each run starts from the same state)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - for third-party code that uses it
    random.seed(seed)


def run_paths(run_dir: Path, spec: RunSpec) -> tuple[Path, Path]:
    folder = run_dir / "runs" / spec.experiment
    return folder / f"{spec.run_id}.csv", folder / f"{spec.run_id}.json"


def load_records(run_dir: Path, experiment: str) -> list[dict[str, Any]]:
    """Every finished run of ``experiment`` in ``run_dir``, sorted by run id."""
    folder = Path(run_dir) / "runs" / experiment
    if not folder.is_dir():
        return []
    records = []
    for path in sorted(folder.glob("*.json")):
        with open(path) as f:
            rec = json.load(f)
        rec["csv_path"] = str(path.with_suffix(".csv"))
        records.append(rec)
    return records


def _progress(total: float, desc: str, unit: str, position: int, leave: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - the exp extra provides it
        return None
    try:
        width = os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        width = 0
    # disable=None: bars only when stderr is a terminal (CI logs stay clean). A pseudo-terminal
    # that reports 0 columns (script, some IDEs) would get empty bars: give it 100.
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        position=position,
        leave=leave,
        disable=None,
        file=sys.stderr,
        dynamic_ncols=width > 0,
        ncols=None if width > 0 else 100,
    )


def _say(msg: str) -> None:
    try:
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(msg, file=sys.stderr)


def run_all(
    experiments: Iterable[tuple[Experiment, list[RunSpec]]],
    run_dir: Path,
    ctx: RunContext,
) -> dict[str, float]:
    """Run every pending spec; returns the wall time of each run (by ``experiment/run_id``).

    Runs already finished in ``run_dir`` are skipped. KeyboardInterrupt propagates after the
    current run's partial state is dropped (finished runs stay on disk).
    """
    todo: list[tuple[Experiment, RunSpec]] = []
    n_done_before = 0
    for exp, specs in experiments:
        for spec in specs:
            if run_paths(run_dir, spec)[1].exists():
                n_done_before += 1
            else:
                todo.append((exp, spec))
    if n_done_before:
        _say(f"{n_done_before} run(s) already finished in {run_dir}; running the other {len(todo)}")
    timings: dict[str, float] = {}
    overall = _progress(sum(s.cost for _, s in todo), "overall", "work", 0, True)
    try:
        for i, (exp, spec) in enumerate(todo, 1):
            csv_path, json_path = run_paths(run_dir, spec)
            csv_path.parent.mkdir(parents=True, exist_ok=True)
            bar = _progress(spec.steps, f"{spec.experiment}/{spec.run_id}", "step", 1, False)

            def advance(n: int, bar: Any = bar) -> None:
                if bar is not None:
                    bar.update(n)

            ctx.advance = advance
            seed_everything(spec.seed)
            start = time.perf_counter()
            try:
                log, summary = exp.run(spec, ctx)
            finally:
                if bar is not None:
                    bar.close()
            wall = time.perf_counter() - start
            log.write(csv_path)
            record = {
                "experiment": spec.experiment,
                "run_id": spec.run_id,
                "seed": spec.seed,
                "config": spec.config,
                "summary": summary,
                "wall_s": wall,  # kept out of results.json (see report.py)
            }
            # Write the JSON last and atomically: its presence marks the run as finished.
            tmp = json_path.with_suffix(".json.tmp")
            with open(tmp, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True, default=_json_default)
            tmp.replace(json_path)
            key = f"{spec.experiment}/{spec.run_id}"
            timings[key] = wall
            if overall is not None:
                overall.update(spec.cost)
            brief = ", ".join(
                f"{k}={_short(v)}" for k, v in summary.items() if isinstance(v, (int, float))
            )
            _say(f"[{i}/{len(todo)}] {key} ({wall:.1f}s) {brief}")
    finally:
        if overall is not None:
            overall.close()
    return timings


def _short(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
