"""The clean-run benchmark's numbers and tables, computed from the per-run results alone.

Everything here reads ``results["runs"]`` (one dict per training run: task, optimizer,
schedule, event, arm, lr, seed, metric, the guard's counters) and ``results["tasks"]`` (each
task's metric and its direction), so the tables can be recomputed from the JSON file.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

__all__ = [
    "basin",
    "best_lr",
    "cells",
    "relative_gain",
    "summarize",
    "tables",
]

TOLERANCE = 0.01  # the basin: lrs whose mean metric is within 1% (relative) of the best
TARGET_LOSS = 0.005  # the recipe may cost at most 0.5% (relative) at the plain best lr
TARGET_BASIN = 3.0  # the recipe's basin should be >= 3x plain's
GUARDED = ("guard", "stabilize", "stabilize_alrc", "stabilize_alrc5", "stabilize_cprop")


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values; None when a run has no metric (it diverged to a NaN)."""
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(values)


def _better(a: float | None, b: float | None, higher: bool) -> bool:
    """Is ``a`` strictly better than ``b`` (None is worse than anything)?"""
    if a is None:
        return False
    if b is None:
        return True
    return a > b if higher else a < b


def cells(runs: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[float, dict[int, Any]]]]:
    """``{(task, optimizer, schedule, event): {arm: {lr: {seed: metric}}}}``."""
    out: dict[tuple, dict[str, dict[float, dict[int, Any]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict))
    )
    for r in runs:
        key = (r["task"], r["optimizer"], r["schedule"], r["event"])
        out[key][r["arm"]][r["lr"]][r["seed"]] = r["metric"]
    return out


def best_lr(by_lr: dict[float, dict[int, Any]], higher: bool) -> tuple[float | None, float | None]:
    """The lr with the best mean metric over seeds, and that mean (ties: the smaller lr)."""
    best, value = None, None
    for lr in sorted(by_lr):
        mean = _mean(list(by_lr[lr].values()))
        if best is None or _better(mean, value, higher):
            best, value = lr, mean
    return best, value


def basin(
    by_lr: dict[float, dict[int, Any]], reference: float, higher: bool, tol: float = TOLERANCE
) -> float:
    """Max/min of the widest run of consecutive lrs (on this arm's grid) whose mean metric is
    within ``tol`` (relative) of ``reference``; 1.0 for one lr, 0.0 when none is."""

    def ok(lr: float) -> bool:
        mean = _mean(list(by_lr[lr].values()))
        if mean is None:
            return False
        bound = reference * (1 - tol) if higher else reference * (1 + tol)
        return mean >= bound if higher else mean <= bound

    best, start = 0.0, None
    grid = sorted(by_lr)
    for i, lr in enumerate(grid):
        if ok(lr):
            start = lr if start is None else start
            best = max(best, lr / start)
        else:
            start = None
        del i
    return best


def past_the_edge(
    results: dict[str, Any], key: str, entry: dict[str, Any], arm: str = "stabilize"
) -> dict[str, Any] | None:
    """``arm``'s runs at the grid's next lr above plain's best (x3.2 on the half-decade grid),
    where plain's basin ends on these runs: how many raised no alarm (a quiet guarded run is
    the plain run, bitwise) and how far those quiet runs ended from the best any arm reached
    (relative, signed so that + is better; None when none of them has a metric)."""
    task, opt, schedule, event = _key(key)
    best, top = entry["plain_best_lr"], entry["best_any_arm"]
    higher = results["tasks"][task]["higher_is_better"]
    grid = sorted(float(lr) for lr in entry["arms"].get(arm, {}).get("lrs", {}))
    above = [lr for lr in grid if best is not None and lr > best * 1.0001]
    if not above or top is None:
        return None
    lr = above[0]
    runs = [
        r
        for r in results["runs"]
        if (r["task"], r["optimizer"], r["schedule"], r["event"], r["arm"])
        == (task, opt, schedule, event, arm)
        and math.isclose(r["lr"], lr, rel_tol=1e-6)
    ]
    quiet = [r for r in runs if r["stats"].get("alarms", 0.0) == 0]
    metrics = [r["metric"] for r in quiet if r["metric"] is not None]
    sign = 1.0 if higher else -1.0
    gap = sign * (statistics.fmean(metrics) - top) / abs(top) if metrics else None
    return {"lr": lr, "factor": lr / best, "runs": len(runs), "quiet": len(quiet), "gap": gap}


