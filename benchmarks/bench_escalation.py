"""Slow-fault benchmark: trouble that takes several steps, against no guard, the one-step guard
and the guard with escalation (``ss.Escalation``: a ring of snapshots and data to skip).

One command, embedded data, a few minutes on 2 CPU cores (``--quick``: well under a minute)::

    python benchmarks/bench_escalation.py --out benchmarks/results   # the full run
    python benchmarks/bench_escalation.py --quick --out /tmp/esc      # a smoke run

The cases (``CASES``), each run with and without its fault, for every arm and seed:

* ``inputs_x100``: a 20-64-10 MLP learns a teacher's labels (AdamW 1e-2, batch 32); 20 global
  batches from 70% of the run on come with their inputs x100 (a stretch of bad data);
* ``labels_shuffled``: the same run, the same 20 batches with their labels shuffled;
* ``silent_layer``: a LeNet-like CNN with BatchNorm on scikit-learn's 8x8 digits (AdamW 1e-3);
  at 53% of the run the second conv layer's weights are multiplied by 30. BatchNorm normalizes
  the layer's output again, so the training loss need not move: a fault the loss may not show;
* ``slow_divergence``: the teacher MLP with SGD (momentum 0.9), linear warm-up over the first
  third of the run to ``lr_edge``, the smallest lr of a grid (``EDGE_GRID``) at which the plain
  run's training loss (its ``EDGE_WINDOW``-step moving mean) climbs above where it started, on
  the mean over seeds (found here, first, by plain runs; reported). Its fault-free run is the
  same schedule at the grid point below (the largest stable lr).

Runs are 300 steps (``--quick``: 180, one seed, a smaller model for the ring's cost).

The arms: ``none`` (the plain optimizer), ``guard`` (``ss.CatastropheGuard(opt, model=model)``)
and ``escalation`` (the same with ``escalation=ss.Escalation(every=25, keep=2,
sampler=sampler)``); every arm draws its batches through ``ss.SkippableSampler`` as the
DataLoader's ``batch_sampler`` (the same order for all), so only the escalation skips any.

Reported per case and arm (means over seeds): the final validation loss and its ratio to the
fault-free plain run of the same seed, the guard's alarms, skipped steps, rollbacks and level
shifts, the escalations and the compute they wasted (per escalation: its step minus the restored
snapshot's step, plus the dropped step), the batches skipped; the clean side: the same runs
without their fault, with the escalation arm's final loss over the one-step guard's.

Then the ring's cost (``ring_cost``), for an MLP of about 8M parameters with AdamW: bytes per
snapshot (``Escalation.nbytes() / keep``), the median time of one ``take`` beside the tensors
(``snapshot_device=None``), in host memory (``"cpu"``) and on disk (a temporary directory), and
a guarded step without the ring, with the ring and no snapshot due, and with a snapshot every
step, amortized to ``every=50``.

Writes ``<out>/escalation.json``; ``python tools/render_docs.py`` renders its tables into
``docs/ladder.md``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import steadystep as ss  # noqa: E402
from common import machine_info, time_interleaved_samples, write_result  # noqa: E402

ARMS = ("none", "guard", "escalation")
ESCALATION = {"every": 25, "keep": 2}  # the escalation arm's settings (skip_ahead etc. default)
# Where the faults fall, as fractions of the run (300 steps; --quick: 180): the stretch's first
# global batch (20 of them), the silent layer's step, the slow divergence's warm-up.
STRETCH_AT, STRETCH_LENGTH = 0.7, 20
SILENT_AT, SILENT_FACTOR = 0.53, 30.0
WARMUP_FRACTION = 1 / 3
EDGE_GRID = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7)  # SGD lrs searched for the edge
EDGE_WINDOW = 10  # the training loss's moving mean: unstable when it climbs above its start
BATCH = 32


# -- tasks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    train: TensorDataset
    x_val: torch.Tensor
    y_val: torch.Tensor


def teacher_data() -> Data:
    """4096 Gaussian inputs labelled by a random 20-32-10 tanh teacher (512 held out), as in
    tests/test_escalation.py."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 20, generator=g)
    torch.manual_seed(123)
    teacher = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10))
    with torch.no_grad():
        y = teacher(2 * x).argmax(1)
    return Data(TensorDataset(x[:-512], y[:-512]), x[-512:], y[-512:])


