"""Two real processes (gloo, CPU), different data per rank and a spike on ONE rank only: every
decision (ALRC moments and thresholds, Page-Hinkley alarms, rollbacks, LR cuts) is identical on
both ranks and the parameters are bitwise equal after 20 steps, under DDP and FSDP2.

One spawn per test module section keeps this file fast: each worker runs several scenarios."""

from __future__ import annotations

import itertools

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
        if step == SPIKE:
            spike_mean = observed.clone()
            dist.all_reduce(spike_mean)
            spike_mean /= dist.get_world_size()
        opt.step(loss=observed)
        alarms.append(opt.stats()["alarms"].clone())
        multipliers.append(torch.stack([grp["lr_multiplier"].clone() for grp in opt.param_groups]))
    return {
        "params": _params(model),
        "alarms": torch.stack(alarms),
        "multipliers": torch.stack(multipliers),
        "history": opt.history(),
        "detector": opt.stats()["detector_threshold"],
        "spike_mean": spike_mean,
    }


NAN_STEP_DDP = 7
DDP_NAN_CASES = {
    "cpropadamw": (lambda net: ss.CPropAdamW(net.parameters(), lr=1e-2), False),
    "agadam": (lambda net: ss.AgAdam(ss.layer_groups(net), lr=1e-2), False),
    "alera_param": (lambda net: ss.ALeRA(net.parameters(), lr=0.05, granularity="param"), False),
    "salera": (lambda net: ss.SALeRA(ss.layer_groups(net), lr=0.05), True),
    "guard_adamw": (
        lambda net: ss.CatastropheGuard(torch.optim.AdamW(net.parameters(), lr=1e-2)),
        True,
    ),
    "guard_cprop_adamw": (
        lambda net: ss.CatastropheGuard(ss.CProp(torch.optim.AdamW(net.parameters(), lr=1e-2))),
        True,
    ),
}


def _ddp_nan_after_allreduce(rank, make_opt, needs_loss):
    """A NaN written into rank 1's p.grad *after* DDP's all-reduce (a gradient hook, a bad
    clip, a bit flip): the skip decision is collective, so both ranks skip that step."""
    net = _mlp()
    model = DDP(net)
    opt = make_opt(net)
    g = torch.Generator().manual_seed(500 + rank)
    skipped = None
    for step in range(12):
        x, y = _batch(g, rank)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        before = _params(net)
        if rank == 1 and step == NAN_STEP_DDP:
            next(net.parameters()).grad[0, 0] = float("nan")
        if needs_loss:
            opt.step(loss=loss.detach())
        else:
            opt.step()
        if step == NAN_STEP_DDP:
            skipped = all(torch.equal(a, b) for a, b in zip(before, _params(net), strict=True))
    stats = opt.stats()
    counts = {k: int(stats[k]) for k in ("skipped_steps", "nonfinite_grads") if k in stats}
    # the optimizer's own step counts (CProp's, Adam's): one step fewer than calls
    counts["steps"] = sorted({int(st["step"]) for st in opt.state.values() if "step" in st})
    return {"params": _params(net), "skipped": skipped, "counts": counts}


