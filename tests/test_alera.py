"""ALeRA against a plain-Python restatement of the update rule, plus state, faults and inputs."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch

import steadystep as ss
from steadystep.optim.alera_reference import (
    PlainAgAdam,
    PlainALeRA,
    log_rate_change,
    relaxed_path,
)

GRANULARITIES = ("global", "group", "tensor", "param")
SHAPES = [(2, 3), (2,), (1, 2), (1,)]  # two layers: (weight, bias) x 2
LAYERS = [[0, 1], [2, 3]]


def make_params(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]


def make_grads(steps: int, dtype=torch.float64):
    """Gradients with a persistent direction plus noise, and one anti-correlated stretch."""
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    out = []
    for t in range(steps):
        sign = -1.0 if 10 <= t < 16 and t % 2 else 1.0
        out.append(
            [
                sign * b + 0.5 * torch.randn(s, generator=gen, dtype=dtype)
                for b, s in zip(base, SHAPES, strict=True)
            ]
        )
    return out


def run_alera(params, grads_seq, cls=ss.ALeRA, layers=LAYERS, **kwargs):
    """``cls`` (ALeRA, AgAdam or a reference twin) on ``params``, one group per layer; a
    gradient None leaves its parameter out of that step."""
    opt = cls([{"params": [params[i] for i in layer]} for layer in layers], **kwargs)
    for grads in grads_seq:
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
    return opt


def run_twin(params, grads_seq, cls=PlainALeRA, layers=LAYERS, **kwargs):
    """The reference twin on copies of ``params``: ``(its parameters, the twin)``."""
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    return twin_params, run_alera(twin_params, grads_seq, cls=cls, layers=layers, **kwargs)


def assert_matches_twin(opt, params, twin, twin_params, tol):
    """Parameters, relaxed paths, multipliers and Adam's moments of ``opt`` equal the twin's to
    ``tol``; step counts and the count of skipped steps exactly."""
    for p, q in zip(params, twin_params, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tol, atol=tol)
        assert opt.state[p].keys() == twin.state[q].keys()
        for key, value in twin.state[q].items():
            if key == "step":
                assert float(opt.state[p][key]) == value, key
            else:
                torch.testing.assert_close(opt.state[p][key], value, rtol=tol, atol=tol, msg=key)
    for group, twin_group in zip(opt.param_groups, twin.param_groups, strict=True):
        m, twin_m = group["lr_multiplier"], twin_group["lr_multiplier"]
        torch.testing.assert_close(m, twin_m, rtol=tol, atol=tol)
        assert float(group["step"]) == twin_group["step"]
    assert int(opt.param_groups[0]["skipped_steps"]) == twin.skipped_steps


def close(a, b, rel=1e-12, abs_=1e-12):
    return all(math.isclose(x, y, rel_tol=rel, abs_tol=abs_) for x, y in zip(a, b, strict=True))


PATHS = {
    "loop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


TWINS = {
    "ALeRA": (ss.ALeRA, PlainALeRA, {"lr": 0.01, "alpha": 0.1, "C": 0.003}),
    "ALeRA-wd": (ss.ALeRA, PlainALeRA, {"lr": 0.01, "alpha": 0.1, "C": 0.003, "weight_decay": 0.1}),
    "AgAdam": (ss.AgAdam, PlainAgAdam, {"lr": 0.01, "alpha": 0.1, "C": 0.01}),
}


def _state_and_params(opt, params):
    return [p.detach() for p in params] + _state_tensors(opt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", list(TWINS))
def test_reference_twin_loop_foreach_and_fused_agree(name, granularity, dtype):
    """The reference twin (steadystep.optim.alera_reference) == the per-tensor loop ==
    foreach == fused, over 30 steps with a NaN step, an inf step and a parameter whose first
    gradient comes at step 4. foreach is bitwise the loop (same ops in the same order on CPU);
    the fused kernels and the twin agree with it to rounding, skip the same steps and count
    the same."""
    cls, twin_cls, hyper = TWINS[name]
    hyper = {**hyper, "granularity": granularity}
    grads_seq = make_grads(30, dtype)
    grads_seq[4][1][0] = math.nan
    grads_seq[9][3][0] = -math.inf
    for grads in grads_seq[:3]:
        grads[3] = None
    runs = {}
    for path, kw in PATHS.items():
        params = make_params(dtype)
        runs[path] = (params, run_alera(params, grads_seq, cls=cls, **kw, **hyper))
    loop_params, loop = runs["loop"]
    loop_all = _state_and_params(loop, loop_params)
    assert all(
        torch.equal(a, b)
        for a, b in zip(loop_all, _state_and_params(*runs["foreach"][::-1]), strict=True)
    )
    # float32: Ag-Adam's fused Adam step rounds in another order (~7e-6 apart after 30 steps)
    fused_tol = {torch.float32: 2e-6 if cls is ss.ALeRA else 1e-5, torch.float64: 1e-13}[dtype]
    for a, b in zip(loop_all, _state_and_params(*runs["fused"][::-1]), strict=True):
        torch.testing.assert_close(a, b, rtol=fused_tol, atol=fused_tol)
    twin_params, twin = run_twin(make_params(dtype), grads_seq, cls=twin_cls, **hyper)
    twin_tol = {torch.float32: 2e-6, torch.float64: 1e-12}[dtype]
    assert_matches_twin(loop, loop_params, twin, twin_params, twin_tol)
    assert twin.skipped_steps == 2 and all(g["step"] == 28 for g in twin.param_groups)
    # The test can fail: multipliers really moved away from 1.
    multipliers = [g["lr_multiplier"] for g in twin.param_groups] + [
        st["lr_multiplier"] for st in twin.state.values() if "lr_multiplier" in st
    ]
    assert max(m.double().log().abs().max().item() for m in multipliers) > 0.05


@pytest.mark.parametrize("path", ["foreach", "fused"])
def test_fast_paths_equal_reference_path_float32(path):
    outs = []
    for kw in (PATHS["loop"], PATHS[path]):
        params = make_params(torch.float32)
        run_alera(params, make_grads(15, torch.float32), lr=0.01, alpha=0.1, C=0.003, **kw)
        outs.append([p.detach().clone() for p in params])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _state_tensors(opt):
    out = []
    for group in opt.param_groups:
        out += [group["lr_multiplier"], group["step"]]
        for p in group["params"]:
            out += [v for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize("granularity", GRANULARITIES)
# 1.5 * 2**511: above the float64 gradient limit 2**511, yet its square (so the norm) is finite.
@pytest.mark.parametrize("bad", [math.nan, math.inf, 1.5 * 2.0**511], ids=["nan", "inf", "huge"])
@pytest.mark.parametrize("path", ["loop", "fused"])
def test_nonfinite_gradient_changes_nothing(granularity, bad, path):
    grads_seq = make_grads(6)
    poisoned = [g.clone() for g in grads_seq[3]]
    poisoned[2][0, 1] = bad
    params = make_params()
    opt = run_alera(
        params, grads_seq[:3], lr=0.01, alpha=0.1, C=0.003, granularity=granularity, **PATHS[path]
    )
    before = [t.clone() for t in _state_tensors(opt)] + [p.detach().clone() for p in params]
    for p, g in zip(params, poisoned, strict=True):
        p.grad = g.clone()
    opt.step()
    after = _state_tensors(opt) + [p.detach() for p in params]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # p.grad is never written: the bad element is still there.
    for p, g in zip(params, poisoned, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
    assert opt.param_groups[0]["skipped_steps"].item() == 1
    # The next clean steps equal a run that never saw the bad batch.
    for grads in grads_seq[4:]:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    clean = make_params()
    run_alera(
        clean,
        grads_seq[:3] + grads_seq[4:],
        lr=0.01,
        alpha=0.1,
        C=0.003,
        granularity=granularity,
        **PATHS[path],
    )
    assert all(torch.equal(a, b) for a, b in zip(params, clean, strict=True))


def test_zero_gradient_only_decays_relaxed_path():
    params = make_params()
    opt = run_alera(params, make_grads(3), lr=0.01, alpha=0.1, C=0.003)
    r_before = [opt.state[p]["relaxed_path"].clone() for p in params]
    p_before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, r, pb in zip(params, r_before, p_before, strict=True):
        assert torch.equal(opt.state[p]["relaxed_path"], r * 0.9)
        assert torch.equal(p.detach(), pb)
    assert all(torch.isfinite(t).all() for t in _state_tensors(opt))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_state_dict_round_trip_is_bitwise(granularity):
    grads_seq = make_grads(10)
    hyper = dict(lr=0.01, alpha=0.1, C=0.003, granularity=granularity, weight_decay=0.01)
    params = make_params()
    opt = run_alera(params, grads_seq[:5], **hyper)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = ss.ALeRA(
        [{"params": [resumed[i] for i in layer]} for layer in LAYERS],
        lr=1.0,
        alpha=0.1,
        C=0.003,
        granularity=granularity,
    )
    opt2.load_state_dict(saved["opt"])
    for ps, o in ((params, opt), (resumed, opt2)):
        for grads in grads_seq[5:]:
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, resumed, strict=True))
    assert all(
        torch.equal(a, b) for a, b in zip(_state_tensors(opt), _state_tensors(opt2), strict=True)
    )


def test_bf16_params_keep_fp32_statistics_across_load():
    params = [p.detach().to(torch.bfloat16).requires_grad_() for p in make_params()]
    opt = run_alera(params, make_grads(3, torch.bfloat16), lr=0.01, granularity="tensor")
    assert opt.state[params[0]]["relaxed_path"].dtype == torch.float32
    assert opt.param_groups[0]["lr_multiplier"].dtype == torch.float32
    fresh = [p.detach().clone().requires_grad_() for p in params]
    opt2 = ss.ALeRA(
        [{"params": [fresh[i] for i in layer]} for layer in LAYERS], lr=0.01, granularity="tensor"
    )
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.state[fresh[0]]["relaxed_path"].dtype == torch.float32
    assert opt2.state[fresh[0]]["lr_multiplier"].dtype == torch.float32
    assert torch.equal(opt2.state[fresh[1]]["relaxed_path"], opt.state[params[1]]["relaxed_path"])


def test_grad_untouched_frozen_and_deepcopy():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    model[2].bias.requires_grad_(False)
    groups = ss.layer_groups(model)
    assert [g["name"] for g in groups] == ["0", "2"] and len(groups[1]["params"]) == 1
    opt = ss.ALeRA([*groups, {"params": []}], lr=0.1, weight_decay=0.1)
    model(torch.randn(5, 3)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    opt.step()
    assert all(
        torch.equal(a, p.grad)
        for a, p in zip(grads, [p for p in model.parameters() if p.grad is not None], strict=True)
    )
    assert model[2].bias not in opt.state
    clone = copy.deepcopy(opt)
    assert torch.equal(clone.param_groups[0]["lr_multiplier"], opt.param_groups[0]["lr_multiplier"])
    sd = opt.state_dict()
    restored = pickle.loads(pickle.dumps(sd))
    assert restored["param_groups"][0].keys() == sd["param_groups"][0].keys()
    for g_saved, g_back in zip(sd["param_groups"], restored["param_groups"], strict=True):
        for key, value in g_saved.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, g_back[key]) and value.dtype == g_back[key].dtype, key
            else:
                assert value == g_back[key], key
    assert sd["state"].keys() == restored["state"].keys()
    for pid, state in sd["state"].items():
        assert state.keys() == restored["state"][pid].keys()
        for key, value in state.items():
            assert torch.equal(value, restored["state"][pid][key]), (pid, key)
    fresh = ss.ALeRA([*ss.layer_groups(model), {"params": []}], lr=0.1, weight_decay=0.1)
    fresh.load_state_dict(restored)
    assert torch.equal(fresh.param_groups[0]["lr_multiplier"], opt.param_groups[0]["lr_multiplier"])


def test_layer_groups_shared_and_kwargs():
    lin = torch.nn.Linear(2, 2)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
    groups = ss.layer_groups(model, weight_decay=0.5)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.5
    with pytest.raises(ValueError, match="no parameter"):
        ss.layer_groups(torch.nn.ReLU())
    with pytest.raises(TypeError):
        ss.layer_groups([torch.zeros(1)])


def test_multiplier_saturates_instead_of_overflowing():
    p = torch.zeros(1000, requires_grad=True)
    opt = ss.ALeRA([p], lr=1e-3, alpha=0.5, C=1e4, granularity="param")
    for _ in range(5):
        p.grad = torch.ones(1000)
        opt.step()
    m = opt.state[p]["lr_multiplier"]
    assert torch.isfinite(m).all() and m.max().item() == torch.finfo(torch.float32).max
    assert torch.isfinite(p).all()


def test_sparse_and_complex_rejected():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = ss.ALeRA(emb.parameters(), lr=0.1)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(ValueError, match="complex"):
        ss.ALeRA([torch.zeros(2, dtype=torch.complex64, requires_grad=True)], lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"C": -1.0}, "C"),
        ({"C": math.inf}, "C"),
        ({"granularity": "layer"}, "granularity"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"weight_decay": math.nan}, "weight_decay"),
        ({"norm_eps": -1.0}, "norm_eps"),
    ],
)
def test_invalid_hyperparameters(kwargs, name):
    args = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=name):
        ss.ALeRA([torch.zeros(2, requires_grad=True)], **args)


def test_optimizer_wide_keys_cannot_differ_per_group():
    with pytest.raises(ValueError, match="alpha"):
        ss.ALeRA([{"params": [torch.zeros(2, requires_grad=True)], "alpha": 0.2}], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        ss.ALeRA([{"params": [torch.zeros(2, requires_grad=True)], "lr": -1.0}], lr=0.1)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_stats_effective_lrs_and_skipped_steps(granularity, monkeypatch):
    params = make_params()
    grads_seq = make_grads(8)
    poisoned = [g.clone() for g in grads_seq[4]]
    poisoned[0][0, 0] = math.nan
    opt = ss.ALeRA(
        [
            {"params": [params[i] for i in layer], "lr": lr}
            for layer, lr in zip(LAYERS, (0.01, 0.02), strict=True)
        ],
        lr=0.01,
        alpha=0.1,
        C=0.003,
        granularity=granularity,
    )
    keys_before = list(opt.stats())  # the layout exists before the first step
    run_more = [*grads_seq[:4], poisoned, *grads_seq[5:]]
    with monkeypatch.context() as patch:  # stats() reads nothing on the host
        for name in ("item", "__bool__", "tolist", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host read"))
        for grads in run_more:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        stats = opt.stats()
    assert list(stats) == keys_before
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())
    assert stats["skipped_steps"].dtype == torch.int64 and int(stats["skipped_steps"]) == 1
    groups = opt.param_groups
    if granularity in ("global", "group"):
        assert list(stats) == ["skipped_steps", "group0.lr", "group1.lr"]
        for gi, group in enumerate(groups):
            assert torch.equal(stats[f"group{gi}.lr"], group["lr_multiplier"] * group["lr"])
        return
    suffixes = ("lr_mean", "lr_min", "lr_max")
    assert list(stats) == ["skipped_steps"] + [f"group{i}.{s}" for i in (0, 1) for s in suffixes]
    for gi, group in enumerate(groups):
        ms = [opt.state[p]["lr_multiplier"].double().flatten() for p in group["params"]]
        flat = torch.stack([m.mean() for m in ms]) if granularity == "tensor" else torch.cat(ms)
        base = group["lr_multiplier"].double() * group["lr"]
        for suffix, ref in zip(suffixes, (flat.mean(), flat.min(), flat.max()), strict=True):
            torch.testing.assert_close(
                stats[f"group{gi}.{suffix}"].double(), base * ref, rtol=1e-12, atol=0
            )
        assert float(stats[f"group{gi}.lr_max"]) > float(stats[f"group{gi}.lr_min"])


def test_skipped_steps_round_trips_and_late_groups_join_the_count():
    params = make_params()
    opt = ss.ALeRA(params[:2], lr=0.01)
    for p in params[:2]:
        p.grad = torch.full_like(p, math.inf)
    opt.step()
    opt.add_param_group({"params": params[2:]})
    assert [int(g["skipped_steps"]) for g in opt.param_groups] == [1, 1]
    saved = copy.deepcopy(opt.state_dict())
    opt2 = ss.ALeRA([{"params": params[:2]}, {"params": params[2:]}], lr=0.01)
    opt2.load_state_dict(saved)
    assert int(opt2.stats()["skipped_steps"]) == 1
    for group in saved["param_groups"]:
        del group["skipped_steps"]  # a checkpoint from before the counter existed
    opt2.load_state_dict(saved)
    assert int(opt2.stats()["skipped_steps"]) == 0


def _masked_run(granularity, dtype, path):
    """A run with a NaN step, an inf step and a guard-style masked skip."""
    grads_seq = make_grads(14, dtype)
    grads_seq[4][1][0] = math.nan
    grads_seq[9][3][0] = -math.inf
    params = make_params(dtype)
    opt = ss.ALeRA(
        [{"params": [params[i] for i in layer]} for layer in LAYERS],
        lr=0.01,
        alpha=0.1,
        C=0.003,
        granularity=granularity,
        weight_decay=0.01,
        **PATHS[path],
    )
    for t, grads in enumerate(grads_seq):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        with torch.no_grad():  # the guard's masked step (step() is no_grad itself)
            opt.masked_step(skip=torch.tensor(t == 7))
    assert int(opt.stats()["skipped_steps"]) == 2
    assert all(float(g["step"]) == 11 for g in opt.param_groups)
    return [p.detach() for p in params] + _state_tensors(opt)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_foreach_path_is_bitwise_the_reference_loop(granularity, dtype):
    # Same ops in the same order: on CPU the foreach kernels give the same bits. The NaN, inf
    # and masked steps are no-ops on both paths.
    loop, foreach = (
        _masked_run(granularity, dtype, "loop"),
        _masked_run(granularity, dtype, "foreach"),
    )
    for a, b in zip(loop, foreach, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_path_equals_the_reference_loop(granularity, dtype):
    """The fused step (two passes, the relaxed path's new norm from sums of the first) agrees
    with the loop to rounding, skips the same steps and counts the same."""
    loop, fused = _masked_run(granularity, dtype, "loop"), _masked_run(granularity, dtype, "fused")
    tol = {torch.float32: 2e-6, torch.float64: 1e-13}[dtype]
    for a, b in zip(loop, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("cls", [ss.ALeRA, ss.AgAdam])
def test_tensor_granularity_counts_e_t_from_the_tensors_own_steps(cls):
    # A tensor whose first gradient comes at step 6 must adapt as a fresh optimizer on it would
    # (its r starts at 0, so its reference E_t must start at E_1, not at the group's E_7).
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
    b_alone = b.detach().clone().requires_grad_()
    grads = [
        (torch.randn(4, generator=gen), torch.randn(3, generator=gen) + 1.0) for _ in range(12)
    ]
    kw = dict(lr=0.01, alpha=0.1, C=0.05, granularity="tensor")
    opt = cls([a, b], **kw)
    alone = cls([b_alone], **kw)
    for step, (ga, gb) in enumerate(grads):
        a.grad = ga.double()
        b.grad = gb.double() if step >= 6 else None
        opt.step()
        if step >= 6:
            b_alone.grad = gb.double()
            alone.step()
    assert torch.equal(opt.state[b]["lr_multiplier"], alone.state[b_alone]["lr_multiplier"])
    assert torch.equal(b, b_alone)
    assert float(opt.state[b]["step"]) == 6.0 and float(opt.param_groups[0]["step"]) == 12.0


@pytest.mark.parametrize("cls", [ss.ALeRA, ss.AgAdam])
def test_state_dict_param_groups_are_a_snapshot(cls):
    # torch.optim convention: per-parameter ``state`` is live (deep-copied here at step k);
    # the group tensors (multiplier, step, skipped count) must not move after state_dict().
    def make_run():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
        return model, cls(ss.layer_groups(model), lr=0.05, alpha=0.1, C=0.05)

    def steps(model, opt, start, stop):
        for step in range(start, stop):
            gen = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            opt.step()

    model, opt = make_run()
    steps(model, opt, 0, 4)
    sd = opt.state_dict()
    state_k, model_k = copy.deepcopy(sd["state"]), copy.deepcopy(model.state_dict())
    steps(model, opt, 4, 9)
    model2, opt2 = make_run()
    model2.load_state_dict(model_k)
    opt2.load_state_dict({"state": state_k, "param_groups": sd["param_groups"]})
    steps(model2, opt2, 4, 9)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    for g1, g2 in zip(opt.param_groups, opt2.param_groups, strict=True):
        assert torch.equal(g1["lr_multiplier"], g2["lr_multiplier"])
        assert torch.equal(g1["step"], g2["step"])


def test_skipped_steps_is_one_tensor_shared_by_every_group():
    # One optimizer-wide count, incremented once per step (not once per group), and the sharing
    # survives a checkpoint round trip and a group added later.
    params = make_params()
    groups = [{"params": [p]} for p in params]
    opt = ss.ALeRA(groups[:-1], lr=0.01)
    opt.add_param_group(groups[-1])
    counts = [g["skipped_steps"] for g in opt.param_groups]
    assert len(counts) == len(params) > 2 and all(c is counts[0] for c in counts)
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[0] = math.nan
    opt.step()
    assert int(opt.stats()["skipped_steps"]) == 1
    sd = opt.state_dict()
    assert [int(g["skipped_steps"]) for g in sd["param_groups"]] == [1] * len(params)
    opt2 = ss.ALeRA([{"params": [p]} for p in params], lr=0.01)
    opt2.load_state_dict(sd)
    counts = [g["skipped_steps"] for g in opt2.param_groups]
    assert all(c is counts[0] for c in counts) and int(counts[0]) == 1


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_group_lrs_is_lr_times_each_groups_mean_multiplier(granularity, monkeypatch):
    """One float64 effective rate per group, no host read: ``lr * group multiplier`` times the
    mean over the group's tensors of their mean multiplier ("tensor", "param")."""
    params = make_params()
    opt = ss.ALeRA(
        [
            {"params": [params[i] for i in layer], "lr": lr}
            for layer, lr in zip(LAYERS, (0.01, 0.02), strict=True)
        ],
        lr=0.01,
        alpha=0.1,
        C=0.003,
        granularity=granularity,
    )
    assert torch.equal(opt.group_lrs(), torch.tensor([0.01, 0.02], dtype=torch.float64))
    for grads in make_grads(8):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    opt.scale_lr_(torch.tensor(0.5))  # the group factor a guard cuts counts too
    with monkeypatch.context() as patch:
        for name in ("item", "__bool__", "tolist", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host read"))
        lrs = opt.group_lrs()
    expected = []
    for group in opt.param_groups:
        m = group["lr_multiplier"].double()
        if granularity in ("tensor", "param"):
            per_tensor = [opt.state[p]["lr_multiplier"].double().mean() for p in group["params"]]
            m = m * torch.stack(per_tensor).mean()
        expected.append(group["lr"] * m)
    assert lrs.dtype == torch.float64 and torch.equal(lrs, torch.stack(expected))
    assert not torch.allclose(lrs, torch.tensor([0.005, 0.01], dtype=torch.float64))


def _copy_case(name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    cls, _, granularity = name.partition("-")
    kwargs = {"granularity": granularity} if granularity else {}
    make = {"ALeRA": ss.ALeRA, "AgAdam": ss.AgAdam, "SALeRA": ss.SALeRA, "SPALeRA": ss.SPALeRA}
    return model, make[cls](ss.layer_groups(model), lr=0.05, C=1e-2, **kwargs)


def _copy_train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for t in steps:
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(8, 3, generator=gen)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())


COPY_CASES = [
    *(f"ALeRA-{g}" for g in GRANULARITIES),
    *(f"AgAdam-{g}" for g in GRANULARITIES),
    "SALeRA-tensor",
    "SPALeRA",
]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", COPY_CASES)
def test_a_copy_steps_bitwise_like_the_original(name, how):
    """A deepcopy or pickle round trip: the copy (model and optimizer together, so the copy's
    parameters are the copied model's) is stepped and must follow the original bitwise."""
    model, opt = _copy_case(name)
    _copy_train(model, opt, range(3))
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    _copy_train(model, opt, range(3, 7))
    _copy_train(model2, opt2, range(3, 7))
    inner = getattr(opt2, "optimizer", opt2)
    assert inner.granularity == getattr(opt, "optimizer", opt).granularity
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    flat, flat2 = torch.utils._pytree.tree_leaves(sd), torch.utils._pytree.tree_leaves(sd2)
    assert len(flat) == len(flat2)
    for a, b in zip(flat, flat2, strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all())
        else:
            assert a == b


@pytest.mark.parametrize("cls", [ss.ALeRA, ss.AgAdam])
def test_granularity_is_in_the_state_dict_and_checked_at_load(cls):
    """A "tensor" checkpoint loaded into a "group" optimizer fails at load, naming both."""
    model, opt = _copy_case(f"{cls.__name__}-tensor")
    _copy_train(model, opt, range(2))
    sd = opt.state_dict()
    assert all(group["granularity"] == "tensor" for group in sd["param_groups"])
    other = cls(ss.layer_groups(model), lr=0.05, C=1e-2, granularity="group")
    with pytest.raises(ValueError, match=r"granularity='tensor'.*granularity='group'"):
        other.load_state_dict(sd)


@pytest.mark.parametrize("saved", GRANULARITIES)
def test_a_checkpoint_without_granularity_loads_where_its_state_tells_it_apart(saved):
    """Checkpoints written before the groups held ``granularity``: per-parameter multipliers
    tell "tensor" (0-d) and "param" (full size) apart from "global"/"group" (none)."""
    model, opt = _copy_case(f"ALeRA-{saved}")
    _copy_train(model, opt, range(2))
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        del group["granularity"]
    compatible = {"global": ("global", "group"), "group": ("global", "group")}.get(saved, (saved,))
    for target in GRANULARITIES:
        other = ss.ALeRA(ss.layer_groups(model), lr=0.05, C=1e-2, granularity=target)
        if target in compatible:
            other.load_state_dict(sd)
            assert all(g["granularity"] == target for g in other.param_groups)
        else:
            found = " or ".join(compatible)
            with pytest.raises(ValueError, match=f"granularity='{found}'.*'{target}'"):
                other.load_state_dict(sd)


def test_weight_decay_of_one_matches_the_reference_twin():
    """weight_decay = 1 is a decay like any other (d = g + theta), not a special value."""
    hyper = dict(lr=0.01, alpha=0.1, C=0.003, granularity="global", weight_decay=1.0)
    params = make_params()
    grads_seq = make_grads(10)
    twin_params, twin = run_twin(params, grads_seq, **hyper)
    opt = run_alera(params, grads_seq, **PATHS["loop"], **hyper)
    assert_matches_twin(opt, params, twin, twin_params, 1e-12)


@pytest.mark.parametrize("path", ["loop", "fused"])
def test_global_rate_when_the_first_group_has_no_gradient(path):
    """The "global" granularity keeps its one rate and step count in group 0 even when group
    0's parameters get no gradient: every group's step counts the step, and the rate adapts to
    the others."""
    hyper = dict(lr=0.01, alpha=0.1, C=0.003, granularity="global", weight_decay=0.0)
    params = make_params()
    grads_seq = make_grads(20)
    # the twin on the other parameters alone, one group
    alone = [grads[2:] for grads in grads_seq]
    twin_params, twin = run_twin(params[2:], alone, layers=[[0, 1]], **hyper)
    opt = ss.ALeRA([{"params": params[:2]}, {"params": params[2:]}], **PATHS[path], **hyper)
    frozen = [p.detach().clone() for p in params[:2]]
    for grads in grads_seq:
        for p, g in zip(params[2:], grads[2:], strict=True):
            p.grad = g.clone()
        opt.step()
    assert all(torch.equal(p, f) for p, f in zip(params[:2], frozen, strict=True))
    for p, expected in zip(params[2:], twin_params, strict=True):
        torch.testing.assert_close(p.detach(), expected.detach(), rtol=1e-12, atol=1e-12)
    assert [g["step"].item() for g in opt.param_groups] == [20.0, 20.0]
    m = twin.param_groups[0]["lr_multiplier"].item()
    assert close([g["lr_multiplier"].item() for g in opt.param_groups], [m, m])
    assert abs(math.log(m)) > 1e-3  # the rate really moved


def test_grad_norms_accumulate_in_the_statistics_dtype():
    """bf16 gradients with float32 statistics: float32 norms on every path, one tensor or a
    mix of dtypes (the foreach norm takes one dtype for all, so a mix falls back to a loop)."""
    from steadystep.optim._alera_core import grad_norms

    gen = torch.Generator().manual_seed(3)
    g16 = torch.randn(1000, generator=gen).to(torch.bfloat16)
    g32 = torch.randn(7, generator=gen)
    plain16 = math.sqrt(sum(x * x for x in g16.double().tolist()))
    plain32 = math.sqrt(sum(x * x for x in g32.double().tolist()))
    f32 = torch.float32
    cases = [
        ([g16], [f32], False, [plain16]),
        ([g16], [f32], True, [plain16]),
        ([g16, g16], [f32, f32], True, [plain16, plain16]),
        ([g32, g16], [f32, f32], True, [plain32, plain16]),
        ([g16, g32], [f32, f32], True, [plain16, plain32]),
    ]
    for grads, dtypes, foreach, expected in cases:
        norms = grad_norms(grads, dtypes, foreach=foreach)
        assert [n.dtype for n in norms] == dtypes, (foreach, [g.dtype for g in grads])
        assert close([n.item() for n in norms], expected, rel=1e-6), (foreach, expected)


@pytest.mark.parametrize("foreach", [False, True])
def test_agnostic_update_direct_call_and_the_norm_threshold(foreach, monkeypatch):
    """The functional core called without ``numels``/``sharded`` (whole, unsharded tensors: no
    collective), with one unit whose norm is exactly ``norm_eps`` (no direction: ``r`` only
    decays, as ``norm > norm_eps`` says) and one above it."""
    import steadystep._tensors as tensors
    from steadystep.optim._alera_core import agnostic_update

    def no_collective(t):
        raise AssertionError("an all-reduce for unsharded tensors")

    monkeypatch.setattr(tensors, "all_reduce_sum", no_collective)
    f64 = torch.float64
    g = [[0.5], [0.6, -0.8]]  # norms 0.5 (== norm_eps) and 1.0
    r = [[0.2], [0.1, -0.3]]
    hyper = dict(alpha=0.1, C=0.05, norm_eps=0.5)
    paths = [torch.tensor(x, dtype=f64) for x in r]
    changes = agnostic_update(
        [torch.tensor(x, dtype=f64) for x in g],
        [torch.tensor(0.5, dtype=f64), torch.tensor(1.0, dtype=f64)],
        paths,
        [[0], [1]],
        [torch.tensor(3.0), torch.tensor(3.0)],
        param_wise=False,
        take_step=torch.tensor(True),
        foreach=foreach,
        **hyper,
    )
    for u, norm in enumerate((0.5, 1.0)):
        r_new = relaxed_path(
            torch.tensor(r[u], dtype=f64),
            torch.tensor(g[u], dtype=f64),
            torch.tensor(norm, dtype=f64),
            alpha=0.1,
            norm_eps=0.5,
        )
        change = log_rate_change(r_new.square().sum(), 3, alpha=0.1, C=0.05, n=len(r[u]))
        assert close(paths[u].tolist(), r_new.tolist()), u
        assert math.isclose(changes[u].item(), change.item(), rel_tol=1e-12), u
    assert paths[0].item() == 0.9 * 0.2  # decayed only


def test_skip_decision_is_one_all_reduce(monkeypatch):
    """Under torch.distributed a step combines its finiteness flags into one all-reduce."""
    import steadystep._distributed as distributed

    calls = []

    def one_rank_sum(t):
        calls.append(t.clone())
        return t

    params = make_params()
    opt = ss.ALeRA(params, lr=0.01, **PATHS["loop"])
    for p, g in zip(params, make_grads(1)[0], strict=True):
        p.grad = g
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "all_reduce_sum", one_rank_sum)
    opt.step()
    assert len(calls) == 1 and calls[0].shape == ()