def relative_gain(
    arm: dict[int, Any], plain: dict[int, Any], higher: bool
) -> tuple[float | None, float | None, int]:
    """Paired over the seeds both have: mean and standard error of ``(arm - plain) / mean
    plain``, signed so that a positive gain is better; and the number of pairs. None when a run
    of either has no metric."""
    seeds = sorted(set(arm) & set(plain))
    pairs = [(arm[s], plain[s]) for s in seeds]
    if not pairs or any(a is None or p is None for a, p in pairs):
        return None, None, len(pairs)
    scale = abs(statistics.fmean(p for _, p in pairs)) or 1.0
    sign = 1.0 if higher else -1.0
    diffs = [sign * (a - p) / scale for a, p in pairs]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return statistics.fmean(diffs), se, len(diffs)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per (task, optimizer, schedule, event): plain's best lr, each arm's gain there, basins,
    and the guard's counters; machine-independent, recomputed from the runs."""
    tasks = results["tasks"]
    runs = results["runs"]
    by_key: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_key[(r["task"], r["optimizer"], r["schedule"], r["event"])].append(r)
    out = {}
    for key, arms in sorted(cells(runs).items()):
        task, _, _, event = key
        higher = tasks[task]["higher_is_better"]
        # every arm on the same grid: the lrs all arms ran (plain's coarse grid reaches further)
        common = set.intersection(*(set(a) for a in arms.values()))
        arms = {name: {lr: c for lr, c in a.items() if lr in common} for name, a in arms.items()}
        plain = arms.get("plain", {})
        best, plain_value = best_lr(plain, higher) if plain else (None, None)
        if event != "none":  # events run at fixed lrs: compare at each
            best = None
        top = None
        for arm_cells in arms.values():
            _, value = best_lr(arm_cells, higher)
            if _better(value, top, higher):
                top = value
        entry: dict[str, Any] = {
            "plain_best_lr": best,
            "plain_best_metric": plain_value,
            "best_any_arm": top,
            "arms": {},
        }
        for arm, arm_cells in arms.items():
            per_lr = {}
            for lr in sorted(arm_cells):
                these = [r for r in by_key[key] if r["arm"] == arm and r["lr"] == lr]
                gain, se, n = relative_gain(arm_cells[lr], plain.get(lr, {}), higher)
                per_lr[f"{lr:.6g}"] = {
                    "mean": _mean(list(arm_cells[lr].values())),
                    "gain": gain,
                    "se": se,
                    "n": n,
                    **_counters(these),
                }
            entry["arms"][arm] = {
                "basin": None if top is None or event != "none" else basin(arm_cells, top, higher),
                "best_lr": best_lr(arm_cells, higher)[0],
                "lrs": per_lr,
            }
        out["/".join(key)] = entry
    return out


