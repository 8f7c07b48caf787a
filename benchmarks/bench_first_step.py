"""The first step's time in a fresh process: the C kernels compiled on first use (cold cache),
loaded from the cache (warm), and the eager path (``STEADYSTEP_FUSED=0``, nothing compiled).

Each measurement is a new Python process that builds the optimizer on the ``mlp`` set of
bench_speed.py (16 tensors) and times its first ``step()``; cold runs get an empty
``STEADYSTEP_CACHE_DIR``, warm runs the one the cold run filled. The median of ``--repeats``
processes per cell. Writes ``first_step.json``.

    PYTHONPATH=src python benchmarks/bench_first_step.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, write_result  # noqa: E402

OPTIMIZERS = ("CPropAdamW", "CPropSGD", "ALeRA", "SALeRA")

CHILD = r"""
import sys, time, torch
sys.path.insert(0, {src!r})
import steadystep as ss
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn(1448, 1448) * 0.02) for _ in range(8)]
params += [torch.nn.Parameter(torch.zeros(1448)) for _ in range(8)]
for p in params:
    p.grad = torch.randn_like(p) * 1e-3
name = {name!r}
if name == "CPropAdamW":
    opt = ss.CPropAdamW(params, lr=1e-3)
elif name == "CPropSGD":
    opt = ss.CPropSGD(params, lr=1e-3, momentum=0.9)
elif name == "ALeRA":
    opt = ss.ALeRA(params, lr=1e-3)
else:
    opt = ss.SALeRA(params, lr=1e-3)
loss = torch.ones(())
start = time.perf_counter()
opt.step(loss=loss)
first = time.perf_counter() - start
start = time.perf_counter()
opt.step(loss=loss)
print(first, time.perf_counter() - start)
"""


def one(name: str, env: dict[str, str]) -> tuple[float, float]:
    code = CHILD.format(src=str(HERE.parent / "src"), name=name)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    first, second = out.stdout.split()
    return float(first), float(second)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows: dict[str, dict[str, float]] = {}
    for name in OPTIMIZERS:
        cells: dict[str, list[float]] = {"cold": [], "warm": [], "eager": [], "second": []}
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "STEADYSTEP_CACHE_DIR": cache}
                cells["cold"].append(one(name, env)[0])
                first, second = one(name, env)
                cells["warm"].append(first)
                cells["second"].append(second)
            eager = {**os.environ, "STEADYSTEP_FUSED": "0"}
            cells["eager"].append(one(name, eager)[0])
        rows[name] = {k: statistics.median(v) for k, v in cells.items()}
        print(name, json.dumps({k: round(v, 3) for k, v in rows[name].items()}), flush=True)
    import torch

    result = {
        "benchmark": "first_step",
        "machine": machine_info(torch.device("cpu")),
        "set": "mlp (16.8M parameters in 16 tensors)",
        "repeats": args.repeats,
        "seconds": rows,
    }
    path = write_result(args.out, "first_step", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
