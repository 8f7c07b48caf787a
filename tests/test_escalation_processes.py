"""The escalation across processes: a restart from disk in a fresh interpreter, and two gloo
ranks (apart from tests/test_escalation.py so that mutation testing of the guard does not start
processes for every mutant)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tests.dist_utils import run_distributed
from tests.test_escalation import ROOT, _setup, _train


def _resume(path: str, stop: int, out: str) -> None:
    """Fresh process: build the run, load the checkpoint, train to ``stop``, save the weights."""
    model, opt, sampler, data = _setup("escalation")
    saved = torch.load(path, weights_only=False)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    drawn = _train(model, opt, sampler, data, saved["step"], stop)
    torch.save({"params": list(model.parameters()), "drawn": drawn}, out)


@pytest.mark.parametrize("at", [150, 212])
def test_a_restart_from_disk_in_a_fresh_process_skips_the_same_batches_bitwise(at, tmp_path):
    """Saved before the fault (the ring in the checkpoint) and inside the skip window (the
    sampler's skip list and position in it): the resumed run matches the uninterrupted one."""
    model, opt, sampler, data = _setup("escalation")
    drawn = _train(model, opt, sampler, data, 0, at)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": at}, path)
    drawn += _train(model, opt, sampler, data, at, 260)
    out = tmp_path / "resumed.pt"
    code = (
        "import sys; from tests.test_escalation_processes import _resume; "
        "_resume(sys.argv[1], int(sys.argv[2]), sys.argv[3])"
    )
    subprocess.run([sys.executable, "-c", code, str(path), "260", str(out)], cwd=ROOT, check=True)
    resumed = torch.load(out, weights_only=False)
    assert resumed["drawn"] == drawn[at:]
    assert len(opt.escalation.history) == 1
    assert not set(range(*opt.escalation.history[0]["skipped"])) & set(drawn)
    assert all(map(torch.equal, model.parameters(), resumed["params"]))


# -- every rank alike --------------------------------------------------------------------------


def _escalating_rank(rank: int, world: int) -> dict[str, Any]:
    """DDP-style replicas on each rank's share of the global batches; the stretch corrupts the
    global batches on every rank: both escalate at the same step and skip the same window."""
    import torch.distributed as dist

    model, opt, sampler, data = _setup("escalation")
    assert sampler.world_size == 2
    drawn = []
    step = 0
    while step < 250:
        for x, y in DataLoader(data, batch_sampler=sampler):
            drawn.append(sampler.position - 1)
            if sampler.position - 1 in range(100, 115):
                x = x * 100.0
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world)
            opt.step(loss=loss.detach())
            step += 1
            if step >= 250:
                break
    return {
        "history": opt.escalation.history,
        "windows": sampler.windows,
        "drawn": drawn,
        "params": [p.detach().clone() for p in model.parameters()],
    }


def test_two_ranks_escalate_alike():
    results = run_distributed(_escalating_rank, world=2)
    assert len(results[0]["history"]) == 1
    assert results[0]["history"] == results[1]["history"]
    assert results[0]["windows"] == results[1]["windows"]
    assert results[0]["drawn"] == results[1]["drawn"]
    assert all(map(torch.equal, results[0]["params"], results[1]["params"]))


def _fsdp2_escalating_rank(rank: int, world: int) -> dict[str, Any]:
    """FSDP2 shards (gloo, CPU): a stretch of steps whose loss on rank 1 alone is x100 (the
    guard decides on the rank mean); both ranks escalate at the same step and restore their
    shards of the same snapshot."""
    import steadystep as ss
    from tests.test_distributed import _batch, _fsdp_model

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    model = _fsdp_model()
    ring = ss.Escalation(every=5, keep=2)
    opt = ss.CatastropheGuard(torch.optim.AdamW(model.parameters(), lr=1e-2), escalation=ring)
    g = torch.Generator().manual_seed(500 + rank)
    at: dict[int, list[torch.Tensor]] = {}
    after: dict[int, list[torch.Tensor]] = {}
    for step in range(40):
        at[step] = [full(p).detach().clone() for p in model.parameters()]
        x, y = _batch(g, rank)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        bad = rank == 1 and 20 <= step < 35
        opt.step(loss=loss.detach() * (100.0 if bad else 1.0))
        after[step] = [full(p).detach().clone() for p in model.parameters()]
    (record,) = ring.history
    return {
        "history": ring.history,
        "restored": all(map(torch.equal, after[record["step"]], at[record["restored_to"]])),
        "params": [full(p).detach().clone() for p in model.parameters()],
    }


def test_fsdp2_shards_escalate_alike():
    results = run_distributed(_fsdp2_escalating_rank, world=2)
    assert results[0]["history"] == results[1]["history"]
    assert results[0]["history"][0]["restored_to"] == 20
    assert results[0]["restored"] and results[1]["restored"]
    assert all(map(torch.equal, results[0]["params"], results[1]["params"]))