def _counters(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The guard's counters over ``runs`` (means per run; totals where said)."""
    if not runs:
        return {}
    n = len(runs)
    steps = sum(r["steps"] for r in runs)
    alarms = sum(r["stats"].get("alarms", 0.0) for r in runs)
    return {
        "runs": n,
        "diverged": sum(bool(r["diverged"]) for r in runs),
        "alarms_total": alarms,
        "alarms_per_1k_steps": 1000 * alarms / steps,
        "runs_with_alarm": sum(r["stats"].get("alarms", 0.0) > 0 for r in runs),
        "rollbacks_total": sum(r["stats"].get("rollbacks", 0.0) for r in runs),
        "nonfinite_total": sum(r["stats"].get("nonfinite_grads", 0.0) for r in runs),
        "lr_scale_min": min(r["stats"].get("lr_scale", 1.0) for r in runs),
        "lr_scale_mean": statistics.fmean(r["stats"].get("lr_scale", 1.0) for r in runs),
        "cut_share": statistics.fmean(r["cut_share"] for r in runs),
        "guard_cut_share": statistics.fmean(r["guard_cut_share"] for r in runs),
    }


# ------------------------------------------------------------------------------------ tables


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _lr(lr: float | None) -> str:
    return "-" if lr is None else f"{lr:.2g}"


def _metric(value: float | None, task: dict[str, Any]) -> str:
    if value is None:
        return "diverged"
    return f"{100 * value:.1f}%" if task["higher_is_better"] else f"{value:.4g}"


def _gain(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "-"
    gain, se = cell["gain"], cell["se"]
    if gain is None:
        return "diverged" if cell.get("diverged") else "-"
    text = f"{100 * gain:+.2f}%"
    if se is not None:
        text += f" ± {100 * se:.2f}"
        if gain < -TARGET_LOSS and gain < -2 * se:
            text = f"**{text}**"
    return text


def _basin(value: float | None) -> str:
    if value is None:
        return "-"
    return "none" if value == 0 else f"{value:.1f}x"


def _key(key: str) -> tuple[str, str, str, str]:
    task, opt, schedule, event = key.split("/")
    return task, opt, schedule, event


def tables(results: dict[str, Any]) -> str:
    """The Markdown tables of ``docs/clean.md`` (from the runs in ``results``)."""
    summary = summarize(results)
    tasks, config = results["tasks"], results["config"]
    arms = [a for a in config["arms"] if a != "plain"]
    labels = {name: t["label"] for name, t in tasks.items()}
    out = [
        f"Measured on {_machine(results['machine'])}; {config['seeds']} seeds; steps per run: "
        + ", ".join(f"{labels[t]} {config['steps'][t]}" for t in config["tasks"])
        + f"; lr grid x{', x'.join(f'{f:.2g}' for f in config['factors'])} of the plain "
        f"optimizer's best. Gains are paired over seeds (mean ± standard error, signed so that "
        f"+ is better); **bold**: worse than {100 * TARGET_LOSS:.1f}% and than 2 standard "
        "errors.",
        "",
        "Covered: " + results["coverage"],
    ]

    clean = [(k, v) for k, v in summary.items() if _key(k)[3] == "none"]
    header = ["task", "optimizer", "schedule", "plain best lr", "plain metric", *arms]
    rows = []
    for key, entry in clean:
        task, opt, schedule, _ = _key(key)
        best = entry["plain_best_lr"]
        cells_ = [
            _gain(entry["arms"].get(a, {}).get("lrs", {}).get(f"{best:.6g}")) if best else "-"
            for a in arms
        ]
        rows.append(
            [
                labels[task],
                opt,
                schedule,
                _lr(best),
                _metric(entry["plain_best_metric"], tasks[task]),
                *cells_,
            ]
        )
    out += [
        "",
        "**At the plain optimizer's best lr**: each arm's final test metric against plain's "
        "(relative; accuracy for the classifiers, loss or MSE for the others):",
        "",
        _table(header, rows),
    ]

    header = ["task", "optimizer", "schedule", "plain", *arms, "recipe / plain"]
    header.append("recipe at the next lr: quiet runs, their gap")
    rows = []
    for key, entry in clean:
        task, opt, schedule, _ = _key(key)
        b = {a: entry["arms"].get(a, {}).get("basin") for a in ["plain", *arms]}
        ratio = "-"
        if b.get("stabilize") is not None and b.get("plain"):
            r = b["stabilize"] / b["plain"]
            ratio = f"{r:.1f}" + (" (>= 3)" if r >= TARGET_BASIN else "")
        edge = past_the_edge(results, key, entry) if "stabilize" in arms else None
        past = "-"
        if edge is not None:
            gap = "-" if edge["gap"] is None else f"{100 * edge['gap']:+.1f}%"
            past = f"x{edge['factor']:.2g}: {edge['quiet']}/{edge['runs']}, {gap}"
        rows.append(
            [labels[task], opt, schedule, *[_basin(b[a]) for a in ["plain", *arms]], ratio, past]
        )
    out += [
        "",
        f"**Basin**: the widest range (max lr / min lr) of consecutive lrs on the grid whose "
        f"mean final metric is within {100 * TOLERANCE:.0f}% (relative) of the best any arm "
        "reached on that task, optimizer and schedule (1.0x: a single lr; none: no lr). The "
        "last column takes the recipe's runs at the next lr above plain's best: how many "
        "raised no alarm (a quiet guarded run is the plain run, bitwise) and how far those "
        "ended from the best (relative, + is better):",
        "",
        _table(header, rows),
    ]

    guarded = [a for a in arms if a in GUARDED]
    header = [
        "arm",
        "lr",
        "runs",
        "alarms / 1k steps",
        "runs with an alarm",
        "rollbacks",
        "nonfinite skips",
        "lr_scale at end (min)",
        "steps at a cut lr (guard)",
        "steps at a cut lr (effective)",
        "diverged",
    ]
    rows = []
    factors = config["factors"]
    for arm in guarded:
        for factor in factors:
            pooled = _pool_at(summary, arm, factor, clean_only=True)
            if pooled:
                rows.append([f"`{arm}`", f"x{factor:.2g}", *_counter_cells(pooled)])
    out += [
        "",
        "**The guard on clean runs**, pooled over every task, optimizer and schedule, by lr "
        "(x the plain best): `lr_scale` is the guard's product of cuts; *cut (guard)*: share of "
        "steps after the guard's first cut; *cut (effective)*: share of steps whose learning "
        "rate was below the schedule's (the guard's scale rides on top of whatever the "
        "scheduler sets, so the two agree unless a run was not guarded):",
        "",
        _table(header, rows),
    ]

    events = [(k, v) for k, v in summary.items() if _key(k)[3] != "none"]
    if events:
        header = ["task", "optimizer", "event", "lr", "plain metric"]
        header += [f"{a}: gain" for a in arms]
        header += [f"{a}: alarms (runs cut, lr_scale min)" for a in guarded]
        rows = []
        for key, entry in events:
            task, opt, schedule, event = _key(key)
            for lr in sorted(entry["arms"].get("plain", {}).get("lrs", {}), key=float):
                cellmap = {a: entry["arms"].get(a, {}).get("lrs", {}).get(lr) for a in arms}
                plain_cell = entry["arms"]["plain"]["lrs"][lr]
                row = [
                    labels[task],
                    opt,
                    f"{event} ({schedule})",
                    _lr(float(lr)),
                    _metric(plain_cell["mean"], tasks[task]),
                ]
                row += [_gain(cellmap[a]) for a in arms]
                for a in guarded:
                    c = cellmap[a]
                    row.append(
                        "-"
                        if not c
                        else f"{c['alarms_total']:.0f} ({c['runs_with_alarm']}/{c['runs']}, "
                        f"{c['lr_scale_min']:.2g})"
                    )
                rows.append(row)
        out += [
            "",
            "**Benign events** (from the middle of the run: `noise` adds Gaussian noise of std "
            f"{config['noise_std']:g} to the standardized inputs, `permute` relabels the classes): "
            "the loss jumps, and training should just go on. Gains against plain at the same lr; "
            "alarms summed over the seeds:",
            "",
            _table(header, rows),
        ]
    return "\n".join(out) + "\n"


def _pool_at(summary, arm: str, factor: float, clean_only: bool) -> dict[str, Any]:
    """The counters of ``arm`` at ``factor`` x each plain best lr, pooled over the clean keys."""
    parts = []
    for key, entry in summary.items():
        if clean_only and _key(key)[3] != "none":
            continue
        best = entry["plain_best_lr"]
        if best is None:
            continue
        lrs = entry["arms"].get(arm, {}).get("lrs", {})
        target = best * factor
        match = [c for lr, c in lrs.items() if abs(float(lr) / target - 1) < 0.02]
        parts += match
    if not parts:
        return {}
    runs = sum(c["runs"] for c in parts)
    return {
        "runs": runs,
        "alarms_per_1k_steps": statistics.fmean(c["alarms_per_1k_steps"] for c in parts),
        "runs_with_alarm": sum(c["runs_with_alarm"] for c in parts),
        "rollbacks_total": sum(c["rollbacks_total"] for c in parts),
        "nonfinite_total": sum(c["nonfinite_total"] for c in parts),
        "lr_scale_mean": sum(c["lr_scale_mean"] * c["runs"] for c in parts) / runs,
        "lr_scale_min": min(c["lr_scale_min"] for c in parts),
        "guard_cut_share": sum(c["guard_cut_share"] * c["runs"] for c in parts) / runs,
        "cut_share": sum(c["cut_share"] * c["runs"] for c in parts) / runs,
        "diverged": sum(c["diverged"] for c in parts),
    }


def _counter_cells(c: dict[str, Any]) -> list[str]:
    return [
        str(c["runs"]),
        f"{c['alarms_per_1k_steps']:.2f}",
        str(c["runs_with_alarm"]),
        f"{c['rollbacks_total']:.0f}",
        f"{c['nonfinite_total']:.0f}",
        f"{c['lr_scale_mean']:.3g} ({c['lr_scale_min']:.2g})",
        f"{100 * c['guard_cut_share']:.1f}%",
        f"{100 * c['cut_share']:.1f}%",
        str(c["diverged"]),
    ]


def _machine(machine: dict[str, Any]) -> str:
    where = machine.get("device_name") or f"CPU, {machine.get('cpu_count')} cores"
    parts = [where, f"torch {machine.get('torch')}", f"Python {machine.get('python')}"]
    if machine.get("date"):
        parts.append(machine["date"])
    return ", ".join(parts)


def headline(results: dict[str, Any]) -> str:
    """README's claim about the recipe, in one paragraph, from the same runs as the tables."""
    summary = summarize(results)
    arms = [a for a in results["config"]["arms"] if a != "plain"]
    clean = [entry for key, entry in summary.items() if _key(key)[3] == "none"]

    def costs(arm: str) -> tuple[int, int]:
        """(cells where ``arm`` costs more than the target and 2 standard errors, cells)."""
        worse = n = 0
        for entry in clean:
            best = entry["plain_best_lr"]
            cell = entry["arms"].get(arm, {}).get("lrs", {}).get(f"{best:.6g}") if best else None
            if not cell or cell["gain"] is None:
                continue
            n += 1
            se = cell["se"] or 0.0
            worse += cell["gain"] < -TARGET_LOSS and cell["gain"] < -2 * se
        return worse, n

    def basins(arm: str) -> tuple[int, int]:
        wider = n = 0
        for entry in clean:
            plain, mine = entry["arms"]["plain"]["basin"], entry["arms"].get(arm, {}).get("basin")
            if plain and mine is not None:
                n += 1
                wider += mine >= TARGET_BASIN * plain
        return wider, n

    parts = []
    for arm, what in (
        ("guard", "the guard alone"),
        ("stabilize", "the recipe (`ss.stabilize` with its defaults)"),
        ("stabilize_alrc", "the recipe with ALRC (`alrc=True`)"),
        ("stabilize_cprop", "the recipe with CProp (`cprop=True`)"),
    ):
        if arm in arms:
            worse, n = costs(arm)
            parts.append(f"{what} costs more than {100 * TARGET_LOSS:.1f}% in {worse} of {n}")
    at_best = _pool_at(summary, "stabilize", 1.0, clean_only=True) if "stabilize" in arms else {}
    wider, n = basins("stabilize") if "stabilize" in arms else (0, 0)
    text = (
        "On healthy runs (`benchmarks/bench_clean.py`: "
        f"{len(results['config']['tasks'])} tasks, AdamW and SGD-momentum, "
        f"{results['config']['seeds']} seeds), at the plain optimizer's best learning rate "
        + "; ".join(parts)
        + " task/optimizer/schedule cells (beyond 2 standard errors)."
    )
    if at_best:
        text += (
            f" The recipe's guard raised {at_best['alarms_per_1k_steps']:.2f} alarms per 1,000 "
            f"clean steps there, with {at_best['rollbacks_total']:.0f} rollbacks in "
            f"{at_best['runs']} runs."
        )
    if n:
        edges = [
            e
            for key, entry in summary.items()
            if _key(key)[3] == "none"
            for e in [past_the_edge(results, key, entry)]
            if e is not None
        ]
        quiet = sum(e["quiet"] for e in edges)
        total = sum(e["runs"] for e in edges)
        outside = sum(e["gap"] is not None and e["gap"] < -TOLERANCE for e in edges)
        text += (
            f" Its basin (the learning rates within {100 * TOLERANCE:.0f}% of the best) is at "
            f"least {TARGET_BASIN:.0f}x as wide as plain's in {wider} of {n} cells. At the "
            f"next learning rate above plain's best, {quiet} of the recipe's {total} runs "
            f"raised no alarm (a quiet guarded run is the plain run, bitwise), and those quiet "
            f"runs ended more than {100 * TOLERANCE:.0f}% below the best in {outside} of "
            f"{len(edges)} cells: runs that do not break but train worse are outside any "
            "guard's reach, so the protection is about costing nothing there, not about a "
            "wider basin ([docs/clean.md](docs/clean.md))."
        )
    return text + "\n"
