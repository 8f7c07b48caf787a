"""Tables (markdown) of the spike benchmark's closed-loop cases (``closed.py``), from its
results dict: the default guard against each fault kind, the ladder against the one-step
rollback, and the events (a benign data step, a task switch)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from spikes.closed import CLOSED_KINDS
from spikes.report import FA_BUDGET, KIND_LABELS, TASK_LABELS
from spikes.tasks import OPTIMIZERS, TASKS

__all__ = ["closed_summary", "closed_tables"]

LABELS = {
    **KIND_LABELS,
    "nan_sample": "NaN in one sample",
    "corrupt_run": "2-5 corrupted batches in a row",
}
COUNTS = ("skips", "rollbacks", "level_shifts")


def _ratio(value: float, reference: float) -> float:
    out = value / reference
    return out if math.isfinite(out) else math.nan


def _median(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    text = f"{statistics.median(finite):.2f}" if finite else "-"
    missing = len(values) - len(finite)
    return text + (f" ({missing} diverged)" if missing else "")


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:.1f}" if d else "-"


def _pool(scores: list[dict]) -> dict[str, Any]:
    faults = [f for s in scores for f in s["faults"]]
    counted = [f for f in faults if f["counted"]]
    clean = sum(s["clean_steps"] for s in scores)
    false = sum(s["false_alarms"] for s in scores)
    return {
        "injected": len(faults),
        "caught_injected": sum(f["caught"] for f in faults),
        "counted": len(counted),
        "caught": sum(f["caught"] for f in counted),
        "late": sum(f["late"] for f in counted),
        "clean_steps": clean,
        "false_alarms": false,
        "fa_per_1000": 1000 * false / clean if clean else math.nan,
        **{k: sum(f[k] for f in faults) for k in COUNTS},
        "lr_scale_below_1": sum(s["lr_scale"] < 1.0 for s in scores),
        "runs": len(scores),
    }


def closed_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Pooled closed-loop numbers of the default guard: per fault kind and over all kinds."""
    kinds = results["closed_kinds"]
    per = {k: _pool([runs[k] for runs in kinds.values()]) for k in CLOSED_KINDS}
    return {"kinds": per, "all": _pool([s for runs in kinds.values() for s in runs.values()])}


def _kind_rows(results: dict[str, Any]) -> list[str]:
    kinds, clean = results["closed_kinds"], results["closed_loop"]
    summary = closed_summary(results)
    rows = []
    for kind in (*CLOSED_KINDS, "all"):
        p = summary["all"] if kind == "all" else summary["kinds"][kind]
        if kind == "all":
            scores = [(key, s) for key, runs in kinds.items() for s in runs.values()]
        else:
            scores = [(key, runs[kind]) for key, runs in kinds.items()]
        ratios = [_ratio(s["final_loss"], clean[key]["clean"]["final_loss"]) for key, s in scores]
        label = "**all kinds**" if kind == "all" else LABELS[kind]
        rows.append(
            f"| {label} | {p['counted']} of {p['injected']} | {_pct(p['caught'], p['counted'])} | "
            f"{_pct(p['caught_injected'], p['injected'])} | {p['late']} | "
            f"{p['fa_per_1000']:.2f} | {_median(ratios)} | {p['skips']} | {p['rollbacks']} | "
            f"{p['level_shifts']} | {p['runs'] - p['lr_scale_below_1']} of {p['runs']} |"
        )
    return rows


def _run_length_rows(results: dict[str, Any]) -> list[str]:
    by: dict[int, list[dict]] = {}
    for runs in results["closed_kinds"].values():
        for f in runs["corrupt_run"]["faults"]:
            by.setdefault(int(f["magnitude"]), []).append(f)
    rows = []
    for n, faults in sorted(by.items()):
        rows.append(
            f"| {n} | {len(faults)} | {sum(f['caught'] for f in faults)} | "
            + " | ".join(str(sum(f[k] for f in faults)) for k in COUNTS)
            + " |"
        )
    return rows


def _response_rows(results: dict[str, Any]) -> list[str]:
    rows = []
    for variant, label in (("spike", "ladder (default)"), ("rollback", '`response="rollback"`')):
        scores = [(key, runs[variant]) for key, runs in results["closed_loop"].items()]
        p = _pool([s for _, s in scores])
        ratios = [
            _ratio(s["final_loss"], runs["clean"]["final_loss"])
            for runs in results["closed_loop"].values()
            for s in [runs[variant]]
        ]
        scales = statistics.median(s["lr_scale"] for _, s in scores)
        rows.append(
            f"| {label} | {_pct(p['caught'], p['counted'])} | {p['fa_per_1000']:.2f} | "
            f"{_median(ratios)} | {p['skips']} | {p['rollbacks']} | {p['level_shifts']} | "
            f"{scales:g} |"
        )
    return rows


