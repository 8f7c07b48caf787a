"""Running the CProp reproduction: the grid of runs, the paper's base optimizers with and
without CProp, and one training run (with the histogram of CProp's scales for Fig. 8).

The experiment is described in :mod:`steadystep.experiments.cprop`; its report is
:mod:`steadystep.experiments.cprop.reporting`.
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
from steadystep.experiments.scales import CPROP as SCALES
from steadystep.experiments.scales import CPROP_OPTIMIZERS as OPTIMIZERS

__all__ = [
    "BATCH",
    "LRS",
    "OPTIMIZERS",
    "SCALES",
    "flops",
    "make_optimizer",
    "name",
    "plan",
    "prepare",
    "requires",
    "run",
    "title",
]

name = "cprop"
title = "CProp: update scaling by past-gradient conformity"
requires = ("CProp",)

# The paper's learning rates for Fashion-MNIST (supplement, Figs. 15/16); AMSGrad shares Adam's.
LRS = {
    "FC": {"SGD": 0.1, "Adam": 1e-3, "RMSprop": 1e-3, "AMSGrad": 1e-3},
    "CNN": {"SGD": 0.3, "Adam": 3e-3, "RMSprop": 3e-3, "AMSGrad": 3e-3},
}
BATCH = 32
HIST_BINS = 40


def plan(settings: Settings) -> list[RunSpec]:
    s = SCALES[settings.scale]
    shared = classification_config(name, settings, s, "fashion-mnist")
    seeds = settings.seeds or s["seeds"]
    n_steps = s["epochs"] * 125  # MNIST-1D: 4000 / 32; only used for progress
    specs = []

    def add(model: str, opt: str, factor: float, c: float | None, seed: int) -> None:
        lr = float(f"{LRS[model][opt] * factor:.3g}")
        config = dict(
            **shared,
            model=model,
            optimizer=opt,
            lr=lr,
            lr_factor=factor,
            cprop_c=c,
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


def flops(spec: RunSpec) -> float:
    """Rough FLOPs of the run (:mod:`steadystep.experiments.estimate`): training steps and the
    evaluations on the training and test sets."""
    return classifier_flops(name, spec.config, lambda n: BATCH, eval_train=True)


def _data(cfg: dict[str, Any], ctx: RunContext) -> ClassificationData:
    return classification_data(name, cfg, ctx)


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


def _scales_of(opt: Any) -> torch.Tensor | None:
    """Every element's current CProp scale (:meth:`~steadystep.CProp.scales`), flattened on
    the CPU; None for a plain optimizer or before the first step."""
    import steadystep as ss

    scales = opt.scales() if isinstance(opt, ss.CProp) else {}
    if not scales:
        return None
    return torch.cat([s.detach().flatten().float().cpu() for s in scales.values()])


def run(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    cfg = spec.config
    data = _data(cfg, ctx).to(ctx.device)
    steps_per_epoch = len(data.y_train) // BATCH
    model = build_classifier(cfg["model"], data.input_shape, data.n_classes).to(ctx.device)
    opt = make_optimizer(cfg, model.parameters())
    gen = torch.Generator().manual_seed(3000 + spec.seed)  # same batches with and without CProp
    eval_every = max(1, steps_per_epoch // cfg["evals_per_epoch"])
    columns = ("epoch", "loss", "train_loss", "test_loss", "test_error", "mean_scale")
    hist_steps: list[int] = []
    hist_counts: list[list[int]] = []
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)

    def snapshot() -> dict[str, float]:
        row: dict[str, float] = {}
        row["train_loss"], _ = evaluate_classifier(model, data.x_train, data.y_train)
        row["test_loss"], row["test_error"] = evaluate_classifier(model, data.x_test, data.y_test)
        scales = _scales_of(opt)
        if scales is not None and scales.numel():
            row["mean_scale"] = float(scales.mean())
        return row

    def histogram(step: int) -> None:
        scales = _scales_of(opt)
        if scales is not None and scales.numel():
            hist_steps.append(step)
            hist_counts.append(np.histogram(scales.numpy(), bins=edges)[0].tolist())

    hist_every = max(1, cfg["epochs"] * steps_per_epoch // 50)  # ~50 rows in Fig. 8

    with ctx.log() as log:

        def record(step: int, **values: float) -> None:
            log.step(step=step, **{**dict.fromkeys(columns, math.nan), **values})

        record(0, epoch=0.0, **snapshot())
        for step, loss in minibatch_steps(model, opt, data, ctx, BATCH, cfg["epochs"], gen):
            values = {"epoch": step / steps_per_epoch, "loss": float(loss.detach())}
            if step % eval_every == 0:
                values.update(snapshot())
            if cfg["histogram"] and step % hist_every == 0:
                histogram(step)
            record(step, **values)
    rows = log.history
    last = [r for r in rows if math.isfinite(r["train_loss"])][-1]  # the last evaluation
    losses = np.asarray([r["loss"] for r in rows][1:])
    summary: dict[str, Any] = {
        "final_train_loss": last["train_loss"],
        "final_test_loss": last["test_loss"],
        "final_test_error": last["test_error"],
        "mean_minibatch_loss": float(np.mean(losses)),  # area under the curve: speed
        "final_mean_scale": last["mean_scale"],
    }
    if hist_steps:
        summary["scale_histogram"] = {
            "edges": edges.tolist(),
            "steps": hist_steps,
            "counts": hist_counts,
        }
    return summary