def _ddp_worker(rank, world):
    nan_cases = {
        f"nan_{name}": _ddp_nan_after_allreduce(rank, make, needs_loss)
        for name, (make, needs_loss) in DDP_NAN_CASES.items()
    }
    return {
        **nan_cases,
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
    # the same alarm steps, and the loss recorded is the one the detector used: the rank mean
    assert [h["step"] for h in r0["history"]] == [h["step"] for h in r1["history"]] == [SPIKE]
    assert r0["history"] == r1["history"]
    assert r0["history"][0]["loss"] == pytest.approx(float(r0["spike_mean"]), rel=1e-6)
    assert torch.equal(r0["multipliers"], r1["multipliers"])
    assert torch.equal(r0["detector"], r1["detector"])
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(DDP_NAN_CASES))
def test_ddp_nan_in_one_ranks_grad_after_the_all_reduce_is_skipped_on_every_rank(ddp_results, name):
    r0, r1 = ddp_results[0][f"nan_{name}"], ddp_results[1][f"nan_{name}"]
    assert r0["skipped"] and r1["skipped"]  # rank 0's gradient was finite: it skipped too
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b) and torch.isfinite(a).all()
    assert r0["counts"] == r1["counts"]
    # who counts the skipped step: ALeRA/AgAdam (skipped_steps), the guard around a third-party
    # optimizer (nonfinite_grads), CProp's and Adam's per-parameter step counts (11 of 12)
    if name in ("agadam", "alera_param", "salera"):
        assert r0["counts"]["skipped_steps"] == 1
    if name.startswith("guard_"):
        assert r0["counts"]["nonfinite_grads"] == 1
    if name in ("cpropadamw", "agadam", "guard_adamw"):
        assert r0["counts"]["steps"] == [11]


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
    "spalera": (lambda ps: ss.SPALeRA(ps, lr=0.05), True),
    "agadam": (lambda ps: ss.AgAdam(ps, lr=1e-2, granularity="global"), False),
    "guard_adamw": (lambda ps: ss.CatastropheGuard(torch.optim.AdamW(ps, lr=1e-2)), True),
}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _fsdp_guard_run(rank, make_opt):
    """A scripted loss spike on rank 1 only: both ranks alarm and roll their shards back."""
    model = _fsdp_model()
    opt = make_opt(model)
    g = torch.Generator().manual_seed(400 + rank)
    before = []
    for step in range(SPIKE + 2):
        before.append([_full(p).detach().clone() for p in model.parameters()])
        x, y = _batch(g, rank)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach() + (100.0 if rank == 1 and step == SPIKE else 0.0))
        if step == SPIKE:
            after_alarm = [_full(p).detach().clone() for p in model.parameters()]
    return {
        "alarms": opt.stats()["alarms"].clone(),
        "rolled_back": all(
            torch.equal(a, b) for a, b in zip(after_alarm, before[SPIKE - 1], strict=True)
        ),
        "moved": not all(
            torch.equal(a, b) for a, b in zip(before[SPIKE - 1], before[SPIKE - 2], strict=True)
        ),
        "params": [_full(p).detach().clone() for p in model.parameters()],
    }


FSDP_GUARD_CASES = {
    "salera_group": lambda m: ss.SALeRA(ss.layer_groups(m), lr=0.05, rho=0.5, ph_lambda=0.5),
    # one alarm, one rollback (SALeRA's response), of the parameters and AdamW's sharded state
    "guard_adamw": lambda m: ss.CatastropheGuard(
        torch.optim.AdamW(m.parameters(), lr=1e-2),
        ss.PageHinkley(ph_lambda=0.5, rho=0.5),
        response="rollback",
    ),
}


def _alera_state(opt):
    groups = opt.param_groups
    mults = [grp["lr_multiplier"].clone() for grp in groups]
    states = [opt.state[p] for grp in groups for p in grp["params"]]
    paths = [_full(state["relaxed_path"]).clone() for state in states]
    per_param = [_full(s["lr_multiplier"]).clone() for s in states if "lr_multiplier" in s]
    return mults, paths, per_param


def _sharded_and_replica_grads(model, opt, replica, ref, g, rank):
    """One batch per rank through the FSDP2 model and the whole replica; the replica's gradient
    is averaged over ranks by hand, as the sharded model's reduce-scatter does."""
    x, y = _batch(g, rank)
    for net, o in ((model, opt), (replica, ref)):
        o.zero_grad()
        (net(x) - y).pow(2).mean().backward()
    for p in replica.parameters():
        dist.all_reduce(p.grad)
        p.grad.div_(dist.get_world_size())


def _fsdp_reference_run(rank, granularity):
    """ALeRA on FSDP2 shards against ALeRA on a whole replica fed the rank-averaged gradient
    (what FSDP2's reduce-scatter computes): the norms must be those of the whole gradient."""
    hyper = dict(lr=0.05, alpha=0.1, C=1e-2, granularity=granularity)
    model = _fsdp_model()
    opt = ss.ALeRA(ss.layer_groups(model), **hyper)
    replica = _mlp()
    ref = ss.ALeRA(ss.layer_groups(replica), **hyper)
    g = torch.Generator().manual_seed(500 + rank)
    for _ in range(STEPS):
        _sharded_and_replica_grads(model, opt, replica, ref, g, rank)
        opt.step()
        ref.step()
    return {
        "params": [_full(p).detach().clone() for p in model.parameters()],
        "ref_params": [p.detach().clone() for p in replica.parameters()],
        "state": _alera_state(opt),
        "ref_state": _alera_state(ref),
    }


