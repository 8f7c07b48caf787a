"""Step overhead of the agnostic family and the guard against torch SGD / Adam, same process.

Variants (one optimizer step each, gradients fixed, after warm-up): torch SGD and Adam (their
defaults), ALeRA (layer groups), SALeRA (ALeRA in the guard: sync-free path), Ag-Adam, and the
guard around torch Adam, with and without the rollback snapshot. Around a third-party optimizer
the guard reads the alarm on the host once per step (Note [host syncs] in steadystep/guard.py);
``guard(Adam, backtrack=False)`` minus ``Adam`` is that read plus the detector, and on a GPU
``--sync-check`` runs the sync-free variants under ``torch.cuda.set_sync_debug_mode("error")``.

Parameter sets: ``mlp`` (default, a few million parameters: CPU-sized) and ``gpt350M`` (354.9M
parameters in 292 tensors shaped like a 24-layer, d=1024 GPT; for a GPU). Writes
``benchmarks/results/alera.json``.
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import steadystep as ss
from common import machine_info, print_table, time_interleaved, write_result


def param_shapes(name: str, width: int) -> list[list[tuple[int, ...]]]:
    """Layers (lists of tensor shapes) of a parameter set."""
    if name == "mlp":
        return [[(width, width), (width,)] for _ in range(4)]
    if name == "gpt350M":
        d, layers = 1024, []
        layers.append([(50257, d)])
        layers.append([(1024, d)])
        for _ in range(24):
            layers += [[(d,), (d,)], [(3 * d, d), (3 * d,)], [(d, d), (d,)]]
            layers += [[(d,), (d,)], [(4 * d, d), (4 * d,)], [(d, 4 * d), (d,)]]
        layers.append([(d,), (d,)])
        return layers
    raise ValueError(f"unknown parameter set {name!r}")


def make_params(shapes, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    layers = []
    for layer in shapes:
        tensors = []
        for s in layer:
            p = torch.nn.Parameter((0.02 * torch.randn(s, generator=gen)).to(device))
            p.grad = (1e-3 * torch.randn(s, generator=gen)).to(device)
            tensors.append(p)
        layers.append(tensors)
    return layers


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", default="mlp", choices=["mlp", "gpt350M"])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sync-check", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = param_shapes(args.params, args.width)
    loss = torch.tensor(1.0, device=device)

    def fresh():
        return make_params(shapes, device)

    def groups(layers):
        return [{"params": layer} for layer in layers]

    def flat(layers):
        return [p for layer in layers for p in layer]

    opts = {
        "torch SGD": torch.optim.SGD(flat(fresh()), lr=1e-3),
        "torch Adam": torch.optim.Adam(flat(fresh()), lr=1e-3),
        "ALeRA": ss.ALeRA(groups(fresh()), lr=1e-3),
        "SALeRA (sync-free guard)": ss.SALeRA(groups(fresh()), lr=1e-3),
        "AgAdam": ss.AgAdam(groups(fresh()), lr=1e-3),
        "guard(Adam), host read": ss.CatastropheGuard(torch.optim.Adam(flat(fresh()), lr=1e-3)),
        "guard(Adam, backtrack=False)": ss.CatastropheGuard(
            torch.optim.Adam(flat(fresh()), lr=1e-3), backtrack=False
        ),
    }
    guarded = (ss.CatastropheGuard,)

    def stepper(opt):
        if isinstance(opt, guarded):
            return lambda: opt.step(loss=loss)
        return opt.step

    fns = {name: stepper(opt) for name, opt in opts.items()}
    times = time_interleaved(fns, device=device, warmup=2, repeats=args.repeats, inner=3)

    sync_ok = None
    if args.sync_check and device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            for name in ("ALeRA", "SALeRA (sync-free guard)", "AgAdam"):
                for _ in range(3):
                    fns[name]()
            sync_ok = True
        finally:
            torch.cuda.set_sync_debug_mode(0)

    n_params = sum(p.numel() for p in flat(fresh())) if args.params == "mlp" else 354_871_296
    rows = []
    for name, seconds in times.items():
        base = times["torch Adam"] if "Adam" in name else times["torch SGD"]
        rows.append((name, seconds, seconds / base))
    print_table(
        f"step time, {args.params} ({n_params / 1e6:.1f}M params), {device}; "
        "ratio vs torch SGD (Adam variants vs torch Adam)",
        rows,
    )
    payload = {
        "benchmark": "alera",
        "machine": machine_info(device),
        "params": args.params,
        "n_params": n_params,
        "n_tensors": sum(len(layer) for layer in shapes),
        "median_seconds": times,
        "ratio_vs_torch_sgd": {k: v / times["torch SGD"] for k, v in times.items()},
        "ratio_vs_torch_adam": {k: v / times["torch Adam"] for k, v in times.items()},
        "sync_free_under_set_sync_debug_mode_error": sync_ok,
        "command": "python benchmarks/bench_alera.py " + " ".join(argv or sys.argv[1:]),
    }
    path = write_result(args.out, "alera", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
