"""Reporting the ALRC reproduction: tables against the paper's Table I, the claims' verdicts,
learning-curve figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from steadystep.experiments._common import (
    band_plot,
    boxcar,
    claim,
    figure_markdown,
    finish_panel,
    fmt,
    markdown_table,
    mean_std,
    plt,
    read_log,
    save,
    text_table,
)
from steadystep.experiments.alrc.running import LOSSES

__all__ = ["PAPER_TABLE", "figures", "markdown", "summarize", "terminal"]

PAPER_TABLE = {  # Table I of the paper, x100: loss -> threshold -> batch size -> (mean, std)
    "squared": {
        "2": {1: (5.55, 0.048), 4: (4.96, 0.016), 16: (4.58, 0.010)},
        "3": {1: (5.52, 0.054), 4: (4.96, 0.029), 16: (4.58, 0.004), 64: (3.90, 0.013)},
        "4": {1: (5.56, 0.048), 4: (4.97, 0.017), 16: (4.58, 0.007), 64: (3.89, 0.016)},
        "inf": {1: (5.55, 0.041), 4: (4.98, 0.017), 16: (4.59, 0.006), 64: (3.89, 0.014)},
    },
    "quartic": {
        "2": {1: (3.54, 0.084), 4: (3.02, 0.023), 16: (2.60, 0.012), 64: (1.65, 0.011)},
        "3": {1: (3.59, 0.055), 4: (3.08, 0.024), 16: (2.61, 0.014), 64: (1.58, 0.016)},
        "4": {1: (3.61, 0.054), 4: (3.13, 0.023), 16: (2.64, 0.016), 64: (1.57, 0.016)},
        "inf": {1: (3.88, 0.108), 4: (3.32, 0.037), 16: (2.74, 0.020), 64: (1.61, 0.008)},
    },
}

CLAIM_QUARTIC = (
    "ALRC lowers the errors of unstable mean-quartic-error training at small batch sizes (1, 4, 16)"
)
CLAIM_SQUARED = "ALRC has no effect on stable mean-squared-error training, even at batch size 1"


def summarize(records: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    groups: dict[tuple[str, str, int], dict[int, float]] = {}
    for r in records:
        c = r["config"]
        key = (c["loss"], c["threshold"], c["batch_size"])
        groups.setdefault(key, {})[r["seed"]] = r["summary"]["final_loss"]
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for (loss, thr, bs), by_seed in sorted(groups.items()):
        m, s, n = mean_std(list(by_seed.values()))
        table.setdefault(loss, {}).setdefault(thr, {})[str(bs)] = {
            "mean_x100": 100 * m,
            "std_x100": 100 * s,
            "n_seeds": n,
            "n_runs": len(by_seed),
            "by_seed_x100": {str(k): 100 * v for k, v in sorted(by_seed.items())},
        }
    batch_sizes = sorted({int(b) for lt in table.values() for t in lt.values() for b in t})
    cfg0 = records[0]["config"] if records else {}
    return {
        "table": table,
        "batch_sizes": batch_sizes,
        "paper_table": {
            k: {t: {str(b): v for b, v in d.items()} for t, d in tv.items()}
            for k, tv in PAPER_TABLE.items()
        },
        "claims": _claims(table, batch_sizes),
        "setup": {
            "steps": cfg0.get("steps"),
            "final_window": cfg0.get("window"),
            "width": cfg0.get("width"),
            "lr": cfg0.get("lr"),
            "dataset": cfg0.get("dataset"),
            "runs": len(records),
        },
    }


def _compare(
    cell: dict[str, Any] | None, base: dict[str, Any] | None
) -> tuple[float, float] | None:
    """(mean difference, its standard error) between two table cells, x100 units.

    Runs with the same seed share the initial weights and the whole data stream, so the
    difference is taken per seed (a paired comparison); its standard error is that of the
    per-seed differences (0 with one seed).
    """
    if not cell or not base:
        return None
    a, b = cell["by_seed_x100"], base["by_seed_x100"]
    diffs = [a[k] - b[k] for k in a if k in b and math.isfinite(a[k] - b[k])]
    if not diffs:
        return None
    mean, std, n = mean_std(diffs)
    return mean, std / math.sqrt(n)


def _claims(table: dict[str, Any], batch_sizes: list[int]) -> list[dict[str, str]]:
    out = []
    small = [b for b in batch_sizes if b <= 16]
    # Quartic: the clipped run (3 sigma, the paper's default) against no clipping.
    q = table.get("quartic", {})
    parts, lower, significant = [], 0, 0
    for b in small:
        cmp = _compare(q.get("3", {}).get(str(b)), q.get("inf", {}).get(str(b)))
        if cmp is None or not math.isfinite(cmp[0]):
            continue
        diff, se = cmp
        base = q["inf"][str(b)]["mean_x100"]
        rel = 100 * diff / base if base else math.nan
        parts.append(f"batch {b}: {rel:+.1f}% (paired over seeds: {diff:+.3f} +- {se:.3f} x100)")
        lower += diff < 0
        significant += diff < -2 * se and se > 0
    if parts:
        n = len(parts)
        measured = "quartic error, 3 sigma vs no clipping: " + "; ".join(parts)
        if lower == n and significant >= 1:
            verdict = "reproduced"
        elif lower == 0 or (lower < n and significant == 0):
            verdict = "not reproduced"
        else:
            verdict = "inconclusive"
        out.append(claim(CLAIM_QUARTIC, measured, verdict))
    # Squared: every finite threshold within noise (or 2%) of no clipping.
    s = table.get("squared", {})
    parts, effect = [], 0
    for b in small:
        base = s.get("inf", {}).get(str(b))
        for thr in ("2", "3", "4"):
            cmp = _compare(s.get(thr, {}).get(str(b)), base)
            if cmp is None or not math.isfinite(cmp[0]):
                continue
            diff, se = cmp
            rel = 100 * diff / base["mean_x100"] if base["mean_x100"] else math.nan
            parts.append(f"batch {b}, {thr} sigma: {rel:+.1f}%")
            effect += abs(diff) > max(2 * se, 0.02 * abs(base["mean_x100"]))
    if parts:
        measured = "squared error vs no clipping: " + "; ".join(parts)
        verdict = "reproduced" if effect == 0 else "not reproduced"
        out.append(claim(CLAIM_SQUARED, measured, verdict))
    return out


def _curves(records: list[dict[str, Any]]) -> dict[tuple[str, int, str], list[np.ndarray]]:
    curves: dict[tuple[str, int, str], list[np.ndarray]] = {}
    for r in records:
        c = r["config"]
        data = read_log(r["csv_path"])
        curves.setdefault((c["loss"], c["batch_size"], c["threshold"]), []).append(data["loss"])
    return curves


def figures(summary: dict[str, Any], records: list[dict[str, Any]], run_dir: Path) -> list[str]:
    if not records:
        return []
    pyplot = plt()
    curves = _curves(records)
    batch_sizes = summary["batch_sizes"]
    thresholds = sorted({k[2] for k in curves}, key=lambda t: float(t))
    colors = {"2": "tab:green", "3": "tab:blue", "4": "tab:purple", "inf": "tab:red"}
    fig, axes = pyplot.subplots(
        2, len(batch_sizes), figsize=(3.4 * len(batch_sizes), 5.6), squeeze=False
    )
    notes: list[str] = []
    for i, loss in enumerate(LOSSES):
        for j, bs in enumerate(batch_sizes):
            ax = axes[i][j]
            drawn = {}
            for thr in thresholds:
                cs = curves.get((loss, bs, thr))
                if not cs:
                    continue
                steps = len(cs[0])
                smooth = [boxcar(c, max(1, steps // 20)) for c in cs]
                label = "no ALRC" if thr == "inf" else f"ALRC {thr}σ"
                drawn[label] = band_plot(ax, np.arange(steps), smooth, label, colors.get(thr, "k"))
            # ALRC that clips nothing leaves the curve of the unclipped run: say so on the panel
            notes += finish_panel(
                ax,
                drawn,
                f"{loss} errors, batch {bs}",
                title=f"{loss} error, batch {bs}",
                xlabel="iteration",
                ylabel="training loss (boxcar mean)",
                legend={"fontsize": 7, "loc": "upper right"},
                log=True,
            )
    fig.suptitle("ALRC: unclipped learning curves, mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    summary.setdefault("figure_notes", {})["alrc_learning_curves"] = notes
    return [save(fig, run_dir / "figures" / "alrc_learning_curves.png")]


def _table_rows(
    summary: dict[str, Any], loss: str, paper: bool
) -> tuple[list[str], list[list[str]]]:
    bss = summary["batch_sizes"]
    header = ["threshold"]
    for b in bss:
        header += [f"bs {b} mean", "std"]
    rows = []
    table = summary["table"].get(loss, {})
    for thr in sorted(table, key=float):
        row = ["∞" if thr == "inf" else thr]
        for b in bss:
            cell = table[thr].get(str(b))
            row += [fmt(cell["mean_x100"], 3), fmt(cell["std_x100"], 3)] if cell else ["", ""]
            if paper:
                ref = summary["paper_table"].get(loss, {}).get(thr, {}).get(str(b))
                row[-2] += f" ({ref[0]:.2f})" if ref else ""
        rows.append(row)
    return header, rows


def markdown(summary: dict[str, Any], figs: list[str], run_dir: Path) -> str:
    st = summary["setup"]
    lines = [
        f"Setup: {st['runs']} runs; {st['steps']} iterations each, Adam lr 1/1280, "
        f"network width x{st['width']} of the paper's, data `{st['dataset']}`; a run's number is "
        f"the mean of its last {st['final_window']} training losses. Tables: mean and std over "
        "seeds, x100 (the paper's value in parentheses; its runs are 100,000 iterations on "
        "CIFAR-10, so absolute values are not comparable, only the ordering).",
        "",
    ]
    for loss in LOSSES:
        if loss not in summary["table"]:
            continue
        header, rows = _table_rows(summary, loss, paper=True)
        lines += [f"**{loss.capitalize()} errors (x100)**", "", markdown_table(header, rows), ""]
    lines += figure_markdown(summary, figs, run_dir, alt="ALRC learning curves")
    return "\n".join(lines)


def terminal(summary: dict[str, Any]) -> str:
    out = []
    for loss in LOSSES:
        if loss in summary["table"]:
            header, rows = _table_rows(summary, loss, paper=False)
            out += [
                f"ALRC, {loss} errors: mean/std of final losses x100",
                text_table(header, rows),
            ]
    return "\n".join(out)
