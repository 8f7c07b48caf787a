"""Run a list of training runs, each writing its CSV log (a :class:`~steadystep.Monitor`) as it
goes and its JSON summary as soon as it ends.

Layout of a run directory::

    RUN_DIR/
      config.json            what was asked (command, experiments, scale, seeds, dataset, device)
      runs/<experiment>/<run_id>.csv   per-step log of one training run
      runs/<experiment>/<run_id>.json  its configuration and final numbers
      figures/*.png, report.md, results.json, timings.json   (written by ``report``)

A run whose JSON already exists is not run again, so an interrupted directory can be continued
by running the same command with the same ``--out``; ``steadystep report RUN_DIR`` rebuilds the
report from whatever runs have finished. Every file is written atomically and a torn one is
treated as missing (Note [atomic files] in :mod:`steadystep.experiments._files`).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from steadystep.experiments._files import read_json, write_text
from steadystep.telemetry import Monitor

__all__ = [
    "Experiment",
    "RunContext",
    "RunSpec",
    "Settings",
    "load_records",
    "run_all",
    "seed_everything",
]

_LOG_EVERY = 1000  # rows kept on the host between two writes of a run's CSV


@dataclass(frozen=True)
class Settings:
    """What the user asked for; saved as ``config.json`` in the run directory."""

    scale: str = "quick"
    seeds: int | None = None
    device: str = "cpu"
    data_dir: str | None = None
    dataset: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Settings:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


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


@dataclass
class RunContext:
    """What a running experiment may use: the device, a cache of loaded data, progress, and
    the per-step log of the run in progress (:meth:`log`)."""

    settings: Settings
    device: torch.device
    cache: dict[str, Any] = field(default_factory=dict)
    advance: Callable[[int], None] = lambda n: None
    log_path: Path | None = None  # the CSV of the run in progress (set by run_all)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def log(self) -> Monitor:
        """A :class:`~steadystep.Monitor` for the run in progress: each ``step(step=..., **row)``
        is one row of ``runs/<experiment>/<run_id>.csv`` (columns ``step``, then the keywords in
        the order first given; NaN where a row has no value), kept in ``history``. It logs no
        events (a run's log has NaN between evaluations and cuts its own learning rates)."""
        return Monitor(csv_path=self.log_path, every=_LOG_EVERY, events=False)


class Experiment(Protocol):
    """One paper's reproduction. Implemented by the packages in ``steadystep.experiments``
    (running in ``<name>/running.py``, reporting in ``<name>/reporting.py``)."""

    name: str  # as in steadystep.experiments.EXPERIMENTS and the run directory
    title: str  # the report's section heading
    requires: tuple[str, ...]  # public steadystep names it uses (missing_api)

    def plan(self, settings: Settings) -> list[RunSpec]:
        """The runs of this experiment at ``settings`` (ValueError for a dataset it cannot
        use)."""
        ...

    def prepare(self, specs: list[RunSpec], ctx: RunContext) -> None:
        """Load what ``specs`` need into ``ctx.cache`` now, so a missing file fails before any
        run (DatasetNotFoundError)."""
        ...

    def flops(self, spec: RunSpec) -> float:
        """A rough count of the floating-point operations of one run
        (:mod:`steadystep.experiments.estimate`)."""
        ...

    def run(self, spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
        """Train one run; its per-step rows go to ``ctx.log()``; returns its summary (the
        numbers of ``runs/<experiment>/<run_id>.json``)."""
        ...

    def summarize(self, records: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
        """The experiment's tables and claims from its finished runs (``results.json``)."""
        ...

    def figures(
        self, summary: dict[str, Any], records: list[dict[str, Any]], run_dir: Path
    ) -> list[str]:
        """Write the figures under ``run_dir / "figures"``; returns their paths."""
        ...

    def markdown(self, summary: dict[str, Any], figures: list[str], run_dir: Path) -> str:
        """The experiment's section of ``report.md``."""
        ...

    def terminal(self, summary: dict[str, Any]) -> str:
        """What the command prints of it."""
        ...


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random for one run (each run starts from the same state)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - for third-party code that uses it
    random.seed(seed)


def run_paths(run_dir: Path, spec: RunSpec) -> tuple[Path, Path]:
    folder = run_dir / "runs" / spec.experiment
    return folder / f"{spec.run_id}.csv", folder / f"{spec.run_id}.json"


def _finished(json_path: Path) -> dict[str, Any] | None:
    """The JSON summary of a finished run; None when it is missing or torn (said on stderr:
    the run counts as not finished, Note [atomic files] in ``experiments._files``)."""
    record = read_json(json_path)
    if record is None:
        return None
    if not isinstance(record, dict) or not {"run_id", "summary"} <= record.keys():
        print(
            f"steadystep: warning: {json_path} is not a run summary: treated as missing",
            file=sys.stderr,
        )
        return None
    return record


def load_records(run_dir: Path, experiment: str) -> list[dict[str, Any]]:
    """Every finished run of ``experiment`` in ``run_dir``, sorted by run id (a torn summary
    is left out, with a warning)."""
    folder = Path(run_dir) / "runs" / experiment
    if not folder.is_dir():
        return []
    records = []
    for path in sorted(folder.glob("*.json")):
        rec = _finished(path)
        if rec is None:
            continue
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

    Runs already finished in ``run_dir`` are skipped (a torn summary is run again).
    KeyboardInterrupt propagates after the current run's partial state is dropped (finished
    runs stay on disk).
    """
    todo: list[tuple[Experiment, RunSpec]] = []
    n_done_before = 0
    for exp, specs in experiments:
        for spec in specs:
            if _finished(run_paths(run_dir, spec)[1]) is not None:
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
            ctx.log_path = csv_path
            seed_everything(spec.seed)
            start = time.perf_counter()
            try:
                summary = exp.run(spec, ctx)
            finally:
                ctx.log_path = None
                if bar is not None:
                    bar.close()
            wall = time.perf_counter() - start
            record = {
                "experiment": spec.experiment,
                "run_id": spec.run_id,
                "seed": spec.seed,
                "config": spec.config,
                "summary": summary,
                "wall_s": wall,  # kept out of results.json (see report.py)
            }
            # Write the JSON last and atomically: its presence marks the run as finished.
            write_text(
                json_path, json.dumps(record, indent=1, sort_keys=True, default=_json_default)
            )
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
