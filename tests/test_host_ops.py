"""The guard's host work per step does not grow with the number of tensors on its sync-free
paths: every per-tensor pass is one kernel call, so the operations dispatched from Python per
step are the same for a model of 2 layers and of 20 (a count of ATen calls, not a timing)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch

import steadystep as ss
from tests.dispatch import CountOps


def _ops_per_step(layers: int, make: Callable[[torch.nn.Module], Any]) -> Counter[str]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(layers)])
    opt = make(model)

    def backward() -> None:
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()

    for _ in range(3):  # past the lazily created state and snapshots
        backward()
        opt.step(loss=torch.tensor(1.0))
    backward()
    with CountOps() as count:
        opt.step(loss=torch.tensor(1.0))
    return count.calls


@pytest.mark.parametrize(
    "make",
    [
        lambda m: ss.CatastropheGuard(ss.CPropAdamW(m.parameters(), lr=1e-3)),
        lambda m: ss.CatastropheGuard(torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)),
        lambda m: ss.SALeRA(ss.layer_groups(m), lr=1e-3),
    ],
    ids=["CPropAdamW", "torch AdamW fused", "SALeRA"],
)
def test_host_operations_per_guarded_step_do_not_grow_with_the_tensors(make):
    small, large = _ops_per_step(2, make), _ops_per_step(20, make)
    assert small == large, {k: (small[k], large[k]) for k in small.keys() | large.keys()}


@pytest.mark.parametrize(
    "make",
    [
        lambda m: ss.CatastropheGuard(ss.CPropAdamW(m.parameters(), lr=1e-3)),
        lambda m: ss.CatastropheGuard(torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)),
        lambda m: ss.stabilize(torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)),
        lambda m: ss.SALeRA(ss.layer_groups(m), lr=1e-3),
    ],
    ids=["CPropAdamW", "torch AdamW fused", "stabilize", "SALeRA"],
)
def test_a_guarded_step_on_the_cpu_dispatches_a_few_dozen_operations(make):
    """The detector's update and the ladder are one C call each on the CPU (Note [the detector
    kernel], Note [the ladder kernel]): a guarded step dispatches at most 30 operations (the
    optimizer's own included; 19-25 today), where their torch code dispatched about 260."""
    calls = _ops_per_step(2, make)
    assert sum(calls.values()) <= 30, calls
