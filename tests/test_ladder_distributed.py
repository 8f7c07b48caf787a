"""The guard's collective decisions under torch.distributed (real gloo processes): apart from
tests/test_ladder.py so that mutation testing of the guard (make mutation) does not start
processes for every mutant."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import steadystep as ss
from tests.dist_utils import run_distributed
from tests.test_ladder import _batch, _mlp

# -- every rank decides alike ----------------------------------------------------------------------


def _perturbed_rank(rank: int, world: int) -> dict[str, Any]:
    """DDP-style replicas (the same gradients after an all-reduce), then a finite x1e4 on rank
    1's gradients alone: the guard's collective decision is the same on both ranks."""
    import torch.distributed as dist

    model = _mlp()
    opt = ss.CatastropheGuard(torch.optim.AdamW(model.parameters(), lr=1e-2))
    for step in range(40):
        x, y = _batch(step, 0)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        if step == 30 and rank == 1:
            for p in model.parameters():
                p.grad.mul_(1e4)
        opt.step(loss=loss.detach())
    return {
        "alarms": int(opt.alarms),
        "skips": int(opt.skips),
        "params": [p.detach().clone() for p in model.parameters()],
        "history": opt.history(),
    }


def test_a_one_rank_gradient_perturbation_is_decided_alike_on_every_rank():
    results = run_distributed(_perturbed_rank, world=2)
    assert results[0]["alarms"] == results[1]["alarms"] >= 1
    assert results[0]["history"] == results[1]["history"]
    assert results[0]["skips"] == results[1]["skips"]
    # the perturbed step was skipped on both ranks: the replicas stay bitwise equal
    assert all(map(torch.equal, results[0]["params"], results[1]["params"]))
