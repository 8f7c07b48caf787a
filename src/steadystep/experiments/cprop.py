"""CProp reproduction (Preechakul & Kijsirikul, "CProp: Adaptive Learning Rate Scaling from Past
Gradient Conformity", Sec. 3 and 4).

The paper's fully connected 784-300-100-10 network and its CNN (16, M, 32, M, 64, M, 128, global
average pool, 1x1 conv; both adapted to the input), batch size 32, no preprocessing beyond
scaling. SGD (no momentum), Adam, RMSprop and AMSGrad at the paper's learning rates for
Fashion-MNIST, each with and without ``ss.CProp(optimizer, beta=0.999, c=1)``; 3 seeds; training
loss curves with one-std bands (Fig. 2), the histogram of CProp's scales over time (Fig. 8) and
the overconfidence coefficient sweep (Fig. 11).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from steadystep.experiments import _common as C
from steadystep.experiments.datasets import ClassificationData, load_classification
from steadystep.experiments.models import build_classifier
from steadystep.experiments.runner import RunContext, RunLog, RunSpec, Settings, read_csv

name = "cprop"
title = "CProp: update scaling by past-gradient conformity"
requires = ("CProp",)

OPTIMIZERS = ("SGD", "Adam", "RMSprop", "AMSGrad")
# The paper's learning rates for Fashion-MNIST (supplement, Figs. 15/16); AMSGrad shares Adam's.
LRS = {
    "FC": {"SGD": 0.1, "Adam": 1e-3, "RMSprop": 1e-3, "AMSGrad": 1e-3},
    "CNN": {"SGD": 0.3, "Adam": 3e-3, "RMSprop": 3e-3, "AMSGrad": 3e-3},
}
BATCH = 32
HIST_BINS = 40

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

SCALES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        models=("FC",),
        optimizers=("SGD", "Adam"),
        epochs=1,
        seeds=1,
        n_train=320,
        evals=2,
        lr_factors=(1.0, 3.0),
        sweep=(3.0,),
    ),
    "demo": dict(
        models=("FC",),
        optimizers=("SGD", "Adam"),
        epochs=4,
        seeds=3,
        n_train=None,
        evals=2,
        lr_factors=(1.0, 3.0, 9.0),
        sweep=(3.0, 9.0, 27.0),
    ),
    "quick": dict(
        models=("FC", "CNN"),
        optimizers=OPTIMIZERS,
        epochs=10,
        seeds=3,
        n_train=None,
        evals=2,
        lr_factors=(1 / 3, 1.0, 3.0, 9.0),
        sweep=(3.0, 9.0, 27.0),
    ),
    "paper": dict(
        models=("FC", "CNN"),
        optimizers=OPTIMIZERS,
        epochs=20,
        seeds=3,
        n_train=None,
        evals=4,
        lr_factors=(1 / 3, 1.0, 3.0, 9.0),
        sweep=(3.0, 9.0, 27.0),
    ),
}


def plan(settings: Settings) -> list[RunSpec]:
    s = SCALES[settings.scale]
    dataset = settings.dataset or ("fashion-mnist" if settings.scale == "paper" else "mnist1d")
    if dataset == "crops":
        raise ValueError("the cprop experiment needs a classification dataset, not 'crops'")
    seeds = settings.seeds or s["seeds"]
    n_steps = s["epochs"] * 125  # MNIST-1D: 4000 / 32; only used for progress
    specs = []

    def add(model: str, opt: str, factor: float, c: float | None, seed: int) -> None:
        lr = float(f"{LRS[model][opt] * factor:.3g}")
        config = dict(
            model=model,
            optimizer=opt,
            lr=lr,
            lr_factor=factor,
            cprop_c=c,
            epochs=s["epochs"],
            dataset=dataset,
            n_train=s["n_train"],
            evals_per_epoch=s["evals"],
            # Fig. 8: the histogram of scales of the first seed's Adam+CProp run at the paper's lr.
            histogram=opt == "Adam" and c == 1.0 and seed == 0 and factor == 1.0,
        )
        tag = "plain" if c is None else f"cprop-c{c:g}"
        weight = 1.0 if model == "FC" else 3.0
        run_id = f"{model}-{opt}-lr{lr:g}-{tag}-s{seed}"
        specs.append(RunSpec(name, run_id, config, seed, n_steps, n_steps * weight * 1e-3))

    # The paper compares at the learning rate that trains the *plain* optimizer fastest (found
    # by a search in factors of 3); we run plain and CProp at the paper's Fashion-MNIST lr times
    # each factor and pick that lr when summarising.
    for model in s["models"]:
        for opt in s["optimizers"]:
            for factor in s["lr_factors"]:
                for c in (None, 1.0):
                    for seed in range(seeds):
                        add(model, opt, factor, c, seed)
    # The c sweep (Fig. 11): first model, Adam at the paper's lr; c = 1 and plain (c -> inf)
    # come from the grid above.
    for c in s["sweep"]:
        for seed in range(seeds):
            add(s["models"][0], "Adam", 1.0, c, seed)
    return specs


def _data(cfg: dict[str, Any], ctx: RunContext) -> ClassificationData:
    def make() -> ClassificationData:
        data = load_classification(cfg["dataset"], ctx.settings.data_dir)
        if cfg["n_train"]:
            data = data.subset(cfg["n_train"], max(cfg["n_train"] // 4, 100))
        return data

    return ctx.cached(f"cprop:{cfg['dataset']}:{cfg['n_train']}", make)


def prepare(specs: list[RunSpec], ctx: RunContext) -> None:
    """Load the data once (a missing real dataset fails here, before any run)."""
    for spec in specs:
        _data(spec.config, ctx)


def make_optimizer(cfg: dict[str, Any], params: Any) -> Any:
    """The base optimizer with the paper's defaults, wrapped in ``ss.CProp`` when asked."""
    lr = cfg["lr"]
    opt = cfg["optimizer"]
    if opt == "SGD":
        base = torch.optim.SGD(params, lr=lr)
    elif opt == "Adam":
        base = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    elif opt == "AMSGrad":
        base = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, amsgrad=True)
    elif opt == "RMSprop":
        base = torch.optim.RMSprop(params, lr=lr, alpha=0.99, eps=1e-8)
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {opt!r}")
    if cfg["cprop_c"] is None:
        return base
    import steadystep as ss

    return ss.CProp(base, beta=0.999, c=cfg["cprop_c"], eps=1e-8)


