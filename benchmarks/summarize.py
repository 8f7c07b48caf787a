"""Print the benchmark results (``benchmarks/results/*.json``) as Markdown tables.

``make bench`` writes the output to ``benchmarks/results/SUMMARY.md``; the README quotes it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def table(result: dict) -> str:
    times = result["median_seconds"]
    ratio_keys = sorted(k for k in result if k.startswith("ratio_vs_"))
    header = [
        "variant",
        "ms/step",
        *(k.removeprefix("ratio_vs_").replace("_", " ") for k in ratio_keys),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, seconds in sorted(times.items(), key=lambda kv: kv[1]):
        ratios = [f"{result[k][name]:.2f}x" if name in result[k] else "" for k in ratio_keys]
        lines.append("| " + " | ".join([name, f"{seconds * 1e3:.2f}", *ratios]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    for path in sorted(Path(args.results).glob("*.json")):
        result = json.loads(path.read_text())
        if "median_seconds" not in result:  # not a timing (spikes.json: docs/detectors.md)
            continue
        machine = result.get("machine", {})
        where = machine.get("device_name") or f"CPU, {machine.get('cpu_count')} cores"
        sizes = result.get("params") or result.get("sizes")
        n = result.get("n_params")
        what = f"{sizes}" + (f", {n / 1e6:.1f}M params" if n else "")
        name = result.get("benchmark", path.stem)
        print(f"### {name} ({what}; {where}, torch {machine.get('torch')})\n")
        print(table(result) + "\n")


if __name__ == "__main__":
    main()
