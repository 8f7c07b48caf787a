"""Every steadystep optimizer's default step on one CUDA device, against torch's fused ones.

In one run of a few minutes: on the 355M-parameter GPT-like set (292 tensors; float32, then
bfloat16 parameters) each variant is timed round-robin with its torch baseline (CUDA events,
median of per-round ratios), then checked for host syncs in a steady-state step
(``torch.cuda.set_sync_debug_mode("error")``), and its extra memory per parameter over the
bare parameters and gradients is read from the allocator. Writes ``gpu.json``.

    PYTHONPATH=src python benchmarks/bench_gpu.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import steadystep as ss  # noqa: E402
from bench_speed import BASELINE, BYTES, SETS, TARGET, layer_groups_of  # noqa: E402
from common import machine_info  # noqa: E402

DEVICE = torch.device("cuda")


def make_params(shapes, dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(
            torch.randn(shape, device=DEVICE, generator=gen).mul_(0.02).to(dtype)
        )
        p.grad = torch.randn(shape, device=DEVICE, generator=gen).mul_(1e-3).to(dtype)
        params.append(p)
    return params


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


BUILD = {
    "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "torch SGD momentum fused": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True),
    "CPropAdamW": lambda ps: ss.CPropAdamW(ps, lr=1e-3),
    "CPropSGD": lambda ps: ss.CPropSGD(ps, lr=1e-3, momentum=0.9),
    "ALeRA": lambda ps: ss.ALeRA(layer_groups_of(ps), lr=1e-3),
    "AgAdam": lambda ps: ss.AgAdam(layer_groups_of(ps), lr=1e-3),
    "SALeRA": lambda ps: ss.SALeRA(layer_groups_of(ps), lr=1e-3),
    "guard(torch AdamW fused)": lambda ps: ss.CatastropheGuard(
        torch.optim.AdamW(ps, lr=1e-3, fused=True)
    ),
}


def stepper(name: str, opt: Any):
    loss = torch.ones((), device=DEVICE)
    if name in ("SALeRA", "guard(torch AdamW fused)"):
        return lambda: opt.step(loss=loss)
    return opt.step


def time_pair(fns: dict[str, Any], rounds: int, inner: int) -> dict[str, list[float]]:
    for fn in fns.values():
        for _ in range(3):
            fn()
    _sync()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if DEVICE.type != "cuda":  # a smoke test of this script on the CPU
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - t0) * 1e3 / inner)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / inner)
    return samples


def syncs(fn) -> str:
    if DEVICE.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            fn()
        return "none"
    except RuntimeError as e:
        return f"syncs: {str(e).splitlines()[0][:120]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def measure(set_name: str, dtype: torch.dtype, rounds: int, inner: int) -> dict[str, Any]:
    shapes = SETS[set_name]()
    n = sum(torch.Size(s).numel() for s in shapes)
    out: dict[str, Any] = {
        "set": set_name,
        "dtype": str(dtype).removeprefix("torch."),
        "tensors": len(shapes),
        "n_params": n,
        "rows": {},
    }
    for variant, base in BASELINE.items():
        row: dict[str, Any] = {"baseline": base}
        try:
            opts, steps = {}, {}
            for name in (base, variant):
                gc.collect()
                _empty_cache()
                params = make_params(shapes, dtype)
                opts[name] = BUILD[name](params)
                steps[name] = stepper(name, opts[name])
                steps[name]()
                _sync()
                row[f"state_bytes_per_param[{name}]"] = state_bytes(opts[name]) / n
            samples = time_pair(steps, rounds, inner)
            ratios = [v / b for v, b in zip(samples[variant], samples[base], strict=True)]
            row["ms"] = statistics.median(samples[variant])
            row["baseline_ms"] = statistics.median(samples[base])
            row["ratio"] = statistics.median(ratios)
            row["byte_floor"] = BYTES[variant] / BYTES[base]
            row["target"] = TARGET["cuda"][variant]
            row["met"] = row["ratio"] <= row["target"]
            row["host_syncs"] = syncs(steps[variant])
            extra = row[f"state_bytes_per_param[{variant}]"]
            row["extra_bytes_per_param_over_baseline"] = (
                extra - row[f"state_bytes_per_param[{base}]"]
            )
        except Exception as e:  # report and go on: one broken variant must not hide the rest
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        out["rows"][variant] = row
        print(f"{set_name} {out['dtype']} {variant}: {json.dumps(row)}", flush=True)
        opts = steps = None
        gc.collect()
        _empty_cache()
    return out


def state_bytes(opt: Any) -> int:
    """Bytes of every distinct tensor in the optimizer's state_dict (the guard's rollback
    snapshot included): its memory on top of the parameters and gradients."""
    seen: dict[int, int] = {}

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            seen[x.data_ptr()] = max(seen.get(x.data_ptr(), 0), x.numel() * x.element_size())
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(opt.state_dict())
    return sum(seen.values())


def sweep(rounds: int, inner: int) -> list[dict[str, Any]]:
    """CPropAdamW's step against torch's fused AdamW for each launch shape of the elementwise
    kernels (STEADYSTEP_TRITON_BLOCK/WARPS): how the default was chosen."""
    shapes = SETS["gpt350M"]()
    out = []
    for block, warps in ((512, 4), (1024, 4), (1024, 8), (2048, 4), (4096, 8)):
        os.environ["STEADYSTEP_TRITON_BLOCK"] = str(block)
        os.environ["STEADYSTEP_TRITON_WARPS"] = str(warps)
        try:
            steps = {}
            for name in ("torch AdamW fused", "CPropAdamW", "ALeRA"):
                opt = BUILD[name](make_params(shapes, torch.float32))
                steps[name] = stepper(name, opt)
                steps[name]()
            samples = time_pair(steps, rounds, inner)
            base = samples["torch AdamW fused"]
            row = {"block": block, "warps": warps}
            for name in ("CPropAdamW", "ALeRA"):
                ratios = [v / b for v, b in zip(samples[name], base, strict=True)]
                row[name] = statistics.median(ratios)
                row[f"{name} ms"] = statistics.median(samples[name])
            row["torch ms"] = statistics.median(base)
        except Exception as e:
            row = {"block": block, "warps": warps, "error": f"{type(e).__name__}: {e}"}
        print("sweep", json.dumps(row), flush=True)
        out.append(row)
        steps = None
        gc.collect()
        _empty_cache()
    os.environ.pop("STEADYSTEP_TRITON_BLOCK", None)
    os.environ.pop("STEADYSTEP_TRITON_WARPS", None)
    return out


def _empty_cache() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def table(result: dict[str, Any]) -> str:
    lines = [
        f"#### {result['set']} ({result['n_params'] / 1e6:.1f}M params in {result['tensors']} "
        f"tensors, {result['dtype']})",
        "",
        "| optimizer | baseline | ms/step | ratio | target | met | byte floor | host syncs "
        "| extra B/param |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, row in result["rows"].items():
        if "error" in row:
            lines.append(f"| {variant} | {row['baseline']} | error: {row['error'][:80]} |")
            continue
        lines.append(
            f"| {variant} | {row['baseline']} | {row['ms']:.2f} | {row['ratio']:.2f}x | "
            f"<= {row['target']}x | {'yes' if row['met'] else 'no'} | "
            f"{row['byte_floor']:.2f}x | {row['host_syncs']} | "
            f"{row['extra_bytes_per_param_over_baseline']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--set", default="gpt350M")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests the script")
    parser.add_argument("--sweep", action="store_true", help="time the kernels' launch shapes")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    started = time.time()
    try:
        import triton  # the kernels' compiler: its version goes with the numbers

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    payload: dict[str, Any] = {
        "benchmark": "gpu",
        "machine": {**machine_info(DEVICE), "triton": triton_version},
        "results": [],
        "launch_shapes": None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu.json" if DEVICE.type == "cuda" else "gpu_smoke_cpu.json"

    def write() -> None:  # after each part, so a run cut short keeps what it measured
        payload["seconds"] = time.time() - started
        (out / name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

    if args.sweep:
        payload["launch_shapes"] = sweep(args.rounds, args.inner)
        write()
    for dtype in (torch.float32, torch.bfloat16):
        payload["results"].append(measure(args.set, dtype, args.rounds, args.inner))
        write()
    results = payload["results"]
    for result in results:
        print(table(result) + "\n")
    print(f"wrote {out / name} in {payload['seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
