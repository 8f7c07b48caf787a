"""Spike benchmark: catastrophe detectors on real, decaying training curves with injected faults.

One command, embedded data, a few minutes on 2 CPU cores at the default scale::

    python benchmarks/bench_spikes.py            # --scale 3 for longer runs, --jobs N

Three tasks (MNIST-1D MLP, digits CNN, a character-level transformer on a generated
arithmetic corpus; ``spikes/tasks.py``), each with AdamW and SGD. Each run is recorded once,
cleanly, with its minibatch losses and global gradient norms, and forked at seeded fault steps
(bad updates at 10-1000x the learning rate, corrupted batches, gradient explosions x1e2-1e4,
NaN losses; ``spikes/faults.py``). Every detector is then swept over its threshold on these
traces (open loop, the plain-Python references; ``spikes/evaluate.py``): catch rate, delay and
false alarms per 1,000 clean steps. Each detector's operating point (the best catch rate at
<= 0.5 false alarms per 1,000 clean steps) then guards a run with faults for real (closed loop:
rollback and learning-rate cut), whose final loss is compared with the unperturbed run's.

Writes ``<out>/spikes.json``, ``docs/figures/spikes.png`` and the tables between the markers
of ``docs/detectors.md`` (regenerated exactly by the same command on the same machine and
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
from spikes.detectors import FAMILIES  # noqa: E402
from spikes.evaluate import Score  # noqa: E402
from spikes.faults import KINDS  # noqa: E402
from spikes.report import choose_operating_points, figure, tables  # noqa: E402
from spikes.runs import JUMP_FACTOR, JUMP_WINDOW  # noqa: E402
from spikes.tasks import OPTIMIZERS, TASKS  # noqa: E402

BEGIN, END = "<!-- bench_spikes:begin -->", "<!-- bench_spikes:end -->"


def _pool(n: int, traces: dict | None = None):
    ctx = multiprocessing.get_context("spawn")
    return ctx.Pool(n, initializer=jobs.init_worker, initargs=(traces,))


def _starmap(n: int, fn, args: list[tuple], traces: dict | None = None) -> list:
    if n <= 1:
        jobs.init_worker(traces)
        return [fn(*a) for a in args]
    with _pool(n, traces) as pool:
        return pool.starmap(fn, args, chunksize=1)


def _write_docs(docs: Path, table: str) -> None:
    page = docs / "detectors.md"
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise RuntimeError(f"{page} lacks the markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="run lengths x this (1.0)")
    parser.add_argument("--out", default=str(HERE / "results"), help="JSON results directory")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="docs directory to update")
    parser.add_argument("--no-docs", action="store_true", help="do not touch the docs")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--traces", help="cache of recorded traces (read if present, else written)")
    args = parser.parse_args(argv)
    if not args.scale > 0:
        parser.error(f"--scale must be > 0, got {args.scale}")
    torch.set_num_threads(1)
    steps, closed_steps, post = round(2500 * args.scale), round(600 * args.scale), 4
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

    # 3. Closed loop: each operating point guards a faulty run for real.
    variants = [("none", None)] + [(f.key, operating[f.key]) for f in FAMILIES]
    closed_args = [(t, o, closed_steps, v, thr) for t, o in configs for v, thr in variants]
    finished = _starmap(args.jobs, jobs.closed_job, closed_args)
    closed: dict[str, dict[str, Any]] = {}
    for (t, o, _, v, _), res in zip(closed_args, finished, strict=True):
        closed.setdefault(jobs.run_key(t, o), {})[v] = res
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
    }
    table = tables(results)
    results["timing_us"] = jobs.timing(operating)  # machine-dependent, not in the tables
    results["machine"] = machine_info(torch.device("cpu"))
    results["seconds"] = round(time.perf_counter() - started, 1)
    path = write_result(args.out, "spikes", results)
    if not args.no_docs:
        docs = Path(args.docs)
        figure(results, docs / "figures" / "spikes.png")
        _write_docs(docs, table)
    print(table)
    print("cost per update (us, this machine):", results["timing_us"])
    print(f"wrote {path} in {results['seconds']}s")
    return results


if __name__ == "__main__":
    main()