def _event_rows(results: dict[str, Any]) -> list[str]:
    rows = []
    for event, label in (("noise", "input noise (benign)"), ("switch", "task switch")):
        for task in TASKS:
            for opt in OPTIMIZERS:  # the table's order, not the JSON's (sorted keys)
                rows.append(_event_row(event, label, task, opt, results))
    return rows


def _event_row(event: str, label: str, task: str, opt: str, results: dict[str, Any]) -> str:
    runs = results["closed_events"][f"{task}/{opt}"]
    g, n = runs[event]["guarded"], runs[event]["none"]
    ratio = _ratio(g["final_loss"], n["final_loss"])
    after = ", ".join(f"+{t}" for t in g["alarm_steps_after"][:6]) or "-"
    if event == "noise":
        ok = g["lr_scale"] == 1.0 and ratio <= 1.05
    else:
        ok = ratio <= 1.1
    return (
        f"| {label} | {TASK_LABELS[task]}, {opt} | {g['alarms']} | {after} | "
        f"{g['skips']} | {g['rollbacks']} | {g['level_shifts']} | {g['min_lr_scale']:g} | "
        f"{g['lr_scale']:g} | {ratio:.3f} | {'yes' if ok else 'no'} |"
    )


def closed_tables(results: dict[str, Any]) -> str:
    """The closed-loop tables as markdown (deterministic: no timings)."""
    cfg = results["config"]
    steps, per = cfg["closed_steps"], cfg["closed_kind_faults"]
    lines = [
        f"Closed loop, the default guard (`CatastropheGuard(opt, model=model)`: "
        f"`SpikeDetector()`, the ladder, `recover_every=100`; `min_lr=0` so that every run "
        f"ends): per task and optimizer (6 runs) and fault kind, one run of {steps} steps with "
        f"{per} faults of that kind (none in its last quarter). Counted: faults that pass the "
        f"jump rule on an unguarded fork of the run. Caught: an alarm from the fault's first "
        f"legitimate step to the last step that shows it; late: only within the 4 steps after. "
        f"False alarms: alarms outside every fault's window, per 1,000 such steps (budget "
        f"{FA_BUDGET}). Final loss: median over the 6 runs of the final evaluation loss over "
        f"the unperturbed run's. Skips, rollbacks (each one an LR cut) and level shifts: in the "
        f"faults' windows, summed over the runs. Scale 1 at the end: runs whose LR scale is "
        f"back at 1 after the last step.",
        "",
        "| fault | counted | caught % | caught % of all injected | caught late | false alarms "
        "/ 1k steps | final loss (x unperturbed) | skips | rollbacks (LR cuts) | level shifts "
        "| LR scale 1 at the end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *_kind_rows(results),
        "",
        "Corrupted batches in a row, by the length of the run (summed over the 6 runs):",
        "",
        "| batches in a row | faults | caught | skips | rollbacks | level shifts |",
        "|---:|---:|---:|---:|---:|---:|",
        *_run_length_rows(results),
        "",
        f"The ladder against the one-step rollback (SALeRA's response), `SpikeDetector()` on "
        f"the {cfg['closed_steps']}-step runs with {cfg['closed_faults']} faults of the table "
        f"above (one of each of the four kinds): caught % of the counted faults, false alarms "
        f"per 1,000 steps outside the faults' windows, the final loss over the unperturbed "
        f"run's (median over the 6 runs), the counts summed over the runs, the median final "
        f"LR scale:",
        "",
        "| response | caught % | false alarms / 1k steps | final loss (x unperturbed) | skips "
        "| rollbacks (LR cuts) | level shifts | final LR scale |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *_response_rows(results),
        "",
        f"Events from step {steps // 2} of {steps} to the end, under the default guard: alarms "
        f"(their steps after the event), skips, rollbacks, level shifts, the lowest and the "
        f"final LR scale, and the final evaluation loss (on the data after the event) over the "
        f"unguarded run's through the same event. Met: input noise, the scale back at 1 and "
        f"the loss within 1.05x; task switch, the loss within 1.1x.",
        "",
        "| event | run | alarms | at steps | skips | rollbacks | level shifts | lowest LR scale "
        "| final LR scale | final loss (x unguarded) | met |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
        *_event_rows(results),
    ]
    return "\n".join(lines) + "\n"