def digits_data() -> Data:
    from steadystep.experiments.datasets import load_classification

    data = load_classification("digits").standardized(per="global")
    return Data(TensorDataset(data.x_train, data.y_train), data.x_test, data.y_test)


def teacher_model() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))


def digits_model() -> nn.Module:
    from steadystep.experiments.models import LeNetLike

    return LeNetLike((1, 8, 8), 10, (16, 32, 64, 32))


TASKS: dict[str, tuple[Callable[[], Data], Callable[[], nn.Module]]] = {
    "teacher_mlp": (teacher_data, teacher_model),
    "digits_cnn_bn": (digits_data, digits_model),
}
_DATA: dict[str, Data] = {}


def data_of(task: str) -> Data:
    if task not in _DATA:
        _DATA[task] = TASKS[task][0]()
    return _DATA[task]


# -- faults --------------------------------------------------------------------------------------


def stretch(steps: int) -> range:
    """The corrupted global batches of a run of ``steps``."""
    start = round(STRETCH_AT * steps)
    return range(start, start + STRETCH_LENGTH)


def silent_step(steps: int) -> int:
    return round(SILENT_AT * steps)


def warmup(steps: int) -> int:
    return round(WARMUP_FRACTION * steps)


Batch = tuple[torch.Tensor, torch.Tensor]


def _inputs_x100(index: int, x: torch.Tensor, y: torch.Tensor, steps: int) -> Batch:
    return (x * 100.0, y) if index in stretch(steps) else (x, y)


def _labels_shuffled(index: int, x: torch.Tensor, y: torch.Tensor, steps: int) -> Batch:
    if index not in stretch(steps):
        return x, y
    g = torch.Generator().manual_seed(index)
    return x, y[torch.randperm(len(y), generator=g)]


def _silent_layer(step: int, model: nn.Module, steps: int) -> None:
    if step == silent_step(steps):
        with torch.no_grad():
            model.features[4].weight.mul_(SILENT_FACTOR)  # the second conv, before BatchNorm


@dataclass(frozen=True)
class Case:
    task: str
    optimizer: str  # "adamw" or "sgd" (momentum 0.9, linear warm-up over the first third)
    lr: float | str  # "edge": found by edge_search
    steps: int
    describe: str
    batch_fault: Callable[[int, torch.Tensor, torch.Tensor, int], Batch] | None = None
    model_fault: Callable[[int, nn.Module, int], None] | None = None


CASES = {
    "inputs_x100": Case(
        "teacher_mlp",
        "adamw",
        1e-2,
        300,
        "20 global batches from 70% of the run on: inputs x100",
        batch_fault=_inputs_x100,
    ),
    "labels_shuffled": Case(
        "teacher_mlp",
        "adamw",
        1e-2,
        300,
        "20 global batches from 70% of the run on: labels shuffled",
        batch_fault=_labels_shuffled,
    ),
    "silent_layer": Case(
        "digits_cnn_bn",
        "adamw",
        1e-3,
        300,
        f"at 53% of the run: the second conv layer's weights x{SILENT_FACTOR:g} (BatchNorm after)",
        model_fault=_silent_layer,
    ),
    "slow_divergence": Case(
        "teacher_mlp",
        "sgd",
        "edge",
        300,
        "SGD (momentum 0.9), warm-up over the first third of the run to the smallest unstable lr",
    ),
}


# -- one run -------------------------------------------------------------------------------------