@torch.no_grad()
def cprop_scales(opt: Any) -> torch.Tensor | None:
    """Every element's current CProp scale ``s``, flattened (None for a plain optimizer).

    Recomputed from the wrapper's documented ``cprop_state`` and group hyperparameters with the
    public functional core ``steadystep.optim.cprop.cprop_scales`` (the numbers the last step
    applied, since the statistics have not changed since).
    """
    state = getattr(opt, "cprop_state", None)
    if not state:
        return None
    from steadystep.optim.cprop import cprop_scales as scales_of

    out = []
    for group in opt.param_groups:
        sts = [state[p] for p in group["params"] if p in state]
        if not sts:
            continue
        second = "cprop_exp_avg_sq" if "cprop_exp_avg_sq" in sts[0] else "cprop_exp_avg_abs"
        scales = scales_of(
            [st["cprop_exp_avg"] for st in sts],
            [st[second] for st in sts],
            [st["step"] for st in sts],
            found_finite=torch.ones((), dtype=torch.bool, device=sts[0]["step"].device),
            beta=group["cprop_beta"],
            c=group["cprop_c"],
            eps=group["cprop_eps"],
            cdf=group["cprop_cdf"],
            method=group["cprop_method"],
        )
        out += [s.detach().flatten().float().cpu() for s in scales]
    return torch.cat(out) if out else None


