"""Running the SALeRA reproduction: the grid of runs, the paper's algorithms and one training
run.

The experiment is described in :mod:`steadystep.experiments.salera`; its report is
:mod:`steadystep.experiments.salera.reporting`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from steadystep.experiments._common import (
    classification_config,
    classification_data,
    classifier_flops,
    evaluate_classifier,
    minibatch_steps,
)
from steadystep.experiments.datasets import ClassificationData
from steadystep.experiments.models import build_classifier
from steadystep.experiments.runner import RunContext, RunSpec, Settings
from steadystep.experiments.scales import SALERA as SCALES

__all__ = [
    "ALGORITHMS",
    "FAIL_ERROR",
    "ROBUST",
    "SCALES",
    "flops",
    "hp_id",
    "layer_lrs",
    "make_optimizer",
    "name",
    "plan",
    "prepare",
    "requires",
    "run",
    "title",
]

name = "salera"
title = "SALeRA: agnostic learning-rate adaptation with catastrophe detection"
requires = ("ALeRA", "AgAdam", "SALeRA", "SPALeRA", "layer_groups")

ALGORITHMS = ("NAG", "Adagrad", "Adam", "Ag-Adam", "ALeRA", "SALeRA", "SPALeRA")
FAIL_ERROR = 0.8  # a run failed when its test error after the last epoch is above this

# The paper's robust settings (Table 2); lr is a run parameter.
ROBUST: dict[str, dict[str, float]] = {
    "NAG": {"momentum": 0.9, "lr": 0.1},
    "Adagrad": {"lr": 0.01},
    "Adam": {"beta1": 0.8, "beta2": 0.9999, "lr": 1e-3},
    "Ag-Adam": {"alpha": 0.001, "C": 3e-6, "lr": 1e-3},
    "ALeRA": {"alpha": 0.01, "C": 3e-6, "lr": 0.1},
    "SALeRA": {"alpha": 0.01, "C": 3e-6, "lr": 0.1},
    "SPALeRA": {"alpha": 0.1, "C": 3e-8, "lr": 0.1},
}


def _product(**axes: tuple[Any, ...]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{}]
    for key, values in axes.items():
        out = [{**d, key: v} for d in out for v in values]
    return out


def _grid(scale: str) -> dict[str, list[dict[str, Any]]]:
    """Hyperparameter settings per algorithm at each scale."""
    if scale in ("tiny", "demo"):
        # The paper's three smallest alphas x two largest Cs at its largest eta_0: all 6
        # combinations, not only those where SALeRA wins (alpha = 0.001 with C = 3e-5 is where
        # ALeRA fails on MNIST-1D in 20 epochs). One eta_0 keeps the demo within its time.
        agn = _product(alpha=(0.001, 0.01, 0.1), C=(3e-6, 3e-5), lr=(1.0,))
        if scale == "tiny":
            agn = agn[-1:]
        return {
            **{a: [ROBUST[a]] for a in ("NAG", "Adagrad", "Adam", "Ag-Adam", "SPALeRA")},
            "ALeRA": agn,
            "SALeRA": agn,
        }
    if scale == "quick":
        agn = _product(alpha=(0.001, 0.01, 0.1, 0.25), C=(3e-6, 3e-5), lr=(0.1, 1.0))
        return {
            "NAG": _product(momentum=(0.9, 0.99), lr=(0.01, 0.1)),
            "Adagrad": _product(lr=(0.01, 0.1)),
            "Adam": [
                {"beta1": 0.8, "beta2": 0.9999, "lr": 1e-3},
                {"beta1": 0.9, "beta2": 0.999, "lr": 1e-3},
            ],
            "Ag-Adam": _product(alpha=(0.001, 0.01), C=(3e-6, 3e-5), lr=(1e-3,)),
            "ALeRA": agn,
            "SALeRA": agn,
            "SPALeRA": _product(alpha=(0.1,), C=(3e-8, 3e-7), lr=(0.1,)),
        }
    # The paper's grid (Sec. 3.1); eta_0 "from 1e-5 to 1 depending on the algorithm".
    lrs_sgd = (1e-3, 1e-2, 0.1, 1.0)
    lrs_ada = (1e-4, 1e-3, 1e-2)
    alphas = (0.001, 0.01, 0.1, 0.25)
    cs = (3e-8, 3e-7, 3e-6, 3e-5)
    return {
        "NAG": _product(momentum=(0.8, 0.9, 0.99, 0.999), lr=lrs_sgd),
        "Adagrad": _product(lr=(1e-3, 1e-2, 0.1)),
        "Adam": _product(beta1=(0.8, 0.9, 0.99), beta2=(0.99, 0.999, 0.9999), lr=lrs_ada),
        "Ag-Adam": _product(alpha=alphas, C=cs, lr=lrs_ada),
        "ALeRA": _product(alpha=alphas, C=cs, lr=lrs_sgd),
        "SALeRA": _product(alpha=alphas, C=cs, lr=lrs_sgd),
        "SPALeRA": _product(alpha=alphas, C=cs, lr=lrs_sgd),
    }


def hp_id(hp: dict[str, Any]) -> str:
    return "_".join(f"{k}{v:g}" for k, v in hp.items())


def plan(settings: Settings) -> list[RunSpec]:
    s = SCALES[settings.scale]
    shared = classification_config(name, settings, s, "mnist") | {"early_epoch": s["early"]}
    seeds = settings.seeds or s["seeds"]
    grid = _grid(settings.scale)
    specs = []
    for model in s["models"]:
        for alg in ALGORITHMS:
            for hp in grid[alg]:
                for seed in range(seeds):
                    config = dict(**shared, model=model, algorithm=alg, hp=hp)
                    run_id = f"{model}-{alg}-{hp_id(hp)}-s{seed}"
                    weight = {"M0": 0.3, "M2": 1.0, "M2b": 1.3, "M4": 3.0}[model]
                    steps = s["epochs"] * 100  # 1% mini-batches: 100 steps per epoch
                    specs.append(RunSpec(name, run_id, config, seed, steps, steps * weight * 1e-3))
    return specs


def flops(spec: RunSpec) -> float:
    """Rough FLOPs of the run (:mod:`steadystep.experiments.estimate`): training steps and
    test-set evaluations."""
    return classifier_flops(name, spec.config, _batch_size, eval_train=False)


def _batch_size(n: int) -> int:
    return max(1, round(0.01 * n))  # the paper's 1% mini-batches


def _data(cfg: dict[str, Any], ctx: RunContext) -> ClassificationData:
    # The paper normalises each coordinate with the training set's mean and std.
    return classification_data(name, cfg, ctx, standardize="coordinate")


def prepare(specs: list[RunSpec], ctx: RunContext) -> None:
    """Load the data once (a missing real dataset fails here, before any run)."""
    for spec in specs:
        _data(spec.config, ctx)


def make_optimizer(alg: str, model: torch.nn.Module, hp: dict[str, Any], rho: float) -> Any:
    """The paper's algorithms; the agnostic ones with one learning rate per layer."""
    import steadystep as ss

    lr = hp["lr"]
    if alg == "NAG":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=hp["momentum"], nesterov=True)
    if alg == "Adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=lr)
    if alg == "Adam":
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(hp["beta1"], hp["beta2"]))
    if alg == "Ag-Adam":
        return ss.AgAdam(ss.layer_groups(model), lr=lr, alpha=hp["alpha"], C=hp["C"])
    if alg == "ALeRA":
        return ss.ALeRA(ss.layer_groups(model), lr=lr, alpha=hp["alpha"], C=hp["C"])
    if alg in ("SALeRA", "SPALeRA"):
        # Same guard settings for both; SPALeRA's per-element rates are summarised per layer.
        guarded = ss.SALeRA if alg == "SALeRA" else ss.SPALeRA
        return guarded(
            ss.layer_groups(model),
            lr=lr,
            alpha=hp["alpha"],
            C=hp["C"],
            ph_lambda=0.1,
            rho=rho,
            min_lr=0.0,  # a run goes on instead of raising TrainingDiverged
        )
    raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {alg!r}")


