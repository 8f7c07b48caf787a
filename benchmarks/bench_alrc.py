"""ALRC's cost on a training step: forward+backward with and without it, same process.

ALRC's floor is zero extra passes over the parameters and zero host syncs: it is a handful of
elementwise ops on the loss tensor. This measures a small MLP step with per-sample losses and the
ALRC call alone, round-robin in the same process (ratios: the median over rounds of each round's
ratio), and writes ``benchmarks/results/alrc.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import steadystep as ss
from common import machine_info, paired_ratios, print_table, time_interleaved_samples, write_result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=41, help="timed rounds (default 41)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(args.width, args.width), torch.nn.ReLU(), torch.nn.Linear(args.width, 10)
    ).to(device)
    x = torch.randn(args.batch, args.width, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    alrc = ss.ALRC().to(device)
    losses = torch.rand(args.batch, device=device)

    def plain_step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="none").mean().backward()

    def alrc_step():
        model.zero_grad(set_to_none=True)
        alrc(F.cross_entropy(model(x), y, reduction="none")).mean().backward()

    def alrc_only():
        alrc(losses)

    samples = time_interleaved_samples(
        {"plain": plain_step, "alrc": alrc_step, "only": alrc_only},
        device=device,
        repeats=args.repeats,
    )
    # the median of per-round ratios cancels the drift of a shared machine (common.paired_ratios)
    ratio = paired_ratios(samples, "plain")
    t = {name: statistics.median(s) for name, s in samples.items()}
    rows = [
        ("forward+backward, plain mean loss", t["plain"], 1.0),
        ("forward+backward, ALRC(per-sample).mean()", t["alrc"], ratio["alrc"]),
        ("ALRC call alone (per-sample losses)", t["only"], ratio["only"]),
    ]
    print_table(f"ALRC overhead, MLP {args.width}x{args.width}, batch {args.batch}", rows)
    payload = {
        "benchmark": "alrc",
        "machine": machine_info(device),
        "sizes": {"batch": args.batch, "width": args.width},
        "median_seconds": {name: t for name, t, _ in rows},
        "ratio_vs_plain_step": {name: r for name, _, r in rows},
    }
    write_result(args.out, "alrc", payload)
    return payload


if __name__ == "__main__":
    main()
