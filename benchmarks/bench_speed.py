"""Step time of every steadystep optimizer's default path against torch's fused optimizers.

One optimizer step (gradients fixed, no forward/backward), default constructor arguments,
every variant timed round-robin with its torch baseline in the same run; a ratio is the median
over rounds of the per-round ratio. Parameter sets (CPU):

* ``mlp``: 16.8M parameters in 16 tensors (8 square layers of width 1448);
* ``gpt-small``: 10.6M parameters in 148 tensors (12 transformer blocks, d=256);
* ``many``: 21M parameters in 292 tensors (24 transformer blocks, d=256).

Each row gives the byte floor (bytes moved per parameter by the ideal fused step, over the
baseline's), the target (1.1x the floor) and whether it is met; the ratio is the median over
rounds, with the quartiles of the per-round ratios beside it (the run's spread). The floors
are explained in docs/performance.md.

    PYTHONPATH=src python benchmarks/bench_speed.py            # writes results/speed.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import steadystep as ss  # noqa: E402
from common import (  # noqa: E402
    machine_info,
    round_ratios,
    time_interleaved_samples,
    write_result,
)

# bytes per fp32 parameter moved by each step (reads + writes), see docs/performance.md
BYTES = {
    "torch AdamW fused": 28,  # read p g m v, write p m v
    "torch SGD momentum fused": 20,  # read p g b, write p b
    "CPropAdamW": 40,  # gradient check 4 + AdamW 28 + CProp's m read/write 8 (v shared)
    "CPropSGD": 40,  # check 4 + SGD momentum 20 + CProp's m and v read/write 16
    "ALeRA": 28,  # pass 1 reads g r (8) + pass 2 reads p g r, writes p r (20)
    "AgAdam": 44,  # pass 1 reads g r (8) + Adam with r: read p g r m v, write p r m v (36)
    "SALeRA": 36,  # ALeRA 28 + rollback snapshot read p write snapshot (8)
    # full rollback (the default): check 4 + the copies of p, m, v refreshed (read + write 24)
    # + AdamW 28
    "guard(torch AdamW fused)": 56,
    "guard(torch AdamW fused, params)": 40,  # rollback="params": check 4 + snapshot 8 + AdamW 28
}
BASELINE = {
    "CPropAdamW": "torch AdamW fused",
    "CPropSGD": "torch SGD momentum fused",
    "ALeRA": "torch AdamW fused",
    "AgAdam": "torch AdamW fused",
    "SALeRA": "torch AdamW fused",
    "guard(torch AdamW fused)": "torch AdamW fused",
    "guard(torch AdamW fused, params)": "torch AdamW fused",
}
# The target of every default path: within 1.1x of its byte floor (bytes moved over the
# baseline's), on either device; a kernel at the floor is bandwidth-bound, like the baseline.
FLOOR_SLACK = 1.1
TARGET = {
    device: {
        name: round(FLOOR_SLACK * BYTES[name] / BYTES[base], 2) for name, base in BASELINE.items()
    }
    for device in ("cpu", "cuda")
}


def mlp_shapes(widths: list[int]) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        shapes += [(fan_out, fan_in), (fan_out,)]
    return shapes


def gpt_shapes(layers: int, d: int, vocab: int, ctx: int) -> list[tuple[int, ...]]:
    """A GPT-2-like parameter set: 12 tensors per block, embeddings and a final norm."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "mlp": lambda: mlp_shapes([1448] * 9),
    "gpt-small": lambda: gpt_shapes(12, 256, 8192, 512),
    "many": lambda: gpt_shapes(24, 256, 8192, 512),
    "gpt350M": lambda: gpt_shapes(24, 1024, 50304, 1024),
}


def make_params(shapes, device, dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device, dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device, dtype)
        params.append(p)
    return params


