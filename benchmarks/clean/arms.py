"""The arms: what wraps (or replaces) the plain optimizer. Add an arm by adding a builder.

A builder gets the plain optimizer (torch's AdamW or SGD-momentum, built on the model's
parameters at the run's learning rate, not yet stepped) and an :class:`ArmContext`, and returns
the optimizer the run steps. The run feeds it by what it is: a :class:`~steadystep.Stabilized`
gets ``opt.clip(per_sample)`` then ``opt.step()`` (the README recipe); anything with
``observe_loss`` (a guard) gets ``opt.step(loss=raw_mean)``; anything else ``opt.step()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import steadystep as ss

__all__ = ["ARMS", "ArmContext", "base_optimizer"]

WEIGHT_DECAY = {"adamw": 1e-2, "sgd": 0.0}
MOMENTUM = 0.9


@dataclass(frozen=True)
class ArmContext:
    model: torch.nn.Module
    optimizer: str  # "adamw" or "sgd"
    lr: float
    batch_size: int
    dataset_size: int


def base_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """The plain optimizer: torch's AdamW (weight decay 1e-2) or SGD (momentum 0.9, Nesterov)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY["adamw"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, nesterov=True)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")


def _plain(base, ctx):
    return base


def _guard(base, ctx):
    return ss.CatastropheGuard(base, model=ctx.model)


def _stabilize(base, ctx):
    """The recipe with its defaults (the guard; ALRC and CProp opt-in)."""
    return ss.stabilize(base, model=ctx.model)


def _stabilize_alrc(base, ctx):
    return ss.stabilize(base, alrc=True, model=ctx.model)


def _stabilize_alrc5(base, ctx):
    """The recipe with a looser ALRC (5 running standard deviations)."""
    return ss.stabilize(base, alrc={"n_sigma": 5.0}, model=ctx.model)


def _stabilize_cprop(base, ctx):
    return ss.stabilize(base, cprop=True, model=ctx.model)


def _cprop(base, ctx):
    """The native CProp class with the base's hyperparameters (the base is dropped)."""
    params = list(ctx.model.parameters())
    if ctx.optimizer == "adamw":
        return ss.CPropAdamW(params, lr=ctx.lr, weight_decay=WEIGHT_DECAY["adamw"])
    return ss.CPropSGD(params, lr=ctx.lr, momentum=MOMENTUM, nesterov=True)


Builder = Callable[[torch.optim.Optimizer, ArmContext], torch.optim.Optimizer]

# name -> (builder, what it is, in one line for the tables)
ARMS: dict[str, tuple[Builder, str]] = {
    "plain": (_plain, "the plain optimizer"),
    "guard": (_guard, "`ss.CatastropheGuard(opt, model=model)`"),
    "stabilize": (_stabilize, "`ss.stabilize(opt, model=model)` (the recipe's defaults)"),
    "stabilize_alrc": (_stabilize_alrc, "the recipe with `alrc=True` (3 standard deviations)"),
    "stabilize_alrc5": (_stabilize_alrc5, "the recipe with `alrc={'n_sigma': 5.0}`"),
    "stabilize_cprop": (_stabilize_cprop, "the recipe with `cprop=True`"),
    "cprop": (_cprop, "`ss.CPropAdamW` / `ss.CPropSGD` alone"),
}
