"""Reporting the CProp reproduction: training speed with and without CProp at the paper's
protocol, the distribution of scales, the overconfidence sweep, the claims' verdicts, figures
like the paper's Figs. 2, 8 and 11."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from steadystep.experiments._common import (
    band_plot,
    claim,
    figure_markdown,
    finish_panel,
    fmt,
    mark_overlaps,
    markdown_table,
    mean_std,
    plt,
    read_log,
    save,
    text_table,
)
from steadystep.experiments.cprop.running import BATCH, OPTIMIZERS

__all__ = ["figures", "markdown", "summarize", "terminal"]

CLAIM_SPEED = (
    "CProp-augmented optimizers train faster (lower training loss) than their plain "
    "counterparts: SGD, Adam, RMSprop, AMSGrad"
)
CLAIM_SCALE = (
    "CProp scales most learning rates down quickly and keeps a small portion high (Fig. 8)"
)
CLAIM_C = (
    "A larger overconfidence coefficient c trades training speed for generalization: test "
    "performance improves over c = 1 while training is slower (Fig. 11)"
)


# Why the histogram of Fig. 8 has thin bright lines (measured: docs/experiments.md)
HISTOGRAM_CAPTION = (
    "*The thin bright line that drifts from about 0.68 towards 0.56 is a few hundred elements "
    "(under 1%) of the hidden layers whose gradient was non-zero at the first step only (inputs "
    "of ReLU units that died at once). With one non-zero gradient g at step 1 and zeros after, "
    "|m_hat| / se depends on the step t alone, not on g, so all of them share one scale: "
    "erf(x / sqrt 2) with x^2 = w (n_t - 1) / (1 - w), w = (1 - beta) beta^(t-1) / "
    "(1 - beta^t), n_t = (1 - beta^t) / (1 - beta): 0.65 at step 125, 0.56 at step 500 "
    "(beta = 0.999). Elements with two or three such gradients make fainter lines above it.*"
)

_KEYS = (
    "final_train_loss",
    "mean_minibatch_loss",
    "final_test_error",
    "final_test_loss",
    "final_mean_scale",
)


def _lr(x: float) -> str:
    return f"{x:g}"


def _group(records: list[dict[str, Any]]) -> dict[tuple[str, str, str, float | None], list[Any]]:
    """Runs by (model, optimizer, lr, c)."""
    out: dict[tuple[str, str, str, float | None], list[dict[str, Any]]] = {}
    for r in records:
        c = r["config"]
        out.setdefault((c["model"], c["optimizer"], _lr(c["lr"]), c["cprop_c"]), []).append(r)
    return out


def summarize(records: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    groups = _group(records)
    table: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    paper_lr: dict[str, dict[str, str]] = {}
    for (model, opt, lr, c), runs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], float(kv[0][2]), kv[0][3] or math.inf)
    ):
        tag = "plain" if c is None else f"c={c:g}"
        entry = {}
        for key in _KEYS:
            m, sd, k = mean_std([r["summary"][key] for r in runs])
            entry[key] = {"mean": m, "std": sd, "n": k}
        table.setdefault(model, {}).setdefault(opt, {}).setdefault(lr, {})[tag] = entry
        if runs[0]["config"].get("lr_factor", 1.0) == 1.0:
            paper_lr.setdefault(model, {})[opt] = lr
    # The paper's protocol: compare at the lr that trains the plain optimizer fastest.
    best_lr: dict[str, dict[str, str]] = {}
    for model, opts in table.items():
        for opt, lrs in opts.items():
            plain = {
                lr: cells["plain"]["final_train_loss"]["mean"]
                for lr, cells in lrs.items()
                if "plain" in cells
            }
            if plain:
                best_lr.setdefault(model, {})[opt] = min(plain, key=lambda k: _finite(plain[k]))
    hist = next(
        (r["summary"]["scale_histogram"] for r in records if "scale_histogram" in r["summary"]),
        None,
    )
    hist_run = next((r["run_id"] for r in records if "scale_histogram" in r["summary"]), None)
    cfg0 = records[0]["config"] if records else {}
    summary = {
        "table": table,
        "best_lr": best_lr,
        "paper_lr": paper_lr,
        "histogram_run": hist_run,
        "scale_stats": _scale_stats(hist),
        "setup": {
            "dataset": cfg0.get("dataset"),
            "epochs": cfg0.get("epochs"),
            "batch": BATCH,
            "runs": len(records),
        },
    }
    summary["claims"] = _claims(summary)
    return summary


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _scale_stats(hist: dict[str, Any] | None) -> dict[str, Any] | None:
    if not hist or not hist["steps"]:
        return None
    edges = np.asarray(hist["edges"])
    counts = np.asarray(hist["counts"], dtype=np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    frac = counts / counts.sum(1, keepdims=True)
    below = frac[:, centers < 0.5].sum(1)
    high = frac[:, centers > 0.9].sum(1)
    steps = np.asarray(hist["steps"])
    k = int(np.searchsorted(steps, 0.2 * steps[-1]))
    k = min(max(k, 1), len(steps) - 1)
    return {
        "step_20pct": int(steps[k]),
        "below_half_at_20pct": float(below[k]),
        "above_0.9_at_end": float(high[-1]),
        "below_half_at_end": float(below[-1]),
        "mean_at_end": float((frac[-1] * centers).sum()),
    }


def _cmp(cells: dict[str, Any], key: str) -> tuple[float, float, float] | None:
    """(CProp mean, plain mean, standard error of the difference) of one lr's cells."""
    if "plain" not in cells or "c=1" not in cells:
        return None
    a, b = cells["c=1"][key], cells["plain"][key]
    se = math.sqrt(a["std"] ** 2 / max(a["n"], 1) + b["std"] ** 2 / max(b["n"], 1))
    return a["mean"], b["mean"], se