def layer_groups_of(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    """The paper's layers for a bare parameter list: a weight with the vector after it."""
    groups, current = [], []
    for p in params:
        current.append(p)
        if p.dim() == 1:
            groups.append({"params": current})
            current = []
    if current:
        groups.append({"params": current})
    return groups


def variants(shapes, device, dtype) -> dict[str, Callable[[], Any]]:
    """A step function per variant, each on its own copy of the parameters."""

    def fresh() -> list[torch.nn.Parameter]:
        return make_params(shapes, device, dtype)

    loss = torch.ones((), device=device)
    adamw = torch.optim.AdamW(fresh(), lr=1e-3, fused=True)
    sgd = torch.optim.SGD(fresh(), lr=1e-3, momentum=0.9, fused=True)
    cprop_adamw = ss.CPropAdamW(fresh(), lr=1e-3)
    cprop_sgd = ss.CPropSGD(fresh(), lr=1e-3, momentum=0.9)
    alera = ss.ALeRA(layer_groups_of(fresh()), lr=1e-3)
    agadam = ss.AgAdam(layer_groups_of(fresh()), lr=1e-3)
    salera = ss.SALeRA(layer_groups_of(fresh()), lr=1e-3)
    guard = ss.CatastropheGuard(torch.optim.AdamW(fresh(), lr=1e-3, fused=True))
    guard_params = ss.CatastropheGuard(
        torch.optim.AdamW(fresh(), lr=1e-3, fused=True), rollback="params"
    )
    return {
        "torch AdamW fused": adamw.step,
        "torch SGD momentum fused": sgd.step,
        "CPropAdamW": cprop_adamw.step,
        "CPropSGD": cprop_sgd.step,
        "ALeRA": alera.step,
        "AgAdam": agadam.step,
        "SALeRA": lambda: salera.step(loss=loss),
        "guard(torch AdamW fused)": lambda: guard.step(loss=loss),
        "guard(torch AdamW fused, params)": lambda: guard_params.step(loss=loss),
    }


def run_set(name: str, device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    shapes = SETS[name]()
    fns = variants(shapes, device, dtype)
    samples = time_interleaved_samples(fns, device=device, warmup=3, repeats=repeats, inner=5)
    medians = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    rows = {}
    for variant, base in BASELINE.items():
        per_round = round_ratios(samples[variant], samples[base])
        ratio = statistics.median(per_round)  # paired_ratios' figure
        q1, _, q3 = statistics.quantiles(per_round, n=4)
        floor = BYTES[variant] / BYTES[base]
        target = TARGET[device.type][variant]
        rows[variant] = {
            "baseline": base,
            "ratio": ratio,
            "ratio_quartiles": [q1, q3],  # of the per-round ratios: the run's spread
            "target": target,
            "met": ratio <= target,
            "byte_floor": floor,
            "over_floor": ratio / floor,
        }
    return {
        "set": name,
        "dtype": str(dtype).removeprefix("torch."),
        "tensors": len(shapes),
        "n_params": sum(torch.Size(s).numel() for s in shapes),
        "median_seconds": medians,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"#### {result['set']} ({result['n_params'] / 1e6:.1f}M params in {result['tensors']} "
        f"tensors, {result['dtype']})",
        "",
        "| optimizer | baseline | ms/step | ratio | target | met | byte floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, row in result["rows"].items():
        ms = result["median_seconds"][variant] * 1e3
        met = "yes" if row["met"] else f"no (+{row['ratio'] - row['target']:.2f}x)"
        q1, q3 = row["ratio_quartiles"]
        lines.append(
            f"| {variant} | {row['baseline']} | {ms:.2f} | {row['ratio']:.2f}x "
            f"({q1:.2f}-{q3:.2f}) | "
            f"<= {row['target']}x | {met} | {row['byte_floor']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sets", nargs="*", default=["mlp", "gpt-small", "many"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--name", default="speed")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    results = [run_set(name, device, dtype, args.repeats) for name in args.sets]
    payload = {"benchmark": args.name, "machine": machine_info(device), "results": results}
    path = write_result(args.out, args.name, payload)
    for result in results:
        print(table(result) + "\n", flush=True)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