NAN_STEP = 4
FSDP_CPROP_CASES = {
    # a stateless base: a wrapped optimizer's own state would take the NaN in (documented)
    "wrapper_sgd": lambda ps: ss.CProp(torch.optim.SGD(ps, lr=0.05), beta=0.9),
    "cpropadamw": lambda ps: ss.CPropAdamW(ps, lr=1e-2, cprop_beta=0.999),
    "cpropsgd": lambda ps: ss.CPropSGD(ps, lr=0.05, momentum=0.9, cprop_beta=0.9),
    # the compiled paths on shards, small ones batched (Note [Batching small tensors])
    "cpropadamw_fused": lambda ps: ss.CPropAdamW(ps, lr=1e-2, cprop_beta=0.999, fused=True),
    "cpropsgd_fused": lambda ps: ss.CPropSGD(ps, lr=0.05, momentum=0.9, fused=True),
}


def _fsdp_cprop_run(rank, make_opt):
    """CProp on FSDP2 shards against CProp on a whole replica fed the rank-averaged gradient,
    with a NaN put into one element of rank 1's gradient shard only at step NAN_STEP (the
    replica gets it at the same element): every rank must skip that step alike."""
    model = _fsdp_model()
    opt = make_opt(model.parameters())
    replica = _mlp()
    ref = make_opt(replica.parameters())
    g = torch.Generator().manual_seed(600 + rank)
    weight, rows = model[0].weight, model[0].weight.shape[0]
    for step in range(NAN_STEP + 2):
        _sharded_and_replica_grads(model, opt, replica, ref, g, rank)
        if step == NAN_STEP:
            before = [_full(p).detach().clone() for p in model.parameters()]
            with torch.no_grad():
                if rank == 1:  # the first row of rank 1's shard (dim-0 sharding)
                    weight.grad.to_local()[0, 0] = float("nan")
                replica[0].weight.grad[rows // 2, 0] = float("nan")
        opt.step()
        ref.step()
        if step == NAN_STEP:
            after = [_full(p).detach().clone() for p in model.parameters()]
            skipped = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
            cprop_state = getattr(opt, "cprop_state", opt.state)
            steps = [float(cprop_state[p]["step"]) for p in model.parameters()]
    return {
        "skipped": skipped,
        "steps": steps,
        "moved": not torch.equal(after[0], _full(model[0].weight)),
        "params": [_full(p).detach().clone() for p in model.parameters()],
        "ref_params": [p.detach().clone() for p in replica.parameters()],
        "stats": {k: float(v) for k, v in opt.stats().items()},
    }


def _fsdp_worker(rank, world):
    out = {}
    runs = {name: (lambda m=m, n=n: _fsdp_run(rank, m, n)) for name, (m, n) in FSDP_CASES.items()}
    for name, make_opt in FSDP_GUARD_CASES.items():
        runs[f"rollback_{name}"] = lambda m=make_opt: _fsdp_guard_run(rank, m)
    for gran in ("global", "group", "tensor", "param"):
        runs[f"reference_{gran}"] = lambda gran=gran: _fsdp_reference_run(rank, gran)
    for name, make_opt in FSDP_CPROP_CASES.items():
        runs[f"cprop_{name}"] = lambda m=make_opt: _fsdp_cprop_run(rank, m)
    for name, run in runs.items():
        try:
            out[name] = run()
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


@pytest.mark.parametrize("name", ["cprop", "cpropadamw"])
def test_fsdp2_steadystep_optimizers(fsdp_results, name):
    _check_fsdp(fsdp_results, name)


@pytest.mark.parametrize("name", list(FSDP_CPROP_CASES))
def test_fsdp2_cprop_on_shards_matches_a_replica_and_skips_nan_on_every_rank(fsdp_results, name):
    runs = [fsdp_results[rank][f"cprop_{name}"] for rank in (0, 1)]
    assert not isinstance(runs[0], str), runs[0]
    for run in runs:
        # the NaN sat in rank 1's shard only: every rank skipped, shards did not move
        assert run["skipped"], "a rank updated its shards on the NaN step"
        assert run["steps"] == [float(NAN_STEP)] * len(run["steps"])  # counters: one step fewer
        # reduce-scatter averages in another order than the replica's all-reduce: tolerance
        for a, b in zip(run["params"], run["ref_params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for run in runs:  # stats() covers this rank's shards (no collective)
        assert 0 < run["stats"]["mean_scale"] <= 1
    assert runs[0]["moved"]


@pytest.mark.parametrize("name", ["salera", "spalera", "agadam", "guard_adamw"])
def test_fsdp2_guard_and_alera_family(fsdp_results, name):
    _check_fsdp(fsdp_results, name)


@pytest.mark.parametrize("name", list(FSDP_GUARD_CASES))
def test_fsdp2_guard_rolls_back_sharded_params(fsdp_results, name):
    r0, r1 = (fsdp_results[rank][f"rollback_{name}"] for rank in (0, 1))
    assert not isinstance(r0, str), r0
    assert int(r0["alarms"]) == int(r1["alarms"]) == 1
    assert r0["rolled_back"] and r1["rolled_back"] and r0["moved"]
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("granularity", ["global", "group", "tensor", "param"])
def test_fsdp2_alera_norms_are_those_of_the_whole_gradient(fsdp_results, granularity):
    runs = [fsdp_results[rank][f"reference_{granularity}"] for rank in (0, 1)]
    assert not isinstance(runs[0], str), runs[0]
    for run in runs:
        # Shards reduce in another order than the replica's all-reduce: float32 tolerance.
        for a, b in zip(run["params"], run["ref_params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        state, ref_state = (list(itertools.chain(*run[k])) for k in ("state", "ref_state"))
        for a, b in zip(state, ref_state, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Every rank holds the same multipliers, and they really moved (the check can fail).
    for a, b in zip(runs[0]["state"][0], runs[1]["state"][0], strict=True):
        assert torch.equal(a, b)
    mults, _, per_param = runs[0]["state"]
    moved = mults if granularity in ("global", "group") else per_param
    assert max(float(m.log().abs().max()) for m in moved) > 0.01


# -- the torchrun example ----------------------------------------------------------------------


def test_torchrun_example_runs_with_the_composition(tmp_path):
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
    assert lines[0].startswith("step,loss,clip/nonfinite_losses,alrc/") and len(lines) == 7
    # the composition (ss.stabilize): ALRC clipped rank 1's corrupted batch, and the guard,
    # which watches the raw loss (not the clipped one), raised an alarm at that very step
    from steadystep.telemetry import read_csv

    columns = read_csv(csv_path)
    assert {"guard/alarms", "alrc/threshold"} <= set(columns)  # opt.stats()'s names
    alarms = columns["guard/alarms"]
    assert alarms[4] == alarms[3] + 1
    import re

    clipped = re.search(r"rank 1/2: .*ALRC clipped (\d+)", proc.stdout)  # the rank of the spike
    assert clipped is not None and int(clipped.group(1)) >= 1


def test_importing_steadystep_does_not_import_the_dtensor_module():
    """torch.distributed.tensor takes a second or more to import: steadystep checks for DTensors
    only once that module is loaded (no DTensor exists before) and never imports it itself.
    (torch.optim.Optimizer's constructor imports torch._dynamo, which loads it: the saving is at
    import, for the command and for code that builds no torch optimizer.)"""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, torch, steadystep as ss\n"
        "for name in ss.__all__: getattr(ss, name)\n"
        "alrc = ss.ALRC()\n"
        "alrc(torch.rand(8)).mean()\n"
        "assert 'steadystep._tensors' in sys.modules\n"
        "assert 'torch.distributed.tensor' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
