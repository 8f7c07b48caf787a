"""Tables (markdown) and the figure of the spike benchmark, from its results dict."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from spikes.detectors import FAMILIES
from spikes.faults import KINDS
from spikes.tasks import TASKS

__all__ = ["FA_BUDGET", "choose_operating_points", "figure", "tables"]

FA_BUDGET = 0.5  # false alarms per 1,000 clean steps
TASK_LABELS = {
    "mnist1d_mlp": "MNIST-1D MLP",
    "digits_cnn": "digits CNN",
    "arith_lm": "arithmetic LM",
}
KIND_LABELS = {
    "bad_update": "bad update",
    "corrupt_batch": "corrupted batch",
    "grad_explosion": "gradient explosion",
    "nan_loss": "NaN loss",
}


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def choose_operating_points(sweep: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per family, the threshold with the highest pooled catch rate at <= FA_BUDGET pooled
    false alarms per 1,000 clean steps (ties: the higher threshold); if none meets the budget,
    the one with the fewest false alarms."""
    out = {}
    for fam in FAMILIES:
        rows = [(float(t), r["pooled"]) for t, r in sweep[fam.key].items()]
        ok = [(t, s) for t, s in rows if s["fa_per_1000"] <= FA_BUDGET]
        if ok:
            out[fam.key] = max(ok, key=lambda ts: (ts[1]["catch_rate"], ts[0]))[0]
        else:
            out[fam.key] = min(rows, key=lambda ts: (ts[1]["fa_per_1000"], -ts[0]))[0]
    return out


def best_at_budget(sweep: dict[str, Any], family: str, task: str) -> float | None:
    """The highest catch rate on ``task`` among the family's thresholds whose false-alarm rate
    on that task is within FA_BUDGET (the curves' comparison at equal false-alarm rate)."""
    rates = [
        r["tasks"][task]["catch_rate"]
        for r in sweep[family].values()
        if r["tasks"][task]["fa_per_1000"] <= FA_BUDGET
    ]
    return max(rates) if rates else None


def _closed(results: dict[str, Any], variant: str) -> tuple[float, int]:
    """Median over runs of final loss / unperturbed final loss; number of diverged runs."""
    ratios, diverged = [], 0
    for runs in results["closed_loop"].values():
        value = runs[variant]["final_loss"] / runs["clean"]["final_loss"]
        if math.isfinite(value):
            ratios.append(value)
        else:
            diverged += 1
    return (statistics.median(ratios) if ratios else math.nan), diverged


