"""Two real processes (gloo, CPU), different data per rank and a spike on ONE rank only: every
decision (ALRC moments and thresholds, Page-Hinkley alarms, rollbacks, LR cuts) is identical on
both ranks and the parameters are bitwise equal after 20 steps, under DDP and FSDP2.

One spawn per test module section keeps this file fast: each worker runs several scenarios."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import steadystep as ss
from tests.dist_utils import run_distributed

STEPS = 20
SPIKE = 12


def _mlp():
    torch.manual_seed(0)  # same initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batch(g, rank):
    x = torch.randn(16, 4, generator=g) * (1 + rank)  # different data on every rank
    return x, x.sum(dim=1, keepdim=True) * 0.3


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _alrc_cprop(rank, make_opt):
    """ALRC on per-sample losses + a CProp optimizer under DDP; the spike is on rank 1 only."""
    model = DDP(_mlp())
    alrc = ss.ALRC(beta1=0.9, beta2=0.9)
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(100 + rank)
    thresholds, clipped, scales = [], [], []
    for step in range(STEPS):
        x, y = _batch(g, rank)
        per_sample = (model(x) - y).pow(2).squeeze(1)
        if rank == 1 and step == SPIKE:
            per_sample = per_sample * 50.0
        thresholds.append(alrc.stats()["threshold"])
        loss = alrc(per_sample).mean()
        clipped.append(alrc.stats()["clipped_fraction"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        scales.append(opt.stats()["mean_scale"])
    return {
        "params": _params(model),
        "moments": torch.stack([alrc.mu1, alrc.mu2]),
        "thresholds": torch.stack(thresholds),
        "clipped": torch.stack(clipped),
        "scales": torch.stack(scales),
    }


def _salera(rank):
    """SALeRA under DDP: the loss jumps on rank 1 only; the detector sees the mean over ranks."""
    net = _mlp()
    model = DDP(net)
    opt = ss.SALeRA(ss.layer_groups(net), lr=0.05, rho=0.5, ph_lambda=0.5)
    g = torch.Generator().manual_seed(200 + rank)
    alarms, multipliers = [], []
    for step in range(STEPS):
        x, y = _batch(g, rank)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        observed = loss.detach() + (100.0 if rank == 1 and step == SPIKE else 0.0)
        opt.step(loss=observed)
        alarms.append(opt.stats()["alarms"].clone())
        multipliers.append(torch.stack([grp["lr_multiplier"].clone() for grp in opt.param_groups]))
    return {
        "params": _params(model),
        "alarms": torch.stack(alarms),
        "multipliers": torch.stack(multipliers),
        "history": opt.history(),
        "detector": opt.stats()["detector_threshold"],
    }


def _ddp_worker(rank, world):
    return {
        "cprop": _alrc_cprop(
            rank, lambda ps: ss.CProp(torch.optim.AdamW(ps, lr=1e-2), beta=0.9, c=1.0)
        ),
        "cpropadamw": _alrc_cprop(
            rank, lambda ps: ss.CPropAdamW(ps, lr=1e-2, cprop_beta=0.9, cprop_c=1.0)
        ),
        "salera": _salera(rank),
    }


@pytest.fixture(scope="module")
def ddp_results():
    return run_distributed(_ddp_worker, world=2)


@pytest.mark.parametrize("name", ["cprop", "cpropadamw"])
def test_ddp_alrc_and_cprop_decide_alike_and_params_bitwise_equal(ddp_results, name):
    r0, r1 = ddp_results[0][name], ddp_results[1][name]
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(r0["moments"], r1["moments"])
    assert torch.equal(r0["thresholds"], r1["thresholds"])  # the same clipping rule everywhere
    assert torch.equal(r0["scales"], r1["scales"])
    # the spike was clipped on the rank that saw it, with the shared threshold
    assert float(r1["clipped"][SPIKE]) > 0.5
    assert float(r0["clipped"][SPIKE]) < 0.5
    assert torch.isfinite(r0["params"][0]).all()


def test_ddp_salera_alarms_on_every_rank_at_the_spike(ddp_results):
    r0, r1 = ddp_results[0]["salera"], ddp_results[1]["salera"]
    assert torch.equal(r0["alarms"], r1["alarms"])
    assert int(r0["alarms"][SPIKE - 1]) == 0 and int(r0["alarms"][SPIKE]) == 1
    assert int(r0["alarms"][-1]) == 1
    # the same alarm steps; the loss each rank records in its history is its own (local) loss
    assert [h["step"] for h in r0["history"]] == [h["step"] for h in r1["history"]] == [SPIKE]
    assert torch.equal(r0["multipliers"], r1["multipliers"])
    assert torch.equal(r0["detector"], r1["detector"])
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)


# -- FSDP2 -----------------------------------------------------------------------------------


def _fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp_run(rank, make_opt, needs_loss=False):
    model = _fsdp_model()
    alrc = ss.ALRC(beta1=0.9, beta2=0.9)
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(300 + rank)
    for step in range(STEPS):
        x, y = _batch(g, rank)
        per_sample = (model(x) - y).pow(2).squeeze(1)
        if rank == 1 and step == SPIKE:
            per_sample = per_sample * 50.0
        loss = alrc(per_sample).mean()
        opt.zero_grad()
        loss.backward()
        if needs_loss:
            opt.step(loss=loss.detach())
        else:
            opt.step()
    full = [p.full_tensor().detach().clone() for p in model.parameters()]
    return {"params": full, "moments": torch.stack([alrc.mu1, alrc.mu2])}


FSDP_CASES = {
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2), False),
    "cprop": (lambda ps: ss.CProp(torch.optim.AdamW(ps, lr=1e-2)), False),
    "cpropadamw": (lambda ps: ss.CPropAdamW(ps, lr=1e-2), False),
    "salera": (lambda ps: ss.SALeRA(ps, lr=0.05, granularity="global"), True),
}


def _fsdp_worker(rank, world):
    out = {}
    for name, (make_opt, needs_loss) in FSDP_CASES.items():
        try:
            out[name] = _fsdp_run(rank, make_opt, needs_loss)
        except Exception as exc:  # record what fails, precisely, for the report and the xfails
            out[name] = f"{type(exc).__name__}: {exc}"
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def fsdp_results():
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    return run_distributed(_fsdp_worker, world=2)


def _check_fsdp(fsdp_results, name):
    r0, r1 = fsdp_results[0][name], fsdp_results[1][name]
    assert not isinstance(r0, str), r0
    assert torch.equal(r0["moments"], r1["moments"])  # ALRC's statistics are rank-averaged
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)
        assert torch.isfinite(a).all()


def test_fsdp2_alrc_with_adamw_on_gloo_cpu(fsdp_results):
    _check_fsdp(fsdp_results, "adamw")


# Known limitation (torch 2.13, gloo CPU): FSDP2 parameters are DTensors. CProp's step counter is
# a plain 0-d tensor updated in place with a flag computed from DTensor gradients
# (`state_steps[i].add_(keep32)` raises in DTensor dispatch), and CatastropheGuard allocates its
# rollback snapshot with `torch.empty(p.shape)` (a plain tensor) and `copy_`s a DTensor into it.
# ALeRA's "global" norm would also need an all-reduce over shards. These xfails flip to passes
# (strict) once the optimizers handle DTensor parameters.
@pytest.mark.xfail(strict=True, reason="CProp and the guard do not handle FSDP2 DTensor params yet")
@pytest.mark.parametrize("name", ["cprop", "cpropadamw", "salera"])
def test_fsdp2_steadystep_optimizers(fsdp_results, name):
    _check_fsdp(fsdp_results, name)


# -- the torchrun example ----------------------------------------------------------------------


def test_torchrun_example_runs(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    csv_path = tmp_path / "monitor.csv"
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--nproc_per_node=2", "--standalone", "examples/ddp_train.py"]
    cmd += ["--steps", "6", "--spike-step", "4", "--csv", str(csv_path)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for rank in (0, 1):
        assert f"rank {rank}/2" in proc.stdout and "params equal to rank 0: True" in proc.stdout
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("step,loss,alrc/threshold") and len(lines) == 7