def run(spec: RunSpec, ctx: RunContext) -> tuple[RunLog, dict[str, Any]]:
    cfg = spec.config
    data = _data(cfg, ctx)
    device = ctx.device
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    n = len(y_train)
    steps_per_epoch = n // BATCH
    model = build_classifier(cfg["model"], data.input_shape, data.n_classes).to(device)
    opt = make_optimizer(cfg, model.parameters())
    gen = torch.Generator().manual_seed(3000 + spec.seed)  # same batches with and without CProp
    eval_every = max(1, steps_per_epoch // cfg["evals_per_epoch"])
    log = RunLog(["step", "epoch", "loss", "train_loss", "test_loss", "test_error", "mean_scale"])
    hist_steps: list[int] = []
    hist_counts: list[list[int]] = []
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)

    def snapshot(step: int) -> dict[str, float]:
        row: dict[str, float] = {}
        row["train_loss"], _ = C.evaluate_classifier(model, x_train, y_train)
        row["test_loss"], row["test_error"] = C.evaluate_classifier(model, x_test, y_test)
        scales = cprop_scales(opt)
        if scales is not None and scales.numel():
            row["mean_scale"] = float(scales.mean())
        return row

    def histogram(step: int) -> None:
        scales = cprop_scales(opt)
        if scales is not None and scales.numel():
            hist_steps.append(step)
            hist_counts.append(np.histogram(scales.numpy(), bins=edges)[0].tolist())

    hist_every = max(1, cfg["epochs"] * steps_per_epoch // 50)  # ~50 rows in Fig. 8

    log.append(step=0, epoch=0.0, **snapshot(0))
    step = 0
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(n, generator=gen).to(device)
        for b in range(steps_per_epoch):
            idx = perm[b * BATCH : (b + 1) * BATCH]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            row: dict[str, float] = {
                "step": step,
                "epoch": step / steps_per_epoch,
                "loss": float(loss.detach()),
            }
            if step % eval_every == 0:
                row.update(snapshot(step))
            if cfg["histogram"] and step % hist_every == 0:
                histogram(step)
            log.append(**row)
            if step % 25 == 0:
                ctx.advance(25)
    ctx.advance(step % 25)
    final = log.rows[-1]
    cols = log.columns
    if not math.isfinite(final[cols.index("train_loss")]):
        log.rows[-1] = final  # the last step is always an eval step when evals divide the epoch
    last = [r for r in log.rows if math.isfinite(r[cols.index("train_loss")])][-1]
    losses = np.asarray(log.column("loss")[1:])
    summary: dict[str, Any] = {
        "final_train_loss": last[cols.index("train_loss")],
        "final_test_loss": last[cols.index("test_loss")],
        "final_test_error": last[cols.index("test_error")],
        "mean_minibatch_loss": float(np.mean(losses)),  # area under the curve: speed
        "final_mean_scale": last[cols.index("mean_scale")],
    }
    if hist_steps:
        summary["scale_histogram"] = {
            "edges": edges.tolist(),
            "steps": hist_steps,
            "counts": hist_counts,
        }
    return log, summary


# ----------------------------------------------------------------------------- report


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
            m, sd, k = C.mean_std([r["summary"][key] for r in runs])
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
        out.append(C.claim(CLAIM_SPEED, measured, verdict))
    st = summary["scale_stats"]
    if st:
        measured = (
            f"share of scales < 0.5: {100 * st['below_half_at_20pct']:.0f}% at step "
            f"{st['step_20pct']} (20% of training), "
            f"{100 * st['below_half_at_end']:.0f}% at the end; "
            f"share > 0.9 at the end: {100 * st['above_0.9_at_end']:.1f}%"
        )
        ok = st["below_half_at_20pct"] > 0.5 and 0.0 < st["above_0.9_at_end"] < 0.5
        out.append(C.claim(CLAIM_SCALE, measured, "reproduced" if ok else "not reproduced"))
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
            ok = (
                hi["final_test_error"]["mean"] < lo["final_test_error"]["mean"]
                and lo["final_train_loss"]["mean"] <= hi["final_train_loss"]["mean"]
            )
            out.append(C.claim(CLAIM_C, measured, "reproduced" if ok else "not reproduced"))
    return out


def figures(summary: dict[str, Any], records: list[dict[str, Any]], run_dir: Path) -> list[str]:
    plt = C.plt()
    out = []
    groups = _group(records)
    models = list(summary["table"])
    opts = [o for o in OPTIMIZERS if any(o in summary["table"][m] for m in models)]
    fig, axes = plt.subplots(
        len(models), len(opts), figsize=(3.4 * len(opts), 2.9 * len(models)), squeeze=False
    )
    for i, model in enumerate(models):
        for j, opt in enumerate(opts):
            ax = axes[i][j]
            lr = summary["best_lr"].get(model, {}).get(opt)
            for c, color, label in ((None, "tab:gray", opt), (1.0, "tab:blue", f"{opt} + CProp")):
                runs = groups.get((model, opt, lr, c)) if lr else None
                if not runs:
                    continue
                curves, x = [], None
                for r in runs:
                    d = read_csv(Path(r["csv_path"]))
                    ok = np.isfinite(d["train_loss"])
                    x, curves = d["step"][ok], [*curves, d["train_loss"][ok]]
                C.band_plot(ax, x, curves, label, color)
            ax.set_yscale("log")
            ax.set_title(f"{model}, {opt}, lr {lr}", fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
            if j == 0:
                ax.set_ylabel("training loss", fontsize=8)
            ax.legend(fontsize=7)
            ax.tick_params(labelsize=7)
    fig.suptitle(
        "CProp: training loss at the lr that trains the plain optimizer fastest, mean ± std "
        "over seeds (cf. the paper's Fig. 2)",
        fontsize=10,
    )
    fig.tight_layout()
    out.append(C.save(fig, run_dir / "figures" / "cprop_training_loss.png"))

    hist = next(
        (r["summary"]["scale_histogram"] for r in records if "scale_histogram" in r["summary"]),
        None,
    )
    if hist and hist["steps"]:
        counts = np.asarray(hist["counts"], dtype=np.float64)
        frac = counts / counts.sum(1, keepdims=True)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [3, 2]})
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
        a2.plot(steps, (frac * centers).sum(1), color="tab:blue")
        a2.set_xlabel("iteration", fontsize=8)
        a2.set_ylabel("mean scale", fontsize=8)
        a2.set_ylim(0, 1)
        fig.suptitle("CProp scale distribution over time (cf. the paper's Fig. 8)", fontsize=10)
        fig.tight_layout()
        out.append(C.save(fig, run_dir / "figures" / "cprop_scale_histogram.png"))

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
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
        cmap = plt.get_cmap("viridis")
        for k, (c, runs) in enumerate(sweep):
            label = "Adam (c = ∞)" if c is None else f"c = {c:g}"
            color = "tab:gray" if c is None else cmap(k / max(len(sweep) - 1, 1))
            tr, te, x = [], [], None
            for r in runs:
                d = read_csv(Path(r["csv_path"]))
                ok = np.isfinite(d["train_loss"])
                x = d["step"][ok]
                tr.append(d["train_loss"][ok])
                te.append(100 * d["test_error"][ok])
            C.band_plot(a1, x, tr, label, color)
            C.band_plot(a2, x, te, label, color)
        a1.set_yscale("log")
        a1.set_title("training loss", fontsize=9)
        a2.set_title("test error (%)", fontsize=9)
        for a in (a1, a2):
            a.set_xlabel("iteration", fontsize=8)
            a.tick_params(labelsize=7)
        a2.legend(fontsize=7)
        fig.suptitle(
            f"CProp overconfidence coefficient c, {model} + Adam lr {sweep_lr} "
            "(cf. the paper's Fig. 11)",
            fontsize=10,
        )
        fig.tight_layout()
        out.append(C.save(fig, run_dir / "figures" / "cprop_c_sweep.png"))
    return out


def _rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for model, opts in summary["table"].items():
        for opt, lrs in opts.items():
            for lr, cells in lrs.items():
                best = " (fastest plain)" if summary["best_lr"][model][opt] == lr else ""
                for tag, e in cells.items():
                    rows.append(
                        [
                            model,
                            opt,
                            lr + best,
                            tag,
                            f"{C.fmt(e['final_train_loss']['mean'], 4)} ± "
                            f"{C.fmt(e['final_train_loss']['std'], 4)}",
                            f"{C.fmt(e['mean_minibatch_loss']['mean'], 4)}",
                            C.fmt(100 * e["final_test_error"]["mean"], 2),
                            C.fmt(e["final_mean_scale"]["mean"], 3),
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
        C.markdown_table(_HEADER, _rows(summary)),
        "",
    ]
    for fpath in figs:
        lines += [f"![{Path(fpath).stem}]({Path(fpath).relative_to(run_dir).as_posix()})", ""]
    return "\n".join(lines)


def terminal(summary: dict[str, Any]) -> str:
    return "CProp: final losses (mean over seeds)\n" + C.text_table(_HEADER, _rows(summary))
