"""Spike benchmark: catastrophe detectors on real, decaying training curves with injected faults.

One command, embedded data, a few minutes on 2 CPU cores at the default scale::

    python benchmarks/bench_spikes.py            # --scale 3 for longer runs, --jobs N
    python benchmarks/bench_spikes.py --quick    # a smoke run (scale 0.25, about 4 minutes)

Three tasks (MNIST-1D MLP, digits CNN, a character-level transformer on a generated
arithmetic corpus; ``spikes/tasks.py``), each with AdamW and SGD. Each run is recorded once,
cleanly, with its minibatch losses and global gradient norms, and forked at seeded fault steps
(bad updates at 10-1000x the learning rate, corrupted batches, gradient explosions x1e2-1e4,
NaN losses; ``spikes/faults.py``). Every detector is then swept over its threshold on these
traces (open loop, the plain-Python references; ``spikes/evaluate.py``): catch rate, delay and
false alarms per 1,000 clean steps. Each detector's operating point (the best catch rate at
<= 0.5 false alarms per 1,000 clean steps) then guards a run with faults for real (closed loop:
the guard's ladder: skip, roll back and cut, accept a change of level), whose final loss is
compared with the unperturbed run's, with SALeRA's one-step rollback beside it for the default
detector. Then the default guard meets each fault kind on its own in closed loop (with a NaN in
one sample and 2-5 corrupted batches in a row), and two events: a benign data step and a
learnable task switch (``spikes/closed.py``).

Writes ``<out>/spikes.json``, ``docs/figures/spikes.png`` and the tables between the two pairs
of markers of ``docs/detectors.md`` (regenerated exactly by the same command on the same machine and
torch; the timings in the JSON are machine-dependent and not part of the tables).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from common import machine_info, write_result  # noqa: E402
from spikes import jobs  # noqa: E402
from spikes.closed import CLOSED_KINDS, EVENTS  # noqa: E402
from spikes.closed_report import closed_tables  # noqa: E402
from spikes.detectors import FAMILIES  # noqa: E402
from spikes.evaluate import Score  # noqa: E402
from spikes.faults import KINDS  # noqa: E402
from spikes.report import choose_operating_points, figure, tables  # noqa: E402
from spikes.runs import JUMP_FACTOR, JUMP_WINDOW  # noqa: E402
from spikes.tasks import OPTIMIZERS, TASKS  # noqa: E402

BEGIN, END = "<!-- bench_spikes:begin -->", "<!-- bench_spikes:end -->"
CLOSED_MARKERS = ("<!-- begin:spikes-closed -->", "<!-- end:spikes-closed -->")
# Closed-loop jobs, the longest first, so that two workers finish together
_COST = {"arith_lm": 3, "digits_cnn": 2, "mnist1d_mlp": 1}


def _pool(n: int, traces: dict | None = None):
    ctx = multiprocessing.get_context("spawn")
    return ctx.Pool(n, initializer=jobs.init_worker, initargs=(traces,))


def _starmap(n: int, fn, args: list[tuple], traces: dict | None = None) -> list:
    if n <= 1:
        jobs.init_worker(traces)
        return [fn(*a) for a in args]
    with _pool(n, traces) as pool:
        return pool.starmap(fn, args, chunksize=1)


def _write_docs(docs: Path, table: str, begin: str = BEGIN, end: str = END) -> None:
    page = docs / "detectors.md"
    text = page.read_text()
    if begin not in text or end not in text:
        raise RuntimeError(f"{page} lacks the markers {begin} ... {end}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{begin}\n{table}{end}{tail}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=None, help="run lengths x this (1.0)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: --scale 0.25 unless --scale is given"
    )
    parser.add_argument("--out", default=str(HERE / "results"), help="JSON results directory")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="docs directory to update")
    parser.add_argument("--no-docs", action="store_true", help="do not touch the docs")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--traces", help="cache of recorded traces (read if present, else written)")
    args = parser.parse_args(argv)
    if args.scale is None:
        args.scale = 0.25 if args.quick else 1.0
    if not args.scale > 0:
        parser.error(f"--scale must be > 0, got {args.scale}")
    torch.set_num_threads(1)
    steps, closed_steps, post = round(2500 * args.scale), round(600 * args.scale), 4
    per_kind = max(1, closed_steps // 200)  # faults per closed-loop run of one kind
    configs = [(t, o) for t in TASKS for o in OPTIMIZERS]
    started = time.perf_counter()

    # 1. Recorded runs (clean, forked at the faults).
    cache = Path(args.traces) if args.traces else None
    if cache is not None and cache.is_file():
        raw = json.loads(cache.read_text())
        traces = {k: jobs.RunTrace.from_json(v) for k, v in raw.items()}
    else:
        recorded = _starmap(
            args.jobs, jobs.record_job, [(t, o, steps, post, closed_steps) for t, o in configs]
        )
        traces = {jobs.run_key(t, o): tr for (t, o), tr in zip(configs, recorded, strict=True)}
        if cache is not None:
            cache.write_text(json.dumps({k: v.to_json() for k, v in traces.items()}))
    print(f"recorded {len(traces)} runs in {time.perf_counter() - started:.0f}s", flush=True)

    # 2. Open-loop sweep of every detector's threshold on the recorded traces.
    grid = [(fam.key, t) for fam in FAMILIES for t in fam.grid]
    scored = _starmap(args.jobs, jobs.sweep_job, grid, traces)
    sweep: dict[str, dict[str, Any]] = {fam.key: {} for fam in FAMILIES}
    for (family, t), per_run in zip(grid, scored, strict=True):
        pooled, by_task = Score(), {task: Score() for task in TASKS}
        for key, score in per_run.items():
            pooled = pooled.add(score)
            task = key.split("/")[0]
            by_task[task] = by_task[task].add(score)
        sweep[family][f"{t:g}"] = {
            "pooled": pooled.summary(),
            "tasks": {task: s.summary() for task, s in by_task.items()},
            "runs": {key: s.summary() for key, s in per_run.items()},
        }
    operating = choose_operating_points(sweep)
    print(f"swept {len(grid)} settings in {time.perf_counter() - started:.0f}s", flush=True)

    # 3. Closed loop: each operating point guards a faulty run for real (and the default
    # detector with the one-step rollback); the default guard against each fault kind alone;
    # the events, guarded and not.
    variants = [("none", None)] + [(f.key, operating[f.key]) for f in FAMILIES]
    variants.append(("rollback", operating["spike"]))
    work = [
        ("closed", (t, o, closed_steps, v, thr, post)) for t, o in configs for v, thr in variants
    ]
    work += [
        ("kind", (t, o, closed_steps, k, per_kind, post)) for t, o in configs for k in CLOSED_KINDS
    ]
    work += [
        ("event", (t, o, closed_steps, e, g))
        for t, o in configs
        for e in EVENTS
        for g in (True, False)
    ]
    order = sorted(range(len(work)), key=lambda i: -_COST[work[i][1][0]])
    done = _starmap(args.jobs, jobs.any_job, [(work[i][0], *work[i][1]) for i in order])
    finished = [None] * len(work)
    for i, res in zip(order, done, strict=True):
        finished[i] = res
    closed: dict[str, dict[str, Any]] = {}
    closed_kinds: dict[str, dict[str, Any]] = {}
    closed_events: dict[str, dict[str, Any]] = {}
    for (name, a), res in zip(work, finished, strict=True):
        key = jobs.run_key(a[0], a[1])
        if name == "closed":
            closed.setdefault(key, {})[a[3]] = res
        elif name == "kind":
            closed_kinds.setdefault(key, {})[a[3]] = res
        else:
            arm = "guarded" if a[4] else "none"
            closed_events.setdefault(key, {}).setdefault(a[3], {})[arm] = res
    for key, runs in closed.items():
        runs["clean"] = {"final_loss": traces[key].eval_loss}
    print(f"closed-loop runs done in {time.perf_counter() - started:.0f}s", flush=True)

    counted = [f for tr in traces.values() for f in tr.faults if f.counted]
    results: dict[str, Any] = {
        "config": {
            "scale": args.scale,
            "steps": steps,
            "closed_steps": closed_steps,
            "post": post,
            "jump_rule": f"loss > {JUMP_FACTOR:g} x median of the last {JUMP_WINDOW} clean losses",
            "clean_steps": sum(len(tr.losses) for tr in traces.values()),
            "injected_faults": sum(len(tr.faults) for tr in traces.values()),
            "counted_faults": len(counted),
            "counted_by_kind": {k: sum(f.kind == k for f in counted) for k in KINDS},
            "closed_faults": len(jobs.closed_plan(TASKS[0], OPTIMIZERS[0], closed_steps)),
            "closed_kind_faults": per_kind,
        },
        "runs": {
            key: {
                "task": tr.task,
                "optimizer": tr.optimizer,
                "lr": tr.lr,
                "first_loss": tr.losses[0],
                "last_loss_mean_50": sum(tr.losses[-50:]) / 50,
                "faults": {
                    k: [
                        sum(f.counted for f in tr.faults if f.kind == k),
                        sum(f.kind == k for f in tr.faults),
                    ]
                    for k in KINDS
                },
            }
            for key, tr in traces.items()
        },
        "sweep": sweep,
        "operating": operating,
        "closed_loop": closed,
        "closed_kinds": closed_kinds,
        "closed_events": closed_events,
    }
    table = tables(results)
    closed_table = closed_tables(results)
    results["timing_us"] = jobs.timing(operating)  # machine-dependent, not in the tables
    results["machine"] = machine_info(torch.device("cpu"))
    results["seconds"] = round(time.perf_counter() - started, 1)
    path = write_result(args.out, "spikes", results)
    if not args.no_docs:
        docs = Path(args.docs)
        figure(results, docs / "figures" / "spikes.png")
        _write_docs(docs, table)
        _write_docs(docs, closed_table, *CLOSED_MARKERS)
    print(table)
    print(closed_table)
    print("cost per update (us, this machine):", results["timing_us"])
    print(f"wrote {path} in {results['seconds']}s")
    return results


if __name__ == "__main__":
    main()
