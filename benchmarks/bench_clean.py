"""Clean-run benchmark: what each protection costs on HEALTHY training runs.

One command, embedded data, at most ~30 minutes on 2 CPU cores (``--quick``: a few minutes)::

    python benchmarks/bench_clean.py --out benchmarks/results          # the full run
    python benchmarks/bench_clean.py --quick --out /tmp/clean           # a smoke run

Four tasks (``clean/tasks.py``: MNIST-1D MLP, digits CNN with BatchNorm, a character-level
transformer LM, a digits conv autoencoder), each with AdamW and SGD (momentum 0.9, Nesterov).
The arms (``clean/arms.py``, a dict name -> builder, so new defaults are one entry away): the
plain optimizer, ``CatastropheGuard(opt)``, ``stabilize(opt)`` (the README recipe, ALRC on the
per-sample losses), ``stabilize(opt, cprop=False)`` and CProp's native class alone.

1. The plain optimizer's best lr per (task, optimizer) on a coarse half-decade grid under linear
   warm-up + cosine.
2. Every arm swept over x1/3 .. x10 of that lr (quarter-decade points), every seed.
3. The same sweep under other schedules (constant, cosine with warm restarts, OneCycle) on a
   subset, and benign events (input noise raised mid-run, labels permuted mid-run) at x1 and x3.

Writes ``<out>/clean.json`` (the command, machine, torch, every run's final metric and the
guard's counters), and the tables (``clean/report.py``) between the markers of
``docs/clean.md`` (``python tools/render_docs.py`` re-renders them from the JSON).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from clean.arms import ARMS  # noqa: E402
from clean.report import best_lr, cells, summarize, tables  # noqa: E402
from clean.runs import SCHEDULES, RunSpec, run  # noqa: E402
from clean.tasks import NOISE_STD, TASKS, get_task  # noqa: E402
from common import machine_info, write_result  # noqa: E402

OPTIMIZERS = ("adamw", "sgd")
# lrs live on a quarter-decade lattice, lr = 10 ** (k / 4): runs shared between stages are
# the same run (same key) and run once.
COARSE = {"adamw": range(-16, -5, 2), "sgd": range(-12, 1, 2)}  # 1e-4..3e-2 / 1e-3..1
SWEEP = (-2, 0, 2, 4)  # x1/3, x1, x3.2, x10 (quarter decades between: --fine)
FINE = (-2, 0, 1, 2, 3, 4)
STEPS = {"mnist1d_mlp": 300, "digits_cnn_bn": 150, "arith_lm": 200, "digits_ae": 200}
# The subsets: other schedules on the cheapest task, events on the two classifiers.
# OneCycle (``--extra-schedules constant warm_restarts onecycle``) is left out of the default
# run for time.
EXTRA_SCHEDULES = ("constant", "warm_restarts")
EXTRA_TASKS = ("mnist1d_mlp",)
EXTRA_OPTIMIZERS = ("adamw",)
EVENT_TASKS = ("mnist1d_mlp",)
EVENT_SWEEP = (0,)  # x1 (--fine: x1, x3.2)
COST = {"mnist1d_mlp": 2.5, "digits_cnn_bn": 5.5, "arith_lm": 9.0, "digits_ae": 4.0}  # ms/step


def lr_of(k: int) -> float:
    return float(f"{10 ** (k / 4):.6g}")


def k_of(lr: float) -> int:
    import math

    return round(4 * math.log10(lr))


def _init_worker() -> None:
    torch.set_num_threads(1)


def _run_all(specs: list[RunSpec], jobs: int, done: dict[str, dict[str, Any]]) -> None:
    """Run every spec not yet in ``done`` (the most expensive first), into ``done``."""
    todo = [s for s in dict.fromkeys(specs) if s.key() not in done]
    todo.sort(key=lambda s: -COST[s.task] * s.steps)
    if not todo:
        return
    started = time.perf_counter()
    if jobs <= 1:
        results = map(run, todo)
    else:
        pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_init_worker)
        results = pool.imap_unordered(run, todo, chunksize=1)
    try:
        for i, res in enumerate(results, 1):
            spec = RunSpec(**{k: res[k] for k in RunSpec.__dataclass_fields__})
            done[spec.key()] = res
            if i % 50 == 0 or i == len(todo):
                print(f"  {i}/{len(todo)} runs, {time.perf_counter() - started:.0f}s", flush=True)
    finally:
        if jobs > 1:
            pool.close()
            pool.join()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: minutes, not 30")
    parser.add_argument("--out", default=str(HERE / "results"), help="JSON results directory")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="docs directory to update")
    parser.add_argument("--no-docs", action="store_true", help="do not touch the docs")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--tasks", nargs="*", choices=TASKS, help="these tasks only")
    parser.add_argument("--optimizers", nargs="*", choices=OPTIMIZERS, help="these only")
    parser.add_argument("--arms", nargs="*", choices=sorted(ARMS), help="these arms (+ plain)")
    parser.add_argument("--seeds", type=int, help="seeds per cell (3; --quick 2)")
    parser.add_argument("--steps-scale", type=float, help="run lengths x this (1; --quick 0.25)")
    parser.add_argument("--no-extras", action="store_true", help="no other schedules or events")
    parser.add_argument(
        "--fine",
        action="store_true",
        help="quarter-decade lr grid, other schedules with SGD too, events at x3.2 too (hours)",
    )
    parser.add_argument(
        "--extra-schedules",
        nargs="*",
        choices=SCHEDULES[1:],
        default=list(EXTRA_SCHEDULES),
        help=f"the other schedules, on {', '.join(EXTRA_TASKS)} (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()

    quick = args.quick
    tasks = tuple(args.tasks or TASKS)
    optimizers = tuple(args.optimizers or OPTIMIZERS)
    arms = tuple(dict.fromkeys(["plain", *(args.arms or ARMS)]))
    seeds = args.seeds or (2 if quick else 3)
    scale = args.steps_scale or (0.25 if quick else 1.0)
    steps = {t: max(10, round(STEPS[t] * scale)) for t in tasks}
    sweep = (-2, 0, 2) if quick else FINE if args.fine else SWEEP
    event_sweep = (0, 2) if args.fine else EVENT_SWEEP
    coarse = {o: (list(COARSE[o])[1:-1] if quick else list(COARSE[o])) for o in optimizers}
    extra_schedules = tuple(args.extra_schedules)[: 1 if quick else None]
    extra = {} if args.no_extras else {t: extra_schedules for t in EXTRA_TASKS}
    event_tasks = () if args.no_extras else (EVENT_TASKS[:1] if quick else EVENT_TASKS)
    main_schedule = "warmup_cosine"

    done: dict[str, dict[str, Any]] = {}
    # 1. plain's best lr per (task, optimizer), on the coarse grid
    stage1 = [
        RunSpec(t, o, main_schedule, "none", "plain", lr_of(k), s, steps[t])
        for t in tasks
        for o in optimizers
        for k in coarse[o]
        for s in range(seeds)
    ]
    _run_all(stage1, args.jobs, done)
    grid = cells(list(done.values()))
    best_k = {}
    for t in tasks:
        higher = get_task(t).higher_is_better
        for o in optimizers:
            lr, _ = best_lr(grid[(t, o, main_schedule, "none")]["plain"], higher)
            best_k[(t, o)] = k_of(lr)
    print(
        f"coarse grid done in {time.perf_counter() - started:.0f}s: "
        + ", ".join(f"{t}/{o} {lr_of(k):.2g}" for (t, o), k in best_k.items()),
        flush=True,
    )

    # 2. every arm around it; other schedules on a subset; 3. benign events
    stage2 = []
    for t in tasks:
        for o in optimizers:
            k0 = best_k[(t, o)]
            others = extra.get(t, ()) if o in EXTRA_OPTIMIZERS or args.fine else ()
            for schedule in (main_schedule, *others):
                for a in arms:
                    for dk in sweep:
                        for s in range(seeds):
                            lr = lr_of(k0 + dk)
                            stage2.append(RunSpec(t, o, schedule, "none", a, lr, s, steps[t]))
            if t in event_tasks:
                for event in ("noise", "permute"):
                    for a in arms:
                        for dk in event_sweep:
                            for s in range(seeds):
                                lr = lr_of(k0 + dk)
                                stage2.append(
                                    RunSpec(t, o, main_schedule, event, a, lr, s, steps[t])
                                )
    _run_all(stage2, args.jobs, done)

    schedules = sorted({main_schedule, *(s for v in extra.values() for s in v)})
    coverage = (
        f"{len(tasks)} tasks x {len(optimizers)} optimizers ({', '.join(optimizers)}) under "
        f"linear warm-up ({5}% of the steps) + cosine, every arm over the lr grid; "
        + (
            "; ".join(
                f"{get_task(t).label} also under {', '.join(s)}"
                + ("" if args.fine else f" ({', '.join(EXTRA_OPTIMIZERS)} only)")
                for t, s in extra.items()
                if t in tasks
            )
            or "no other schedule"
        )
        + "; benign events "
        + (
            "(noise, permute) on "
            + ", ".join(get_task(t).label for t in event_tasks if t in tasks)
            + f" at x{', x'.join(f'{10 ** (d / 4):.2g}' for d in event_sweep)}"
            if event_tasks
            else "not run"
        )
        + ". Not covered: "
        + ", ".join(
            [
                "the other schedules on the other tasks",
                *[f"{x}" for x in SCHEDULES[1:] if x not in schedules],
                "events on the LM and the AE (no classes to permute)",
            ]
        )
        + "."
    )
    results: dict[str, Any] = {
        "command": "python "
        + " ".join(
            shlex.quote(a)
            for a in ["benchmarks/bench_clean.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "config": {
            "quick": quick,
            "tasks": list(tasks),
            "optimizers": list(optimizers),
            "arms": list(arms),
            "arm_descriptions": {a: ARMS[a][1] for a in arms},
            "seeds": seeds,
            "steps": steps,
            "factors": [10 ** (d / 4) for d in sweep],
            "event_factors": [10 ** (d / 4) for d in event_sweep],
            "coarse_grid": {o: [lr_of(k) for k in coarse[o]] for o in optimizers},
            "schedules": schedules,
            "extra_schedules": {t: list(s) for t, s in extra.items() if t in tasks},
            "event_tasks": [t for t in event_tasks if t in tasks],
            "noise_std": NOISE_STD,
            "event_at": 0.5,
        },
        "coverage": coverage,
        "tasks": {
            t: {
                "label": get_task(t).label,
                "metric": get_task(t).metric,
                "higher_is_better": get_task(t).higher_is_better,
            }
            for t in tasks
        },
        "plain_best_lr_coarse": {f"{t}/{o}": lr_of(k) for (t, o), k in best_k.items()},
        "runs": sorted(
            done.values(),
            key=lambda r: RunSpec(**{k: r[k] for k in RunSpec.__dataclass_fields__}).key(),
        ),
    }
    results["summary"] = summarize(results)
    results["machine"] = machine_info(torch.device("cpu"))
    results["machine"]["jobs"] = args.jobs
    results["seconds"] = round(time.perf_counter() - started, 1)
    text = tables(results)
    path = write_result(args.out, "clean", results)
    if not args.no_docs:
        _write_docs(Path(args.docs) / "clean.md", text)
    print(text)
    print(f"wrote {path}: {len(results['runs'])} runs in {results['seconds']}s")
    return results


BEGIN, END = "<!-- begin:clean -->", "<!-- end:clean -->"


def _write_docs(page: Path, table: str) -> None:
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise RuntimeError(f"{page} lacks the markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{BEGIN}\n{table.rstrip()}\n{END}{tail}")


if __name__ == "__main__":
    main()