def _optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def run(case: str, arm: str, seed: int, *, fault: bool, lr: float, steps: int) -> dict[str, Any]:
    """One training run; returns its final validation loss and the guard's counters."""
    spec = CASES[case]
    data = data_of(spec.task)
    torch.manual_seed(seed)
    model = TASKS[spec.task][1]()
    inner = _optimizer(spec.optimizer, model, lr)
    sampler = ss.SkippableSampler(len(data.train), batch_size=BATCH, seed=seed)
    opt: Any = inner
    if arm == "guard":
        opt = ss.CatastropheGuard(inner, model=model)
    elif arm == "escalation":
        ring = ss.Escalation(**ESCALATION, sampler=sampler)
        opt = ss.CatastropheGuard(inner, model=model, escalation=ring)
    schedule = (
        torch.optim.lr_scheduler.LambdaLR(inner, lambda s: min(1.0, (s + 1) / warmup(steps)))
        if spec.optimizer == "sgd"
        else None
    )
    diverged: dict[str, Any] | None = None
    losses: list[float] = []  # the plain run's training losses (the edge search reads them)
    start = time.perf_counter()
    step = 0
    model.train()
    while step < steps and diverged is None:
        for x, y in DataLoader(data.train, batch_sampler=sampler):
            index = sampler.position - 1
            if fault and spec.batch_fault is not None:
                x, y = spec.batch_fault(index, x, y, steps)
            if fault and spec.model_fault is not None:
                spec.model_fault(step, model, steps)
            loss = F.cross_entropy(model(x), y)
            if arm == "none":
                losses.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            try:
                if arm == "none":
                    opt.step()
                else:
                    opt.step(loss=loss.detach())
            except ss.TrainingDiverged as error:
                diverged = {"step": step, "message": str(error).split(";")[0]}
                break
            if schedule is not None:
                schedule.step()
            step += 1
            if step >= steps:
                break
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        val = float(F.cross_entropy(model(data.x_val), data.y_val))
    out: dict[str, Any] = {
        "case": case,
        "arm": arm,
        "seed": seed,
        "fault": fault,
        "lr": lr,
        "steps": steps,
        "val_loss": _finite(val),
        "seconds": round(seconds, 3),
        "diverged": diverged,
        "batches_skipped": sum(b - a for a, b in sampler.windows),
    }
    if arm == "none":
        out["climb"] = climb(losses)
    if arm != "none":
        stats = opt.stats(include_optimizer=False)
        for key in ("alarms", "skips", "rollbacks", "level_shifts"):
            out[key] = int(stats[key])
        out["lr_scale"] = float(stats["lr_scale"])
    if arm == "escalation":
        history = opt.escalation.history
        done = [h for h in history if h["restored_to"] is not None]
        out["escalations"] = [
            {k: h[k] for k in ("step", "loss", "restored_to", "skipped")} for h in history
        ]
        out["steps_redone"] = sum(h["step"] - h["restored_to"] + 1 for h in done)
    return out


_RUNS: dict[tuple[Any, ...], dict[str, Any]] = {}


def run_once(
    case: str, arm: str, seed: int, *, fault: bool, lr: float, steps: int
) -> dict[str, Any]:
    """:func:`run`, once per distinct run: without a fault, the cases of one task, optimizer and
    lr are the same run (the two stretch cases share their fault-free runs)."""
    spec = CASES[case]
    faulty = fault and (spec.batch_fault is not None or spec.model_fault is not None)
    key = (case if faulty else None, spec.task, spec.optimizer, lr, arm, seed, steps, faulty)
    if key not in _RUNS:
        _RUNS[key] = run(case, arm, seed, fault=fault, lr=lr, steps=steps)
    return {**_RUNS[key], "case": case, "fault": fault}


# -- the edge of stability -----------------------------------------------------------------------


def climb(losses: list[float]) -> float | None:
    """The highest moving mean (over ``EDGE_WINDOW`` steps) of the training loss after the
    first window, over the first window's mean: above 1, the loss climbed above where it
    started (None: not finite)."""
    if len(losses) < 2 * EDGE_WINDOW or not all(map(math.isfinite, losses)):
        return None
    means = [
        statistics.mean(losses[i : i + EDGE_WINDOW]) for i in range(len(losses) - EDGE_WINDOW + 1)
    ]
    return max(means[EDGE_WINDOW:]) / means[0]


def edge_search(seeds: list[int], steps: int) -> dict[str, Any]:
    """Plain runs of the slow-divergence case over ``EDGE_GRID``: the edge is the smallest lr
    at which the training loss, on the mean over seeds, climbs above where it started
    (:func:`climb` > 1, or not finite); the stable lr is the grid point below it."""
    grid: dict[str, dict[str, float | None]] = {}
    unstable = []
    for lr in EDGE_GRID:
        runs = [
            run_once("slow_divergence", "none", s, fault=True, lr=lr, steps=steps) for s in seeds
        ]
        climbs = [r["climb"] for r in runs]
        grid[f"{lr:g}"] = {
            "climb": None if None in climbs else statistics.mean(climbs),
            "val_loss": _mean([r["val_loss"] for r in runs]),
        }
        if None in climbs or statistics.mean(climbs) > 1.0:
            unstable.append(lr)
    if not unstable or unstable[0] == EDGE_GRID[0]:
        raise RuntimeError(f"no edge of stability on the grid {EDGE_GRID}: {grid}")
    edge = unstable[0]
    stable = EDGE_GRID[EDGE_GRID.index(edge) - 1]
    return {"grid": grid, "edge": edge, "stable": stable, "window": EDGE_WINDOW}


