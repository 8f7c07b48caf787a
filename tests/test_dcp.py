"""torch.distributed.checkpoint on every steadystep optimizer (RELIABILITY.md line 34).

``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (full and sharded) with
``torch.distributed.checkpoint.save`` / ``load`` mid-run, resumed in fresh objects: the rest of
the run is bitwise the uninterrupted one, parameters and every piece of optimizer state. Single
process on a plain model first, then two gloo processes under FSDP2, resumed in fresh
processes (Note [flat checkpoints] of steadystep.compose.wrapper says what DCP needs)."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import steadystep as ss
from steadystep.compose.wrapper import OptimizerWrapper
from tests.dist_utils import run_distributed

STEPS = 12
SAVE_AT = 6

# name -> (build from parameters, how a step takes its loss: None, "loss" or "clip")
CASES = {
    "cpropadamw": (lambda ps: ss.CPropAdamW(ps, lr=1e-2), None),
    "cpropadam": (lambda ps: ss.CPropAdam(ps, lr=1e-2), None),
    "cpropsgd": (lambda ps: ss.CPropSGD(ps, lr=0.05, momentum=0.9), None),
    "cprop_adamw": (lambda ps: ss.CProp(torch.optim.AdamW(ps, lr=1e-2)), None),
    "alera": (lambda ps: ss.ALeRA(ps, lr=0.05), None),
    "agadam": (lambda ps: ss.AgAdam(ps, lr=1e-2), None),
    "guard_adamw": (lambda ps: ss.CatastropheGuard(torch.optim.AdamW(ps, lr=1e-2)), "loss"),
    "guard_cpropadamw": (lambda ps: ss.CatastropheGuard(ss.CPropAdamW(ps, lr=1e-2)), "loss"),
    "salera": (lambda ps: ss.SALeRA(ps, lr=0.05), "loss"),
    "stabilize_adamw": (lambda ps: ss.stabilize(torch.optim.AdamW(ps, lr=1e-2)), "clip"),
}
OPTIONS = {"full": True, "sharded": False}
# Note [rank-local telemetry]: ALRC's clipped_total and clipped_fraction count this rank's
# samples only. DCP takes every plain (non-DTensor) tensor for replicated and saves one copy,
# (from whichever rank its planner picks), so after a resume under torch.distributed every rank
# has one rank's counts.
RANK_LOCAL = ("clipped_total", "clipped_fraction")


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _step(model, opt, kind, step, rank=0):
    g = torch.Generator().manual_seed(1000 * rank + step)  # the same batch in both runs
    x = torch.randn(16, 4, generator=g) * (1 + rank)
    per_sample = (model(x) - x.sum(dim=1, keepdim=True) * 0.3).pow(2).squeeze(1)
    loss = opt.clip(per_sample).mean() if kind == "clip" else per_sample.mean()
    opt.zero_grad()
    loss.backward()
    if kind == "loss":
        opt.step(loss=loss.detach())
    else:
        opt.step()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _tensors(tree, prefix=""):
    """Every tensor of a (nested) state_dict by path, gathered whole."""
    if isinstance(tree, torch.Tensor):
        return {prefix: _full(tree).detach().clone()}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {}
    out = {}
    for key, value in items:
        out.update(_tensors(value, f"{prefix}/{key}"))
    return out


def _snapshot(model, opt):
    return {
        "params": [_full(p).detach().clone() for p in model.parameters()],
        "state": _tensors(opt.state_dict()),
    }


def _assert_same(a, b, skip=()):
    assert len(a["params"]) == len(b["params"])
    for x, y in zip(a["params"], b["params"], strict=True):
        assert torch.equal(x, y)
    assert sorted(a["state"]) == sorted(b["state"])
    for key, x in a["state"].items():
        if key.rsplit("/", 1)[-1] in skip:
            continue
        torch.testing.assert_close(b["state"][key], x, rtol=0, atol=0, equal_nan=True, msg=key)


def _save(model, opt, path, full):
    options = StateDictOptions(full_state_dict=full)
    state = {
        "model": get_model_state_dict(model, options=options),
        "optim": get_optimizer_state_dict(model, opt, options=options),
    }
    dcp.save(state, checkpoint_id=path)


def _load(model, opt, path, full):
    """The documented DCP resume: templates from the fresh objects, load into them, set."""
    options = StateDictOptions(full_state_dict=full)
    state = {
        "model": get_model_state_dict(model, options=options),
        "optim": get_optimizer_state_dict(model, opt, options=options),
    }
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, opt, state["optim"], options=options)


# -- one process, a plain model --------------------------------------------------------------


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", list(CASES))
def test_dcp_resume_is_bitwise(tmp_path, name, option):
    make, kind = CASES[name]
    full = OPTIONS[option]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        model = _mlp()
        opt = make(list(model.parameters()))
        for step in range(STEPS):
            if step == SAVE_AT:
                _save(model, opt, str(tmp_path), full)
            _step(model, opt, kind, step)
        uninterrupted = _snapshot(model, opt)

        fresh = _mlp(seed=1)  # other weights: the load must bring them
        fresh_opt = make(list(fresh.parameters()))
        _load(fresh, fresh_opt, str(tmp_path), full)
        for step in range(SAVE_AT, STEPS):
            _step(fresh, fresh_opt, kind, step)
    _assert_same(uninterrupted, _snapshot(fresh, fresh_opt))


def test_dcp_state_init_step_leaves_the_guard_as_it_was():
    """DCP steps a fresh optimizer with zero gradients and lr 0 to create its state: the guard
    lets the wrapped optimizer take it, but its detector and counters do not move and the
    parameters stay."""
    model = _mlp()
    opt = ss.stabilize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    before = [p.detach().clone() for p in model.parameters()]
    detector = opt.guard.detector.state_dict()
    get_optimizer_state_dict(model, opt)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    stats = opt.guard.stats()
    assert int(stats["steps"]) == 0 and int(stats["alarms"]) == 0
    for key, value in opt.guard.detector.state_dict().items():
        if torch.is_tensor(value):
            torch.testing.assert_close(value, detector[key], rtol=0, atol=0, equal_nan=True)
        else:
            assert value == detector[key], key
    assert len(opt.guard.snapshots) == len(before)
    # a step without a loss is still refused outside that case
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="loss"):
        opt.step()


def _nested(opt):
    """The nested layout ``state_dict()`` returned before the flat one, all the way down."""
    nested = opt._wrapped_state_dict()
    if "optimizer" in nested and isinstance(opt.optimizer, OptimizerWrapper):
        nested["optimizer"] = _nested(opt.optimizer)
    return nested


@pytest.mark.parametrize("native", [True, False])
def test_flat_state_dict_still_loads_nested_checkpoints(native):
    """A checkpoint in the nested layout of earlier versions (Stabilized > guard > CProp, the
    wrapper or a native class) loads and resumes bitwise."""
    model = _mlp()
    opt = ss.stabilize(
        torch.optim.AdamW(model.parameters(), lr=1e-2), alrc=True, cprop=True, native=native
    )
    for step in range(SAVE_AT):
        _step(model, opt, "clip", step)
    nested = copy.deepcopy(_nested(opt))
    assert "snapshots" in nested["optimizer"]["guard"]
    assert native or "cprop_state" in nested["optimizer"]["optimizer"]
    params = [p.detach().clone() for p in model.parameters()]
    for step in range(SAVE_AT, STEPS):
        _step(model, opt, "clip", step)
    fresh = _mlp()
    with torch.no_grad():
        for p, saved in zip(fresh.parameters(), params, strict=True):
            p.copy_(saved)
    fresh_opt = ss.stabilize(
        torch.optim.AdamW(fresh.parameters(), lr=1e-2), alrc=True, cprop=True, native=native
    )
    fresh_opt.load_state_dict(nested)
    for step in range(SAVE_AT, STEPS):
        _step(fresh, fresh_opt, "clip", step)
    _assert_same(_snapshot(model, opt), _snapshot(fresh, fresh_opt))


def test_flat_state_dict_keeps_the_wrappers_parts_apart():
    """The layout (Note [flat checkpoints]): the innermost optimizer's state and groups at the
    top, each wrapper's per-parameter tensors as "<key>/<name>" in the parameter's entry, the
    rest under its key in the first group; a plain AdamW checkpoint is refused by the guard."""
    model = _mlp()
    opt = ss.stabilize(torch.optim.AdamW(model.parameters(), lr=1e-2), cprop=True, native=False)
    for step in range(3):
        _step(model, opt, "clip", step)
    sd = opt.state_dict()
    assert sd["class"] == "Stabilized"
    entry = sd["state"][0]
    assert {"exp_avg", "exp_avg_sq", "cprop/cprop_exp_avg", "guard/snapshot"} <= set(entry)
    assert torch.equal(entry["guard/snapshot"], opt.guard.snapshots[0])
    group = sd["param_groups"][0]
    assert {"stabilized", "guard", "cprop"} <= set(group)
    assert group["guard"]["class"] == "CatastropheGuard"
    assert "snapshots" not in group["guard"]["guard"]
    assert all("guard" not in g for g in opt.param_groups)  # the live groups stay clean
    with pytest.raises(ValueError, match="CatastropheGuard"):
        opt.guard.load_state_dict(opt.base.state_dict())


# -- two processes, FSDP2 ----------------------------------------------------------------------


def _fsdp_model(seed):
    from torch.distributed.fsdp import fully_shard

    model = _mlp(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp_worker(rank, world, root, resume):
    """``resume=False``: the uninterrupted run, saving at SAVE_AT; ``resume=True`` (fresh
    processes): load that checkpoint into fresh objects and run to the end."""
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    out = {}
    for name, (make, kind) in CASES.items():
        for option, full in OPTIONS.items():
            path = os.path.join(root, f"{name}-{option}")
            try:
                model = _fsdp_model(seed=1 if resume else 0)
                opt = make(list(model.parameters()))
                if resume:
                    _load(model, opt, path, full)
                for step in range(SAVE_AT if resume else 0, STEPS):
                    if step == SAVE_AT and not resume:
                        _save(model, opt, path, full)
                    _step(model, opt, kind, step, rank)
                out[f"{name}-{option}"] = _snapshot(model, opt)
            except Exception as exc:  # recorded, so one case failing does not hide the others
                out[f"{name}-{option}"] = f"{type(exc).__name__}: {exc}"
            dist.barrier()
    return out


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    root = str(tmp_path_factory.mktemp("dcp"))
    uninterrupted = run_distributed(_fsdp_worker, world=2, args=(root, False))
    resumed = run_distributed(_fsdp_worker, world=2, args=(root, True))
    return uninterrupted, resumed


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", list(CASES))
def test_fsdp2_dcp_resume_in_fresh_processes_is_bitwise(fsdp_runs, name, option):
    uninterrupted, resumed = fsdp_runs
    for rank in range(2):
        a, b = uninterrupted[rank][f"{name}-{option}"], resumed[rank][f"{name}-{option}"]
        assert not isinstance(a, str), a
        assert not isinstance(b, str), b
        # Note [rank-local telemetry]: nothing the run computes reads these counts (the
        # moments are rank means), and the parameters and all else are checked bitwise.
        _assert_same(a, b, skip=RANK_LOCAL)
