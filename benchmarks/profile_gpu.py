"""Where a step's device time goes: torch.profiler's kernel table for each steadystep optimizer
on the 355M-parameter set (float32), five steady-state steps each.

    PYTHONPATH=src python benchmarks/profile_gpu.py [--only CPropAdamW SALeRA ...]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_gpu  # noqa: E402
from bench_speed import SETS  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=list(bench_gpu.BUILD))
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument(
        "--host", action="store_true", help="profile the Python side (cProfile) instead"
    )
    args = parser.parse_args(argv)
    shapes = SETS["gpt350M"]()
    for name in args.only:
        opt = bench_gpu.BUILD[name](bench_gpu.make_params(shapes, torch.float32))
        step = bench_gpu.stepper(name, opt)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        if args.host:
            host_profile(name, step, args.rows)
            continue
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"==== {name} (5 steps)")
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows)
        print("\n".join(line[:150] for line in table.splitlines()))
        opt = step = None
        gc.collect()
        torch.cuda.empty_cache()


def host_profile(name: str, step, rows: int) -> None:
    """The host's time per step (steps queue on the device, so this is the Python side while
    it outruns the device) and cProfile's busiest functions."""
    import cProfile
    import io
    import pstats
    import time

    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        step()
    host = (time.perf_counter() - started) / 20 * 1e3
    torch.cuda.synchronize()
    total = (time.perf_counter() - started) / 20 * 1e3
    print(f"==== {name}: host {host:.2f} ms/step to enqueue, {total:.2f} ms/step with the device")
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [step() for _ in range(20)])
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(rows)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print("\n".join(line[:150] for line in lines[start : start + rows + 1]))


if __name__ == "__main__":
    main()
