"""CProp step time against torch.optim.AdamW, measured side by side in one process.

One optimizer step (gradients fixed, no forward/backward) on a ~17M-parameter MLP on CPU,
or on the "gpt350M" parameter set of PERFORMANCE.md on CUDA. Every ratio is against
``torch.optim.AdamW(fused=True)`` timed round-robin in the same run.

    PYTHONPATH=src python benchmarks/bench_cprop.py     # writes results/cprop.json
    PYTHONPATH=src python benchmarks/bench_cprop.py \
        --params gpt-small --quick --name cprop_gpt_small  # results/cprop_gpt_small.json
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
    paired_ratios,
    print_table,
    time_interleaved_samples,
    write_result,
)
from steadystep.optim.cprop import grads_finite  # noqa: E402


def mlp_shapes(widths: list[int]) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        shapes += [(fan_out, fan_in), (fan_out,)]
    return shapes


def gpt_shapes(layers: int = 24, d: int = 1024, vocab: int = 50304, ctx: int = 1024) -> list:
    """The 'gpt350M' parameter set: 354.9M parameters in 292 tensors."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def make_params(shapes, device) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        params.append(p)
    return params


SGD_BASELINE = "torch SGD momentum (default path)"
# run_all.py also runs these (a many-tensor parameter set)
EXTRA_RUNS = [["--params", "gpt-small", "--quick", "--name", "cprop_gpt_small"]]


def variants(shapes, device, *, quick: bool) -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {}

    def add(name: str, factory: Callable[[list[torch.nn.Parameter]], Any]) -> None:
        opt = factory(make_params(shapes, device))
        out[name] = opt.step

    add("torch AdamW fused=True", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True))
    add("torch AdamW for-loop", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False))
    if not quick:
        add("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True))
    add("CPropAdamW fused (shared v)", lambda ps: ss.CPropAdamW(ps, lr=1e-3, fused=True))
    add(
        "CPropAdamW fused (own v)",
        lambda ps: ss.CPropAdamW(ps, lr=1e-3, fused=True, cprop_beta=0.99),
    )
    add("CPropAdamW reference", lambda ps: ss.CPropAdamW(ps, lr=1e-3, foreach=False))
    if not quick:
        add("CPropAdamW foreach", lambda ps: ss.CPropAdamW(ps, lr=1e-3, foreach=True))
    add(
        "CProp(AdamW fused=True) wrapper",
        lambda ps: ss.CProp(torch.optim.AdamW(ps, lr=1e-3, fused=True)),
    )
    add(
        "CProp(AdamW fused=True, fused=True) wrapper",
        lambda ps: ss.CProp(torch.optim.AdamW(ps, lr=1e-3, fused=True), fused=True),
    )
    add("CProp(AdamW for-loop) wrapper", lambda ps: ss.CProp(torch.optim.AdamW(ps, lr=1e-3)))
    add(SGD_BASELINE, lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9))
    add("CPropSGD fused (momentum)", lambda ps: ss.CPropSGD(ps, lr=1e-2, momentum=0.9, fused=True))
    if not quick:
        add("CPropSGD default path (momentum)", lambda ps: ss.CPropSGD(ps, lr=1e-2, momentum=0.9))
    add(
        "CProp(SGD momentum, fused=True) wrapper",
        lambda ps: ss.CProp(torch.optim.SGD(ps, lr=1e-2, momentum=0.9), fused=True),
    )
    grads = [p.grad for p in make_params(shapes, device)]
    out["non-finite check alone (grads_finite)"] = lambda: grads_finite(grads)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--widths", type=int, nargs="+", default=[2048, 4096, 2048, 16])
    parser.add_argument(
        "--params",
        choices=["default", "gpt-small"],
        default="default",
        help="default: the MLP of --widths on CPU, gpt350M on CUDA; gpt-small: 148 tensors "
        "shaped like a 12-layer d=256 GPT (11.6M params), where per-tensor costs show",
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer variants")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--name", default="cprop", help="JSON file name in --out")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if args.params == "gpt-small":
        shapes, label = gpt_shapes(layers=12, d=256, vocab=8192, ctx=256), "gpt-small"
    elif device.type == "cuda":
        shapes, label = gpt_shapes(), "gpt350M"
    else:
        shapes, label = mlp_shapes(args.widths), f"MLP {args.widths}"
    n_params = sum(torch.Size(s).numel() for s in shapes)
    fns = variants(shapes, device, quick=args.quick)
    samples = time_interleaved_samples(fns, device=device, repeats=args.repeats, inner=args.inner)
    times = {name: statistics.median(s) for name, s in samples.items()}
    ratios = paired_ratios(samples, "torch AdamW fused=True")
    rows = [(name, times[name], ratios[name]) for name in times]
    print_table(f"CProp step on {label}: {n_params / 1e6:.1f}M params, {device}", rows)
    payload = {
        "benchmark": args.name,
        "machine": machine_info(device),
        "params": label,
        "n_params": n_params,
        "n_tensors": len(shapes),
        "baseline": "torch AdamW fused=True",
        "median_seconds": times,
        "ratio_vs_fused_adamw": ratios,
        "ratio_vs_forloop_adamw": paired_ratios(samples, "torch AdamW for-loop"),
        "ratio_vs_sgd_momentum": {
            name: r for name, r in paired_ratios(samples, SGD_BASELINE).items() if "SGD" in name
        },
        "ratio_method": "median over rounds of the ratio within a round (common.paired_ratios)",
        "repeats": args.repeats,
        "command": "PYTHONPATH=src python benchmarks/bench_cprop.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    path = write_result(args.out, args.name, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