def layer_lrs(opt: Any) -> torch.Tensor:
    """Effective learning rate of each param group (float64, on the CPU): ALeRA's
    :meth:`~steadystep.ALeRA.group_lrs` (inside a guard too), else each group's ``lr``."""
    import steadystep as ss

    base = opt.optimizer if isinstance(opt, ss.CatastropheGuard) else opt
    if isinstance(base, ss.ALeRA):
        return base.group_lrs().cpu()
    return torch.tensor([float(g["lr"]) for g in opt.param_groups], dtype=torch.float64)


def _alarms(opt: Any) -> float:
    stats = getattr(opt, "stats", None)
    if stats is None:
        return math.nan
    s = stats()
    for key in ("alarms", "num_alarms", "alarm_count", "rollbacks"):
        if key in s:
            return float(s[key])
    return math.nan


def run(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    cfg = spec.config
    data = _data(cfg, ctx).to(ctx.device)
    n = len(data.y_train)
    bs = _batch_size(n)
    steps_per_epoch = n // bs
    model = build_classifier(cfg["model"], data.input_shape, data.n_classes).to(ctx.device)
    opt = make_optimizer(cfg["algorithm"], model, cfg["hp"], rho=bs / n)
    is_ss = type(opt).__module__.startswith("steadystep")
    gen = torch.Generator().manual_seed(2000 + spec.seed)  # same batches for every algorithm
    n_groups = len(opt.param_groups)
    group_names = [str(g.get("name", i)) for i, g in enumerate(opt.param_groups)]
    columns = ["epoch", "loss", "test_error", "test_loss", "alarms"]
    columns += [f"lr_{i}" for i in range(n_groups)]
    eval_every = max(1, steps_per_epoch // cfg["evals_per_epoch"])
    errors_at: dict[int, float] = {}
    with ctx.log() as log:

        def record(step: int, **values: float) -> dict[str, float]:
            row = {**dict.fromkeys(columns, math.nan), **values, **_lr_cols(layer_lrs(opt))}
            log.step(step=step, **row)
            return row

        tl0, err0 = evaluate_classifier(model, data.x_test, data.y_test)
        record(0, epoch=0.0, test_error=err0, test_loss=tl0)
        steps = minibatch_steps(model, opt, data, ctx, bs, cfg["epochs"], gen, pass_loss=is_ss)
        for step, loss in steps:
            epoch_end = step % steps_per_epoch == 0
            values = {"epoch": step / steps_per_epoch, "loss": float(loss.detach())}
            if step % eval_every == 0 or epoch_end:
                test_loss, test_error = evaluate_classifier(model, data.x_test, data.y_test)
                values.update(test_loss=test_loss, test_error=test_error, alarms=_alarms(opt))
            row = record(step, **values)
            if epoch_end:
                errors_at[step // steps_per_epoch] = row["test_error"]
    rows = log.history
    final_epoch = cfg["epochs"]
    early = min(cfg["early_epoch"], final_epoch)
    losses = np.asarray([r["loss"] for r in rows][1:])
    last = losses[-steps_per_epoch:]
    lrs = np.asarray([[r[f"lr_{i}"] for r in rows] for i in range(n_groups)])
    return {
        "test_error_early": errors_at[early],
        "test_error_final": errors_at[final_epoch],
        "final_train_loss": float(np.mean(last)),
        "failed": int(not (errors_at[final_epoch] <= FAIL_ERROR)),  # NaN counts as failed
        "alarms": _alarms(opt),
        "max_lr": float(np.nanmax(lrs)),
        "layers": group_names,
    }


def _lr_cols(lrs: torch.Tensor) -> dict[str, float]:
    return {f"lr_{i}": v for i, v in enumerate(lrs.tolist())}