def tables(results: dict[str, Any]) -> str:
    """The benchmark's tables as markdown (deterministic: no timings)."""
    sweep, operating = results["sweep"], results["operating"]
    cfg = results["config"]
    lines = [
        f"Operating point: each detector's threshold with the highest catch rate at <= "
        f"{FA_BUDGET} false alarms per 1,000 clean steps (pooled over the 6 runs). Catch: % of "
        f"the faults passing the jump rule that alarm on the step showing them "
        f"({cfg['counted_faults']} faults, {cfg['clean_steps']} clean steps). Final loss: "
        f"median over the 6 runs of the guarded faulty run's final loss over the unperturbed "
        f"run's ({cfg['closed_steps']} steps, {cfg['closed_faults']} faults each).",
        "",
        "| detector | setting | catch % | "
        + " | ".join(TASK_LABELS[t] for t in TASKS)
        + " | false alarms / 1k steps | caught late | caught before the update | final loss "
        "(x unperturbed) |",
        "|---|---|---:|" + "---:|" * len(TASKS) + "---:|---:|---:|---:|",
    ]
    for fam in FAMILIES:
        thresholds = [operating[fam.key]]
        if fam.default is not None and fam.default != operating[fam.key]:
            thresholds.append(fam.default)
        for t in thresholds:
            row = sweep[fam.key][f"{t:g}"]
            s = row["pooled"]
            tag = "" if t == operating[fam.key] else " (published default)"
            final = "-"
            if t == operating[fam.key]:
                ratio, diverged = _closed(results, fam.key)
                final = f"{ratio:.2f}" + (f" ({diverged} diverged)" if diverged else "")
            lines.append(
                f"| {fam.label} | {fam.threshold}={t:g}{tag} | {_pct(s['catch_rate'])} | "
                + " | ".join(_pct(row["tasks"][task]["catch_rate"]) for task in TASKS)
                + f" | {s['fa_per_1000']:.2f} | {s['caught_late']} | {s['early_catches']} | "
                f"{final} |"
            )
    ratio, diverged = _closed(results, "none")
    lines.append(
        "| no guard | - | - |" + " - |" * len(TASKS) + " - | - | - | "
        f"{ratio:.2f}" + (f" ({diverged}/6 diverged)" if diverged else "") + " |"
    )
    lines += [
        "",
        "Catch % by fault kind at the operating point (faults passing the jump rule: "
        + ", ".join(f"{KIND_LABELS[k]} {cfg['counted_by_kind'][k]}" for k in KINDS)
        + "):",
        "",
        "| detector | " + " | ".join(KIND_LABELS[k] for k in KINDS) + " |",
        "|---|" + "---:|" * len(KINDS),
    ]
    for fam in FAMILIES:
        by = sweep[fam.key][f"{operating[fam.key]:g}"]["pooled"]["by_kind"]
        cells = [
            _pct(by[k]["caught"] / by[k]["faults"]) if by.get(k, {}).get("faults") else "-"
            for k in KINDS
        ]
        lines.append(f"| {fam.label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Best catch % on each task among thresholds with <= {FA_BUDGET} false alarms per "
        "1,000 clean steps on that task (the curves compared at equal false-alarm rate):",
        "",
        "| detector | " + " | ".join(TASK_LABELS[t] for t in TASKS) + " |",
        "|---|" + "---:|" * len(TASKS),
    ]
    for fam in FAMILIES:
        cells = [_pct(best_at_budget(sweep, fam.key, t)) for t in TASKS]
        lines.append(f"| {fam.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(results: dict[str, Any], path: Path) -> None:
    """Catch rate against false alarms per 1,000 clean steps as each threshold varies: one
    panel per task and one pooled, one curve per detector, the operating point circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep, operating = results["sweep"], results["operating"]
    panels = [*TASKS, "pooled"]
    fig, grid = plt.subplots(2, 2, figsize=(11, 9), sharey=True)
    axes = list(grid.flat)
    markers = ["s", "o", "^", "D", "*"]
    for ax, panel in zip(axes, panels, strict=True):
        for fam, marker in zip(FAMILIES, markers, strict=True):
            pts = []
            for t, row in sweep[fam.key].items():
                s = row["pooled"] if panel == "pooled" else row["tasks"][panel]
                pts.append((s["fa_per_1000"], s["catch_rate"], float(t)))
            pts.sort()
            xs = [max(p[0], 0.02) for p in pts]  # zero false alarms drawn at the axis floor
            (line,) = ax.plot(xs, [p[1] for p in pts], marker=marker, label=fam.label, ms=5)
            op = next(p for p in pts if p[2] == operating[fam.key])
            ax.plot(max(op[0], 0.02), op[1], marker="o", ms=13, mfc="none", color=line.get_color())
        ax.axvline(FA_BUDGET, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlim(0.015, 300)
        ax.set_ylim(0.0, 1.02)
        ax.set_title("all tasks, AdamW and SGD" if panel == "pooled" else TASK_LABELS[panel])
        ax.set_xlabel("false alarms per 1,000 clean steps (log scale; 0 drawn at 0.02)")
        ax.set_ylabel("catch rate (faults alarmed on the step they show)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=10)
    fig.suptitle(
        "Catch rate against false-alarm rate as each detector's threshold varies\n"
        f"(dashed line: {FA_BUDGET} false alarms per 1,000 steps; circled: operating point)"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
