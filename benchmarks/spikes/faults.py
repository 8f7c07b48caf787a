"""Seeded fault injection for the spike benchmark.

Four kinds, each applied at one step ``s``:

* ``bad_update``: the update of step ``s`` is taken at ``k`` times the learning rate (``k``
  log-uniform in [10, 1000]). It shows in the loss of step ``s + 1``.
* ``corrupt_batch``: the minibatch of step ``s`` is corrupted: labels shuffled within the batch
  or inputs x100 (classifiers, alternately); tokens shuffled within each window, or replaced by
  uniform random tokens (the language model, alternately). It shows in the loss of step ``s``.
* ``grad_explosion``: the gradients of step ``s`` are multiplied by ``m`` (log-uniform in
  [1e2, 1e4]) before the update. The gradient norm shows it at step ``s`` (before the update),
  the loss at step ``s + 1``.
* ``nan_loss``: the loss of step ``s`` is NaN (and so are its gradients).

``show`` is the offset from ``s`` of the step whose loss shows the fault; ``early`` the first
offset at which a detector may legitimately alarm (0 for an explosion: its gradient norm).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

__all__ = ["KINDS", "FaultSpec", "corrupt", "plan_faults"]

KINDS = ("bad_update", "corrupt_batch", "grad_explosion", "nan_loss")
SHOW = {"bad_update": 1, "corrupt_batch": 0, "grad_explosion": 1, "nan_loss": 0}
EARLY = {"bad_update": 1, "corrupt_batch": 0, "grad_explosion": 0, "nan_loss": 0}


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    step: int
    magnitude: float  # lr factor, gradient factor, or the corruption variant (0 or 1)

    @property
    def show(self) -> int:
        return SHOW[self.kind]

    @property
    def early(self) -> int:
        return EARLY[self.kind]


def plan_faults(
    steps: int, per_kind: dict[str, int], seed: int, *, first: int = 25, margin: int = 8
) -> list[FaultSpec]:
    """``per_kind[kind]`` faults of each kind at distinct random steps in ``[first, steps -
    margin)``, sorted by step (seeded; one fault per step)."""
    rng = random.Random(seed)
    total = sum(per_kind.values())
    candidates = list(range(first, steps - margin))
    if total > len(candidates):
        raise ValueError(f"{total} faults do not fit in {len(candidates)} steps")
    where = rng.sample(candidates, total)
    out, i = [], 0
    for kind in KINDS:
        for j in range(per_kind.get(kind, 0)):
            if kind == "bad_update":
                magnitude = 10 ** rng.uniform(1, 3)
            elif kind == "grad_explosion":
                magnitude = 10 ** rng.uniform(2, 4)
            elif kind == "corrupt_batch":
                magnitude = float(j % 2)
            else:
                magnitude = math.nan
            out.append(FaultSpec(kind, where[i], magnitude))
            i += 1
    return sorted(out, key=lambda f: f.step)


def corrupt(
    x: torch.Tensor, y: torch.Tensor, variant: float, *, language_model: bool, vocab: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A corrupted copy of the minibatch ``(x, y)`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    if language_model:
        window = torch.cat([x, y[:, -1:]], dim=1)
        if variant == 0.0:  # shuffled tokens within each window
            perm = torch.argsort(torch.rand(window.shape, generator=gen), dim=1)
            window = window.gather(1, perm)
        else:  # uniform random tokens
            window = torch.randint(0, vocab, window.shape, generator=gen)
        return window[:, :-1], window[:, 1:]
    if variant == 0.0:  # labels shuffled within the batch
        return x, y[torch.randperm(len(y), generator=gen)]
    return x * 100.0, y  # inputs x100 (a scaling glitch)
