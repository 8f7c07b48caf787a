"""Copy a finished ``steadystep demo`` run into the committed documentation (``make demo-docs``).

    python tools/demo_docs.py RUN_DIR     # RUN_DIR: the --out of `steadystep demo`

Writes ``docs/demo/results.json`` (as the demo wrote it: it holds no clock, date or absolute
path), ``docs/demo/report.md`` (its one wall-clock sentence left out, figure links pointing at
``docs/figures/``) and every figure of the run into ``docs/figures/``. The demo is
deterministic, so running ``make demo-docs`` twice writes byte-identical files; README.md's
``demo-claims`` block is then rendered from ``docs/demo/results.json`` by tools/render_docs.py.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The report's one clock-dependent sentence ("Compute time of the runs: 212 s.").
_WALL = re.compile(r" ?Compute time of the runs: [0-9.]+ s\.")


def copy_demo(run_dir: Path, root: Path = ROOT) -> list[Path]:
    """Copy the run's results, report and figures into ``root``'s docs; returns the files
    written."""
    results = run_dir / "results.json"
    if not results.is_file():
        raise FileNotFoundError(f"{results} is missing: run `steadystep demo --out {run_dir}`")
    demo, figures = root / "docs" / "demo", root / "docs" / "figures"
    demo.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    written = [demo / "results.json", demo / "report.md"]
    shutil.copyfile(results, written[0])
    report = _WALL.sub("", (run_dir / "report.md").read_text())
    written[1].write_text(report.replace("](figures/", "](../figures/"))
    for png in sorted((run_dir / "figures").glob("*.png")):
        shutil.copyfile(png, figures / png.name)
        written.append(figures / png.name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the --out directory of `steadystep demo`")
    args = parser.parse_args(argv)
    try:
        written = copy_demo(args.run_dir)
    except FileNotFoundError as e:
        print(f"demo_docs: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