RULE_C = (
    "with d = a difference of means between the largest c and c = 1 and se its standard error "
    "over seeds: reproduced when the test error is lower at the largest c by more than 2 se and "
    "c = 1 trains at least as fast (final training loss not higher by more than 2 se); not "
    "reproduced when the test error is higher at the largest c by more than 2 se, or c = 1 "
    "trains slower by more than 2 se; inconclusive otherwise (the effect is inside the seed "
    "noise) or with fewer than 2 seeds"
)


def _diff(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """(mean of a - mean of b, standard error of the difference) of two cells over seeds."""
    se = math.sqrt(a["std"] ** 2 / max(a["n"], 1) + b["std"] ** 2 / max(b["n"], 1))
    return a["mean"] - b["mean"], se


def _c_verdict(lo: dict[str, Any], hi: dict[str, Any]) -> str:
    """:data:`RULE_C` on the cells of c = 1 (``lo``) and of the largest c (``hi``)."""
    if min(lo["final_test_error"]["n"], hi["final_test_error"]["n"]) < 2:
        return "inconclusive"
    err, err_se = _diff(hi["final_test_error"], lo["final_test_error"])
    train, train_se = _diff(lo["final_train_loss"], hi["final_train_loss"])
    if err > 2 * err_se or train > 2 * train_se:
        return "not reproduced"
    if err < -2 * err_se:
        return "reproduced"
    return "inconclusive"


def _claims(summary: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    table = summary["table"]
    parts, better, n = [], 0, 0
    for model, opts in summary["best_lr"].items():
        for opt in OPTIMIZERS:
            if opt not in opts:
                continue
            lr = opts[opt]
            cells = table[model][opt][lr]
            speed, fin = _cmp(cells, "mean_minibatch_loss"), _cmp(cells, "final_train_loss")
            if speed is None or fin is None:
                continue
            n += 1
            wins = speed[0] < speed[1] - speed[2] and fin[0] <= fin[1]
            better += wins
            parts.append(
                f"{model}/{opt} at lr {lr}: final train loss {fin[0]:.3f} vs {fin[1]:.3f}, mean "
                f"loss over training {speed[0]:.3f} vs {speed[1]:.3f} "
                f"({'faster' if wins else 'not faster'})"
            )
    if n:
        verdict = (
            "reproduced"
            if better >= 0.75 * n
            else ("not reproduced" if better <= 0.25 * n else "inconclusive")
        )
        measured = (
            f"CProp vs plain at the lr that trains the plain optimizer fastest (the paper's "
            f"protocol), {better}/{n} faster: " + "; ".join(parts)
        )
        out.append(claim(CLAIM_SPEED, measured, verdict))
    st = summary["scale_stats"]
    if st:
        measured = (
            f"share of scales < 0.5: {100 * st['below_half_at_20pct']:.0f}% at step "
            f"{st['step_20pct']} (20% of training), "
            f"{100 * st['below_half_at_end']:.0f}% at the end; "
            f"share > 0.9 at the end: {100 * st['above_0.9_at_end']:.1f}%"
        )
        ok = st["below_half_at_20pct"] > 0.5 and 0.0 < st["above_0.9_at_end"] < 0.5
        out.append(claim(CLAIM_SCALE, measured, "reproduced" if ok else "not reproduced"))
    # c sweep on the first model with Adam at the paper's lr.
    if table:
        model = next(iter(table))
        lr = summary["paper_lr"].get(model, {}).get("Adam")
        cells = table[model].get("Adam", {}).get(lr, {}) if lr else {}
        cs = sorted((float(k[2:]), k) for k in cells if k.startswith("c="))
        if len(cs) >= 2:
            lo, hi = cells[cs[0][1]], cells[cs[-1][1]]
            measured = (
                f"{model}/Adam at lr {lr}: test error {100 * lo['final_test_error']['mean']:.2f}% "
                f"at c={cs[0][0]:g} vs {100 * hi['final_test_error']['mean']:.2f}% at "
                f"c={cs[-1][0]:g}; final train loss "
                f"{lo['final_train_loss']['mean']:.4f} vs {hi['final_train_loss']['mean']:.4f}"
            )
            out.append(claim(CLAIM_C, measured + f". Rule: {RULE_C}", _c_verdict(lo, hi)))
    return out


def figures(summary: dict[str, Any], records: list[dict[str, Any]], run_dir: Path) -> list[str]:
    pyplot = plt()
    out = []
    groups = _group(records)
    models = list(summary["table"])
    opts = [o for o in OPTIMIZERS if any(o in summary["table"][m] for m in models)]
    fig, axes = pyplot.subplots(
        len(models), len(opts), figsize=(3.4 * len(opts), 2.9 * len(models)), squeeze=False
    )
    notes: list[str] = []
    for i, model in enumerate(models):
        for j, opt in enumerate(opts):
            ax = axes[i][j]
            drawn = {}
            lr = summary["best_lr"].get(model, {}).get(opt)
            for c, color, label in ((None, "tab:gray", opt), (1.0, "tab:blue", f"{opt} + CProp")):
                runs = groups.get((model, opt, lr, c)) if lr else None
                if not runs:
                    continue
                curves, x = [], None
                for r in runs:
                    d = read_log(r["csv_path"])
                    ok = np.isfinite(d["train_loss"])
                    x, curves = d["step"][ok], [*curves, d["train_loss"][ok]]
                drawn[label] = band_plot(ax, x, curves, label, color)
            notes += finish_panel(
                ax,
                drawn,
                f"{model}, {opt}",
                title=f"{model}, {opt}, lr {lr}",
                xlabel="iteration",
                ylabel="training loss (whole training set)",
                legend={"fontsize": 7},
                log=True,
            )
    fig.suptitle(
        "CProp: training loss at the lr that trains the plain optimizer fastest, mean ± std "
        "over seeds (cf. the paper's Fig. 2)",
        fontsize=10,
    )
    fig.tight_layout()
    summary.setdefault("figure_notes", {})["cprop_training_loss"] = notes
    out.append(save(fig, run_dir / "figures" / "cprop_training_loss.png"))

    hist = next(
        (r["summary"]["scale_histogram"] for r in records if "scale_histogram" in r["summary"]),
        None,
    )
    if hist and hist["steps"]:
        counts = np.asarray(hist["counts"], dtype=np.float64)
        frac = counts / counts.sum(1, keepdims=True)
        fig, (a1, a2) = pyplot.subplots(
            1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [3, 2]}
        )
        steps = np.asarray(hist["steps"])
        im = a1.imshow(
            np.log10(frac + 1e-6),
            aspect="auto",
            origin="lower",
            extent=(0, 1, steps[0], steps[-1]),
            cmap="viridis",
        )
        fig.colorbar(im, ax=a1, label="log10 share of elements")
        a1.set_xlabel("CProp scale", fontsize=8)
        a1.set_ylabel("iteration", fontsize=8)
        a1.set_title(f"histogram of scales over time ({summary['histogram_run']})", fontsize=9)
        centers = (np.asarray(hist["edges"][:-1]) + np.asarray(hist["edges"][1:])) / 2
        a2.plot(steps, (frac * centers).sum(1), color="tab:blue", label="mean scale")
        a2.legend(fontsize=7)
        a2.set_xlabel("iteration", fontsize=8)
        a2.set_ylabel("mean scale", fontsize=8)
        a2.set_ylim(0, 1)
        fig.suptitle("CProp scale distribution over time (cf. the paper's Fig. 8)", fontsize=10)
        fig.tight_layout()
        out.append(save(fig, run_dir / "figures" / "cprop_scale_histogram.png"))

    model = models[0] if models else None
    sweep_lr = summary["paper_lr"].get(model, {}).get("Adam") if model else None
    sweep = sorted(
        (
            (c, runs)
            for (m, o, lr, c), runs in groups.items()
            if m == model and o == "Adam" and lr == sweep_lr
        ),
        key=lambda t: t[0] or math.inf,
    )
    if len(sweep) >= 3:
        fig, (a1, a2) = pyplot.subplots(1, 2, figsize=(9, 3.4))
        cmap = pyplot.get_cmap("viridis")
        drawn_tr: dict[str, Any] = {}
        drawn_te: dict[str, Any] = {}
        for k, (c, runs) in enumerate(sweep):
            label = "Adam (c = ∞)" if c is None else f"c = {c:g}"
            color = "tab:gray" if c is None else cmap(k / max(len(sweep) - 1, 1))
            tr, te, x = [], [], None
            for r in runs:
                d = read_log(r["csv_path"])
                ok = np.isfinite(d["train_loss"])
                x = d["step"][ok]
                tr.append(d["train_loss"][ok])
                te.append(100 * d["test_error"][ok])
            drawn_tr[label] = band_plot(a1, x, tr, label, color)
            drawn_te[label] = band_plot(a2, x, te, label, color)
        sweep_notes = [f"training loss: {n}" for n in mark_overlaps(a1, drawn_tr)]
        sweep_notes += [f"test error: {n}" for n in mark_overlaps(a2, drawn_te)]
        summary.setdefault("figure_notes", {})["cprop_c_sweep"] = sweep_notes
        a1.set_yscale("log")
        a1.set_title("training loss", fontsize=9)
        a2.set_title("test error (%)", fontsize=9)
        a1.set_ylabel("training loss (whole training set)", fontsize=8)
        a2.set_ylabel("test error (%)", fontsize=8)
        for a in (a1, a2):
            a.set_xlabel("iteration", fontsize=8)
            a.tick_params(labelsize=7)
            a.legend(fontsize=7)
        fig.suptitle(
            f"CProp overconfidence coefficient c, {model} + Adam lr {sweep_lr} "
            "(cf. the paper's Fig. 11)",
            fontsize=10,
        )
        fig.tight_layout()
        out.append(save(fig, run_dir / "figures" / "cprop_c_sweep.png"))
    return out


def _rows(summary: dict[str, Any], mark: str = " (fastest plain)") -> list[list[str]]:
    rows = []
    for model, opts in summary["table"].items():
        for opt, lrs in opts.items():
            for lr, cells in lrs.items():
                best = mark if summary["best_lr"][model][opt] == lr else ""
                for tag, e in cells.items():
                    rows.append(
                        [
                            model,
                            opt,
                            lr + best,
                            tag,
                            f"{fmt(e['final_train_loss']['mean'], 4)} ± "
                            f"{fmt(e['final_train_loss']['std'], 4)}",
                            f"{fmt(e['mean_minibatch_loss']['mean'], 4)}",
                            fmt(100 * e["final_test_error"]["mean"], 2),
                            fmt(e["final_mean_scale"]["mean"], 3),
                        ]
                    )
    return rows


_HEADER = [
    "model",
    "optimizer",
    "lr",
    "CProp",
    "final train loss",
    "mean loss (speed)",
    "test error %",
    "mean scale",
]


def markdown(summary: dict[str, Any], figs: list[str], run_dir: Path) -> str:
    st = summary["setup"]
    lines = [
        f"Setup: {st['runs']} runs on `{st['dataset']}`, batch {st['batch']}, {st['epochs']} "
        "epochs, the paper's learning rates; CProp beta 0.999, c = 1 unless stated. `final train "
        "loss` is on the whole training set; `mean loss` is the mean minibatch loss over training "
        "(lower = faster); mean ± std over seeds.",
        "",
        markdown_table(_HEADER, _rows(summary)),
        "",
    ]
    captions = {"cprop_scale_histogram": HISTOGRAM_CAPTION}
    lines += figure_markdown(summary, figs, run_dir, captions=captions)
    return "\n".join(lines)


def terminal(summary: dict[str, Any]) -> str:
    header = ["model", "opt", "lr", "CProp", "train loss", "mean loss", "test err %", "scale"]
    return (
        "CProp: final losses (mean over seeds; mean loss over training: lower = faster; "
        "* the lr where\nthe plain optimizer trained fastest)\n"
        + text_table(header, _rows(summary, " *"))
    )
