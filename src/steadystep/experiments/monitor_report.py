"""``steadystep report`` for :class:`~steadystep.Monitor` CSV files: a figure and a summary.

Given a directory, every ``*.csv`` under it whose first column is ``step`` (the Monitor's format,
see :mod:`steadystep.telemetry`) is read; given one such file, that file. For each CSV the report
plots every column against ``step`` (one small panel per column, several figures when there are
many) and writes a markdown summary: the number of rows, the step range, each column's first,
last, smallest and largest value and its count of non-finite values, and the steps at which the
event counters grew (a guard's ``alarms`` and ``rollbacks``, ``lr_cuts``, ``nonfinite_grads``,
``skipped_steps``, ALRC's ``clipped_total``).

Files written (each atomically: a kill leaves the old file or the new one): ``report.md`` and
``figures/<csv name>.png`` in the directory, or ``<stem>_report.md`` and
``figures/<stem>.png`` beside a single CSV file.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from steadystep.experiments._common import markdown_table, plt, text_table
from steadystep.telemetry import read_csv

__all__ = ["build_monitor_report", "monitor_csvs"]

_COUNTERS = ("alarms", "rollbacks", "lr_cuts", "nonfinite_grads", "skipped_steps", "clipped_total")
_PANELS_PER_FIGURE = 24
_SHOWN_STEPS = 8


def _is_monitor_csv(path: Path) -> bool:
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError):
        return False
    return len(header) >= 2 and header[0] == "step"


def monitor_csvs(path: str | os.PathLike[str]) -> list[Path]:
    """The Monitor CSV files at ``path``: the file itself, or those under a directory (sorted).

    Examples:
        >>> import tempfile
        >>> monitor_csvs(tempfile.mkdtemp())
        []
    """
    path = Path(path)
    if path.is_file():
        return [path] if _is_monitor_csv(path) else []
    if not path.is_dir():
        return []
    return [p for p in sorted(path.rglob("*.csv")) if _is_monitor_csv(p)]


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.4g}"


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _figures(columns: dict[str, list[float]], name: str, figures_dir: Path) -> list[Path]:
    """One panel per column against ``step``; several figures when there are many columns."""
    pyplot = plt()
    steps = columns["step"]
    names = [c for c in columns if c != "step"]
    out: list[Path] = []
    pages = [names[i : i + _PANELS_PER_FIGURE] for i in range(0, len(names), _PANELS_PER_FIGURE)]
    for page, chunk in enumerate(pages):
        ncols = min(3, len(chunk))
        nrows = math.ceil(len(chunk) / ncols)
        fig, axes = pyplot.subplots(
            nrows, ncols, figsize=(4.2 * ncols, 2.2 * nrows), squeeze=False, sharex=True
        )
        for ax, column in zip(axes.flat, chunk, strict=False):
            # inf would stretch the axes to nothing: leave such points out, as NaN is
            ys = [v if math.isfinite(v) else math.nan for v in columns[column]]
            ax.plot(steps, ys, lw=1.0)
            ax.set_title(column, fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(chunk) :]:
            ax.set_visible(False)
        for ax in axes[-1]:
            ax.set_xlabel("step", fontsize=8)
        fig.tight_layout()
        suffix = "" if len(pages) == 1 else f"_{page + 1}"
        path = figures_dir / f"{name}{suffix}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, dpi=100, format="png")
        pyplot.close(fig)
        os.replace(tmp, path)
        out.append(path)
    return out


def _events(columns: dict[str, list[float]]) -> list[list[str]]:
    """``[column, first -> last, steps where it grew]`` for the event counters that grew."""
    rows = []
    steps = columns["step"]
    for column, values in columns.items():
        stat = column.split("/")[-1]
        if stat not in _COUNTERS or len(values) < 1:
            continue
        grew = [
            _fmt(steps[i])
            for i in range(1, len(values))
            if math.isfinite(values[i])
            and math.isfinite(values[i - 1])
            and values[i] > values[i - 1]
        ]
        if values[0] > 0:
            grew.insert(0, _fmt(steps[0]))
        if not grew:
            continue
        shown = ", ".join(grew[:_SHOWN_STEPS]) + (
            f", ... ({len(grew)} in all)" if len(grew) > _SHOWN_STEPS else ""
        )
        rows.append([f"`{column}`", f"{_fmt(values[0])} -> {_fmt(values[-1])}", shown])
    return rows


def _section(csv_path: Path, label: str, figures: list[Path], base: Path) -> tuple[str, str]:
    columns = read_csv(csv_path)
    steps = columns["step"]
    table = []
    for column, values in columns.items():
        if column == "step":
            continue
        finite = _finite(values)
        table.append(
            [
                f"`{column}`",
                _fmt(values[0]) if values else "",
                _fmt(values[-1]) if values else "",
                _fmt(min(finite)) if finite else "",
                _fmt(max(finite)) if finite else "",
                str(len(values) - len(finite)),
            ]
        )
    span = f"steps {_fmt(steps[0])} to {_fmt(steps[-1])}" if steps else "no rows"
    lines = [f"## {label}", "", f"{len(steps)} rows, {span}.", ""]
    events = _events(columns) if steps else []
    if events:
        lines += ["Events:", "", markdown_table(["counter", "value", "grew at steps"], events), ""]
    for fig in figures:
        lines += [f"![{label}]({fig.relative_to(base).as_posix()})", ""]
    lines += [
        markdown_table(["column", "first", "last", "min", "max", "non-finite"], table),
        "",
    ]
    terminal = f"{label}: {len(steps)} rows, {span}"
    if events:
        terminal += "\n" + text_table(
            ["counter", "value", "grew at steps"], [[r[0].strip("`"), r[1], r[2]] for r in events]
        )
    return "\n".join(lines), terminal


def build_monitor_report(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """Write the report of the Monitor CSVs at ``path``; return (report path, terminal text).

    Raises FileNotFoundError when ``path`` holds no Monitor CSV.

    Examples:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> alrc = ss.ALRC()
        >>> with ss.Monitor(alrc, every=5, csv_path=os.path.join(folder, "m.csv")) as m:
        ...     for _ in range(10):
        ...         _ = alrc(torch.rand(4) + 1.0)
        ...         m.step()
        >>> report, text = build_monitor_report(folder)
        >>> report.name, sorted(os.listdir(os.path.join(folder, "figures")))
        ('report.md', ['m.png'])
    """
    path = Path(path)
    files = monitor_csvs(path)
    if not files:
        raise FileNotFoundError(
            f"{path} holds no Monitor CSV (a .csv file whose first column is 'step')"
        )
    if path.is_file():
        base, report = path.parent, path.parent / f"{path.stem}_report.md"
    else:
        base, report = path, path / "report.md"
    sections: list[str] = []
    terminal: list[str] = []
    for csv_path in files:
        rel = csv_path.relative_to(base)
        label = rel.as_posix()
        name = "__".join(rel.with_suffix("").parts)
        columns = read_csv(csv_path)
        figures = _figures(columns, name, base / "figures") if columns["step"] else []
        section, text = _section(csv_path, label, figures, base)
        sections.append(section)
        terminal.append(text)
    md = [
        "# steadystep Monitor report",
        "",
        f"{len(files)} Monitor CSV file(s) under `{path}`: every column against the step, and "
        "the counters of notable events (alarms, rollbacks, LR cuts, skipped steps, clipping).",
        "",
        *sections,
        "---",
        f"Rebuild with `steadystep report {path}`.",
        "",
    ]
    _write_atomically(report, "\n".join(md))
    return report, "\n\n".join(terminal)
