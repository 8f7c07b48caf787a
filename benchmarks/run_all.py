"""Run every ``benchmarks/bench_*.py`` (each writes its JSON into ``--out``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--only", nargs="*", help="names like alrc cprop alera (default: all)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    for path in sorted(HERE.glob("bench_*.py")):
        name = path.stem.removeprefix("bench_")
        if args.only and name not in args.only:
            continue
        if name == "gpu" and not torch.cuda.is_available():
            print("== bench_gpu.py skipped: no CUDA device", flush=True)
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"== {path.name}", flush=True)
        module.main(["--out", args.out])
        for extra in getattr(module, "EXTRA_RUNS", []):
            module.main(["--out", args.out, *extra])


if __name__ == "__main__":
    main()
