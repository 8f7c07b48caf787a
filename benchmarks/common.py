"""Shared timing and reporting helpers for the benchmarks (median of repeated timed blocks)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    *,
    device: torch.device,
    warmup: int = 3,
    repeats: int = 7,
    inner: int = 5,
) -> float:
    """Median seconds per call of ``fn``: ``repeats`` blocks of ``inner`` calls after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def write_result(out_dir: str | Path, name: str, payload: dict[str, Any]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def print_table(title: str, rows: list[tuple[str, float, float]]) -> None:
    """Rows of (variant, seconds, ratio against the baseline)."""
    print(f"\n{title}")
    print(f"{'variant':<44} {'ms/step':>10} {'ratio':>8}")
    for name, seconds, ratio in rows:
        print(f"{name:<44} {seconds * 1e3:>10.3f} {ratio:>8.2f}")


def time_interleaved_samples(
    fns: dict[str, Callable[[], Any]],
    *,
    device: torch.device,
    warmup: int = 3,
    repeats: int = 9,
    inner: int = 5,
) -> dict[str, list[float]]:
    """Seconds per call of each ``fn`` in each of ``repeats`` rounds, timed round-robin so
    machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(time_fn(fn, device=device, warmup=0, repeats=1, inner=inner))
    return samples


def paired_ratios(samples: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Median over rounds of each variant's time over the baseline's time in the same round.

    On a shared, noisy machine the speed drifts between rounds; a ratio taken within one round
    (the calls are seconds apart) cancels that drift, where a ratio of two medians does not.
    """
    base = samples[baseline]
    return {name: statistics.median(round_ratios(s, base)) for name, s in samples.items()}


def round_ratios(times: list[float], base: list[float]) -> list[float]:
    """Each round's time over the baseline's in the same round (:func:`paired_ratios`' values)."""
    return [t / b for t, b in zip(times, base, strict=True)]