# -- the summary ---------------------------------------------------------------------------------


def _mean(values: list[Any]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.mean(kept) if kept else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per case, fault and arm: means over seeds, ratios to the fault-free plain run of the same
    seed (and, fault-free, the escalation's over the one-step guard's); from the runs alone."""
    by = {(r["case"], r["arm"], r["fault"], r["seed"]): r for r in runs}
    out: dict[str, Any] = {}
    for case in dict.fromkeys(r["case"] for r in runs):
        out[case] = {}
        for fault in (True, False):
            rows: dict[str, Any] = {}
            for arm in ARMS:
                mine = [r for r in runs if (r["case"], r["arm"], r["fault"]) == (case, arm, fault)]
                if not mine:
                    continue
                ratios = []
                over_guard = []
                for r in mine:
                    ref = by.get((case, "none", False, r["seed"]))
                    if ref and r["val_loss"] is not None and ref["val_loss"]:
                        ratios.append(r["val_loss"] / ref["val_loss"])
                    guard = by.get((case, "guard", fault, r["seed"]))
                    if guard and r["val_loss"] is not None and guard["val_loss"]:
                        over_guard.append(r["val_loss"] / guard["val_loss"])
                row: dict[str, Any] = {
                    "seeds": len(mine),
                    "val_loss": _mean([r["val_loss"] for r in mine]),
                    "non_finite": sum(r["val_loss"] is None for r in mine),
                    "vs_fault_free": _mean(ratios),
                    "vs_guard": _mean(over_guard),
                    "diverged": sum(r["diverged"] is not None for r in mine),
                    "batches_skipped": _mean([r["batches_skipped"] for r in mine]),
                }
                if arm != "none":
                    for key in ("alarms", "skips", "rollbacks", "level_shifts", "lr_scale"):
                        row[key] = _mean([r[key] for r in mine])
                if arm == "escalation":
                    row["escalations"] = _mean([len(r["escalations"]) for r in mine])
                    row["steps_redone"] = _mean([r["steps_redone"] for r in mine])
                    row["bitwise_guard"] = all(
                        r["val_loss"] == by[(case, "guard", fault, r["seed"])]["val_loss"]
                        for r in mine
                        if (case, "guard", fault, r["seed"]) in by
                    )
                rows[arm] = row
            out[case]["fault" if fault else "clean"] = rows
    return out


# -- the ring's cost -----------------------------------------------------------------------------


def _big_mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, 2 * width), nn.ReLU(),
        nn.Linear(2 * width, width),
    )  # fmt: skip


def ring_cost(width: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """Bytes and time of one snapshot, and a guarded step with and without the ring."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, width, device=device)
    target = torch.randn(BATCH, width, device=device)

    def build(escalation: ss.Escalation | None) -> tuple[nn.Module, Any]:
        torch.manual_seed(0)
        model = _big_mlp(width).to(device)
        opt = ss.CatastropheGuard(
            torch.optim.AdamW(model.parameters(), lr=1e-4), model=model, escalation=escalation
        )
        return model, opt

    def stepper(model: nn.Module, opt: Any) -> Callable[[], None]:
        def step() -> None:
            loss = F.mse_loss(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())

        return step

    n_params = sum(p.numel() for p in _big_mlp(width).parameters())
    out: dict[str, Any] = {"n_params": n_params, "width": width, "batch": BATCH, "take": {}}
    with tempfile.TemporaryDirectory() as tmp:
        wheres: dict[str, Any] = {"None": None, '"cpu"': "cpu", "a directory": Path(tmp) / "r"}
        for name, where in wheres.items():
            ring = ss.Escalation(every=10**9, keep=2, snapshot_device=where)
            model, opt = build(ring)
            step = stepper(model, opt)
            for _ in range(3):  # the optimizer's state exists
                step()
            live = opt._ring_tensors()
            for k in range(ring.keep):  # both slots filled
                ring.take(live, opt.detector, k)
            samples = []
            for k in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                ring.take(live, opt.detector, ring.keep + k)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                samples.append(time.perf_counter() - t0)
            files = list(Path(tmp, "r").glob("*.pt")) if name == "a directory" else []
            out["take"][name] = {
                "bytes_per_snapshot": ring.nbytes() // ring.keep,
                "bytes_on_disk_per_snapshot": (
                    sum(f.stat().st_size for f in files) // len(files) if files else 0
                ),
                "median_seconds": statistics.median(samples),
                "repeats": repeats,
            }
        state_bytes = sum(t.nbytes for t in live)
        out["live_bytes"] = state_bytes
        arms = {
            "guard": None,
            "guard + ring, no snapshot due": ss.Escalation(every=10**9, keep=2),
            "guard + ring, a snapshot every step": ss.Escalation(every=1, keep=2),
        }
        fns = {name: stepper(*build(ring)) for name, ring in arms.items()}
        samples = time_interleaved_samples(
            fns, device=device, warmup=3, repeats=max(3, repeats), inner=3
        )
    step_s = {name: statistics.median(s) for name, s in samples.items()}
    idle = step_s["guard + ring, no snapshot due"]
    every = 50
    amortized = idle + (step_s["guard + ring, a snapshot every step"] - idle) / every
    out["step_seconds"] = step_s
    out["amortized_every"] = every
    out["amortized_step_seconds"] = amortized
    out["amortized_over_guard"] = amortized / step_s["guard"]
    return out


def _where_faults(case: str, steps: int) -> dict[str, Any]:
    spec = CASES[case]
    if spec.batch_fault is not None:
        bad = stretch(steps)
        return {"fault_batches": [bad.start, bad.stop - 1]}
    if spec.model_fault is not None:
        return {"fault_step": silent_step(steps)}
    return {"warmup_steps": warmup(steps)}


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "results"), help="JSON results directory")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, short runs")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (3; quick 1)")
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--device", default="cpu", help="device of the ring's cost (cpu)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is faster, and the same on any machine
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    scale = 0.6 if args.quick else 1.0
    started = time.perf_counter()

    edge = None
    lrs: dict[str, float] = {}
    for case in args.cases:
        spec = CASES[case]
        if spec.lr == "edge":
            steps = round(scale * spec.steps)
            edge = edge_search(seeds, steps)
            lrs[case] = edge["edge"]
        else:
            lrs[case] = float(spec.lr)
    runs: list[dict[str, Any]] = []
    for case in args.cases:
        spec = CASES[case]
        steps = round(scale * spec.steps)
        for fault in (True, False):
            lr = lrs[case] if fault or edge is None or spec.lr != "edge" else edge["stable"]
            for arm in ARMS:
                for seed in seeds:
                    r = run_once(case, arm, seed, fault=fault, lr=lr, steps=steps)
                    runs.append(r)
                    print(
                        f"{case:16s} {'fault' if fault else 'clean':5s} {arm:10s} seed {seed} "
                        f"val {r['val_loss']} esc {len(r.get('escalations', []))} "
                        f"({r['seconds']:.1f}s)",
                        flush=True,
                    )
    device = torch.device(args.device)
    cost = ring_cost(256 if args.quick else 1024, 3 if args.quick else 7, device)
    results: dict[str, Any] = {
        "command": "python benchmarks/bench_escalation.py "
        + shlex.join(a for a in (argv if argv is not None else sys.argv[1:]) if a),
        "machine": machine_info(device),
        "settings": {
            "seeds": len(seeds),
            "quick": args.quick,
            "batch": BATCH,
            "arms": list(ARMS),
            "escalation": {**ESCALATION, "skip_ahead": ss.Escalation().skip_ahead},
            "cases": {
                c: {
                    "task": CASES[c].task,
                    "optimizer": CASES[c].optimizer,
                    "lr": lrs[c],
                    "steps": round(scale * CASES[c].steps),
                    "fault": CASES[c].describe,
                    **_where_faults(c, round(scale * CASES[c].steps)),
                }
                for c in args.cases
            },
            "edge": edge,
        },
        "runs": runs,
        "summary": summarize(runs),
        "ring_cost": cost,
        "seconds": round(time.perf_counter() - started, 1),
    }
    path = write_result(args.out, "escalation", results)
    print(f"wrote {path} in {results['seconds']} s")
    return results


if __name__ == "__main__":
    main()
