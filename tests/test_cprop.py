"""CProp: the wrapper, the native SGD/Adam/AdamW paths and the functional core."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch

import steadystep as ss
from steadystep import _kernels
from steadystep.optim import cprop as cprop_module
from steadystep.optim.cprop import reference

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def mlp(dtype=torch.float32, seed=0, hidden=8):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2)
    ).to(dtype)


def data(dtype=torch.float32, n=64):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 4, generator=g, dtype=F64)
    y = torch.stack([x[:, 0] * x[:, 1], x[:, 2] - x[:, 3]], 1)
    return x.to(dtype), y.to(dtype)


def batch(i, x, y, size=16):
    idx = torch.randint(0, x.shape[0], (size,), generator=torch.Generator().manual_seed(i))
    return x[idx], y[idx]


def train(model, opt, steps, start=0, dtype=torch.float32):
    x, y = data(dtype)
    losses = []
    for i in range(start, start + steps):
        xb, yb = batch(i, x, y)
        opt.zero_grad()
        loss = (model(xb) - yb).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def full_loss(model, dtype=torch.float32):
    x, y = data(dtype)
    with torch.no_grad():
        return (model(x) - y).pow(2).mean().item()


def assert_params(a, b, atol=0.0):
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        if atol == 0.0:
            assert torch.equal(pa, pb)
        else:
            torch.testing.assert_close(pa, pb, atol=atol, rtol=0)


def assert_states_close(model_a, state_a, model_b, state_b, atol):
    """Per parameter, the same state keys with values within ``atol``."""
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert state_a[pa].keys() == state_b[pb].keys()
        for key, value in state_a[pa].items():
            torch.testing.assert_close(value, state_b[pb][key], atol=atol, rtol=0)


def assert_state_equal(sa, sb):
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], dict):
            assert_state_equal(sa[k], sb[k])
        elif isinstance(sa[k], torch.Tensor):
            assert sa[k].dtype == sb[k].dtype, k
            assert torch.equal(sa[k], sb[k]), k
        else:
            assert sa[k] == sb[k], k


SGD_CONFIGS = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05},
]
ADAM_CONFIGS = [
    {"lr": 0.01},
    {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01},
    {"lr": 0.01, "betas": (0.8, 0.99)},
]
ADAMW_CONFIGS = [{"lr": 0.01}, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}]

NATIVE = (
    [(ss.CPropSGD, torch.optim.SGD, kw) for kw in SGD_CONFIGS]
    + [(ss.CPropAdam, torch.optim.Adam, kw) for kw in ADAM_CONFIGS]
    + [(ss.CPropAdamW, torch.optim.AdamW, kw) for kw in ADAMW_CONFIGS]
)
NATIVE_IDS = [f"{n.__name__}-{i}" for i, (n, _, _) in enumerate(NATIVE)]


# --------------------------------------------------------------------------------------------
# Numerics against the reference twin: Algorithm 1 restated (steadystep.optim.cprop.reference)
# --------------------------------------------------------------------------------------------


def twin_sgd(theta0, grads, **kwargs):
    """The reference twin :class:`PlainCPropSGD` on one float64 parameter, one step per
    gradient: Algorithm 1 with SGD (``g_hat = -lr (g + weight_decay theta)``)."""
    p = torch.tensor(theta0, dtype=F64, requires_grad=True)
    opt = reference.PlainCPropSGD([p], **kwargs)
    for g in grads:
        p.grad = torch.tensor(g, dtype=F64)
        opt.step()
    return p.detach()


def gradient_sequence(steps, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    drift = torch.linspace(-0.6, 0.6, n, dtype=F64)
    return [(drift + torch.randn(n, generator=g, dtype=F64)).tolist() for _ in range(steps)]


@pytest.mark.parametrize(
    "cdf,method",
    [(cdf, "conformity") for cdf in cprop_module.CDFS]
    + [("normal", "relative"), ("normal", "moment")],
)
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("native", [False, True], ids=["wrapper", "native"])
def test_matches_the_reference_twin_in_float64(cdf, method, native, fused):
    """Every CDF and method, the wrapper and the native class, eager and fused: the twin's
    numbers (the paper's Phi and the authors' logistic approximations as printed)."""
    steps, n, lr = 50, 12, 0.05
    grads = gradient_sequence(steps, n)
    theta0 = torch.linspace(-1, 1, n, dtype=F64).tolist()
    expected = twin_sgd(
        theta0, grads, lr=lr, cprop_beta=0.9, cprop_c=1.5, cprop_eps=1e-8, cdf=cdf, method=method
    )
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=F64))
    kw = {"cdf": cdf, "method": method, "fused": fused}
    if native:
        opt = ss.CPropSGD([p], lr=lr, cprop_beta=0.9, cprop_c=1.5, cprop_eps=1e-8, **kw)
    else:
        opt = ss.CProp(torch.optim.SGD([p], lr=lr), beta=0.9, c=1.5, eps=1e-8, **kw)
    for g in grads:
        p.grad = torch.tensor(g, dtype=F64)
        opt.step()
    torch.testing.assert_close(p.detach(), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("c", [1.5, math.inf])
@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "foreach"])
def test_functional_sgd_with_its_defaults_matches_the_reference_twin(foreach, c):
    """The functional core called as documented, without ``lr_multiplier``, on the eager paths;
    weight_decay = 1 is a decay like any other, and c = inf is plain SGD."""
    steps, n, lr, wd = 30, 12, 0.05, 1.0
    grads = gradient_sequence(steps, n, seed=2)
    theta0 = torch.linspace(-1, 1, n, dtype=F64).tolist()
    expected = twin_sgd(theta0, grads, lr=lr, weight_decay=wd, cprop_beta=0.9, cprop_c=c)
    p = torch.tensor(theta0, dtype=F64)
    m, v, step = torch.zeros(n, dtype=F64), torch.zeros(n, dtype=F64), torch.zeros(())
    for g in grads:
        cprop_module.cprop_sgd(
            [p],
            [torch.tensor(g, dtype=F64)],
            [None],
            [m],
            [v],
            [step],
            found_finite=torch.tensor(True),
            lr=lr,
            momentum=0.0,
            dampening=0.0,
            weight_decay=wd,
            nesterov=False,
            cprop_beta=0.9,
            cprop_c=c,
            cprop_eps=1e-8,
            cdf="normal",
            method="conformity",
            foreach=foreach,
            fused=False,
        )
    torch.testing.assert_close(p, expected, atol=1e-12, rtol=0)
    assert step.item() == steps


@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "foreach"])
def test_bf16_decoupled_decay_is_computed_in_float32(foreach):
    """AdamW's decay term ``p * (-lr wd)`` of bf16 parameters is formed in the float32 of the
    statistics, then added and rounded once (a bf16 product would round it twice). With a zero
    gradient the first step is the decay alone: ``bf16(p + p * (-lr wd))`` in float32."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4096, generator=g).to(torch.bfloat16))
    p0 = p.detach().clone()
    opt = ss.CPropAdamW([p], lr=0.6, weight_decay=0.5, foreach=foreach, fused=False)
    p.grad = torch.zeros_like(p)
    opt.step()
    decay = torch.tensor(-0.6 * 0.5, dtype=torch.float32)
    assert torch.equal(p.detach(), (p0.float() + p0.float() * decay).to(torch.bfloat16))


def test_scale_is_one_at_first_step_and_depends_on_conformity():
    p = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    opt = ss.CProp(torch.optim.SGD([p], lr=1.0), beta=0.9)
    p.grad = torch.tensor([1.0, 1e-9, -3.0], dtype=F64)
    opt.step()
    assert torch.equal(p.detach(), -p.grad)  # s = 1 exactly at t = 1
    # element 0 always +1 (full conformity), element 1 alternates sign (none)
    for t in range(20):
        p.grad = torch.tensor([1.0, (-1.0) ** t, -3.0], dtype=F64)
        opt.step()
    s = cprop_module.cprop_scales(
        [opt.cprop_state[p]["cprop_exp_avg"]],
        [opt.cprop_state[p]["cprop_exp_avg_sq"]],
        [opt.cprop_state[p]["step"]],
        found_finite=torch.tensor(True),
        beta=0.9,
        c=1.0,
        eps=1e-8,
        cdf="normal",
        method="conformity",
    )[0]
    assert s[0] == 1.0 and s[2] == 1.0
    assert s[1] < 0.3


def test_dead_elements_get_scale_zero_including_weight_decay():
    # an element whose gradient is always exactly 0 has m = v = 0, se = eps, Phi = 1/2: s = 0
    p = torch.nn.Parameter(torch.ones(2))
    opt = ss.CPropAdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.tensor([1.0, 0.0])
    opt.step()
    # t = 1 moved both (decay at full rate); afterwards the dead element stays put
    after_first = p.detach().clone()
    assert after_first[1].item() == pytest.approx(1.0 - 0.1 * 0.5, rel=1e-6)
    for _ in range(4):
        opt.step()
    assert p[1] == after_first[1]
    assert p[0].item() < 0.6
    assert opt.stats()["frac_scale_below_half"].item() == 0.5


# --------------------------------------------------------------------------------------------
# Native classes vs the wrapper, foreach vs reference, fused vs reference
# --------------------------------------------------------------------------------------------


def _native_state(opt, p, key):
    return opt.state[p][key]


@pytest.mark.parametrize("fused", [False, None], ids=["eager", "default"])
@pytest.mark.parametrize("native_cls,base_cls,kw", NATIVE, ids=NATIVE_IDS)
def test_native_matches_wrapper(native_cls, base_cls, kw, fused):
    a, b = mlp(F64), mlp(F64)
    native = native_cls(a.parameters(), **kw, cprop_beta=0.99, fused=fused)
    wrapper = ss.CProp(base_cls(b.parameters(), **kw), beta=0.99, fused=fused)
    train(a, native, 50, dtype=F64)
    train(b, wrapper, 50, dtype=F64)
    assert_params(a, b, atol=1e-12)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        sa, sw, sb = native.state[pa], wrapper.cprop_state[pb], wrapper.state[pb]
        assert torch.equal(sa["step"], sw["step"])
        torch.testing.assert_close(sa["cprop_exp_avg"], sw["cprop_exp_avg"], atol=1e-12, rtol=0)
        v = sa.get("cprop_exp_avg_sq", sa.get("exp_avg_sq"))
        torch.testing.assert_close(v, sw["cprop_exp_avg_sq"], atol=1e-12, rtol=0)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            if key in sb:
                torch.testing.assert_close(sa[key], sb[key], atol=1e-12, rtol=0)


@pytest.mark.parametrize("native_cls,base_cls,kw", NATIVE, ids=NATIVE_IDS)
def test_foreach_equals_reference_bitwise(native_cls, base_cls, kw):
    a, b = mlp(), mlp()
    ref = native_cls(a.parameters(), **kw, foreach=False, fused=False)
    fe = native_cls(b.parameters(), **kw, foreach=True)
    train(a, ref, 12)
    train(b, fe, 12)
    assert_params(a, b)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert_state_equal(ref.state[pa], fe.state[pb])


@pytest.mark.parametrize(
    "cdf,method,eps",
    [(cdf, "conformity", 1e-8) for cdf in cprop_module.CDFS]
    + [("normal", "relative", 1e-8), ("normal", "moment", 1e-8), ("bft", "conformity", 0.0)],
)
def test_functional_foreach_equals_reference(cdf, method, eps):
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (5,), ()]
    stats = {
        mode: ([torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes])
        for mode in ("ref", "fe")
    }
    steps = {mode: [torch.zeros(()) for _ in shapes] for mode in ("ref", "fe")}
    for t in range(6):
        grads = [torch.randn(s, generator=g) + 0.3 for s in shapes]
        grads[0][0] = 0.0  # a dead row
        out = {}
        for mode in ("ref", "fe"):
            ms, vs = stats[mode]
            kw = {"found_finite": torch.tensor(t != 3), "foreach": mode == "fe"}
            cprop_module.cprop_update_(grads, ms, vs, steps[mode], beta=0.9, method=method, **kw)
            out[mode] = cprop_module.cprop_scales(
                ms, vs, steps[mode], beta=0.9, c=2.0, eps=eps, cdf=cdf, method=method, **kw
            )
        for sr, sf in zip(out["ref"], out["fe"], strict=True):
            assert torch.equal(sr, sf)
            assert not sr.isnan().any()
    for a, b in zip(
        stats["ref"][0] + stats["ref"][1], stats["fe"][0] + stats["fe"][1], strict=True
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kw",
    [{"lr": 0.01}, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1, "cprop_beta": 0.99}],
    ids=["shared-v", "amsgrad-own-v"],
)
def test_fused_equals_reference(kw):
    a, b = mlp(F64), mlp(F64)
    ref = ss.CPropAdamW(a.parameters(), **kw, fused=False)
    fused = ss.CPropAdamW(b.parameters(), **kw, fused=True)
    train(a, ref, 12, dtype=F64)
    train(b, fused, 12, dtype=F64)
    assert_params(a, b, atol=1e-12)
    assert_states_close(a, ref.state, b, fused.state, atol=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01, "cprop_beta": 0.99},
        {"momentum": 0.5, "method": "relative", "cprop_c": 3.0, "cdf": "bfo"},
    ],
    ids=["plain", "momentum", "nesterov-wd", "dampening-own-beta", "relative"],
)
def test_fused_sgd_equals_reference(kw):
    """Params, momentum buffers and CProp's statistics, with a non-finite step in the middle."""
    a, b = mlp(F64), mlp(F64)
    ref = ss.CPropSGD(a.parameters(), lr=0.1, **kw, fused=False)
    fused = ss.CPropSGD(b.parameters(), lr=0.1, **kw, fused=True)
    x, y = data(F64)
    for i in range(12):
        for model, opt in ((a, ref), (b, fused)):
            xb, yb = batch(i, x, y)
            opt.zero_grad()
            (model(xb) - yb).pow(2).mean().backward()
            if i == 5:
                next(model.parameters()).grad[0, 0] = math.inf
            opt.step()
    assert_params(a, b, atol=1e-12)
    assert_states_close(a, ref.state, b, fused.state, atol=1e-12)
    for p in b.parameters():  # the non-finite step was skipped
        assert fused.state[p]["step"].item() == 11


# name: (implementation, reference twin, arguments); the wrapper's base optimizer is built twice
TWINS = {
    "adamw": (ss.CPropAdamW, reference.PlainCPropAdamW, {"lr": 1e-2}),
    "adamw-bft-own-v": (
        ss.CPropAdamW,
        reference.PlainCPropAdamW,
        {"lr": 1e-2, "cdf": "bft", "cprop_c": 2.0, "cprop_beta": 0.99},
    ),
    "adam-amsgrad-l2": (
        ss.CPropAdam,
        reference.PlainCPropAdam,
        {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1},
    ),
    "sgd-nesterov": (
        ss.CPropSGD,
        reference.PlainCPropSGD,
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ),
    "sgd-relative": (
        ss.CPropSGD,
        reference.PlainCPropSGD,
        {"lr": 0.1, "momentum": 0.5, "dampening": 0.2, "method": "relative", "cdf": "bfo"},
    ),
    "sgd-moment": (ss.CPropSGD, reference.PlainCPropSGD, {"lr": 0.1, "method": "moment"}),
    "wrapper-adamw": (
        lambda ps, **path: ss.CProp(torch.optim.AdamW(ps, lr=1e-2), **path),
        lambda ps: reference.PlainCProp(torch.optim.AdamW(ps, lr=1e-2)),
        {},
    ),
    "wrapper-sgd-logistic": (
        lambda ps, **path: ss.CProp(
            torch.optim.SGD(ps, lr=0.1, momentum=0.9), beta=0.9, cdf="logistic", **path
        ),
        lambda ps: reference.PlainCProp(
            torch.optim.SGD(ps, lr=0.1, momentum=0.9), beta=0.9, cdf="logistic"
        ),
        {},
    ),
}
# the native classes' three paths; the wrapper picks foreach by device (CUDA), so on the CPU
# its paths are the per-tensor one and the fused one
NATIVE_PATHS = {
    "single": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
WRAPPER_PATHS = {"single": {"fused": False}, "fused": {"fused": True}}


def _state_of(opt):
    return opt.cprop_state if hasattr(opt, "cprop_state") else opt.state


def assert_matches_twin(model, opt, twin_model, twin, atol):
    """Parameters and every statistic of ``opt`` within ``atol`` of the twin's, step counts
    exactly; where ``opt`` shares CProp's ``v`` with Adam's ``exp_avg_sq``, that is compared."""
    assert_params(model, twin_model, atol=atol)
    states, twin_states = _state_of(opt), _state_of(twin)
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        state, twin_state = states[p], twin_states[q]
        assert float(state["step"]) == twin_state["step"]
        for key, value in twin_state.items():
            if key == "step":
                continue
            actual = state.get(key, state.get("exp_avg_sq"))  # a shared v
            torch.testing.assert_close(actual, value, atol=max(atol, 1e-6), rtol=0, msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("name", list(TWINS))
def test_reference_twin_single_foreach_and_fused_agree(name, dtype):
    """The reference twin (steadystep.optim.cprop.reference) == the per-tensor path ==
    foreach == fused over 8 steps, in every dtype the kernels take: the foreach path is
    bitwise the per-tensor one; the fused kernels (one call for all tensors, each with its own
    step count: a parameter that joins late has its own bias corrections) and the twin agree
    with it to rounding. The native classes also skip a NaN step alike (the wrapper's base
    optimizer would see it: that is the guard's job)."""
    make, make_twin, kw = TWINS[name]
    wrapper = name.startswith("wrapper")
    x, y = data(dtype)

    def run(model, opt):
        for i in range(8):
            xb, yb = batch(i, x, y)
            for p in model.parameters():
                p.grad = None
            (model(xb) - yb).pow(2).mean().backward()
            if i < 2:  # a parameter that joins late: its own step count, its own coefficients
                list(model.parameters())[1].grad = None
            if i == 4 and not wrapper:
                next(model.parameters()).grad[0, 0] = math.nan
            opt.step()

    paths = WRAPPER_PATHS if wrapper else NATIVE_PATHS
    models, opts = {}, {}
    for path, path_kw in paths.items():
        models[path] = mlp(dtype)
        opts[path] = make(models[path].parameters(), **kw, **path_kw)
        run(models[path], opts[path])
    twin_model = mlp(dtype)
    twin = make_twin(twin_model.parameters(), **kw)
    run(twin_model, twin)

    single = models["single"]
    if "foreach" in paths:
        assert_params(single, models["foreach"])
        for p, q in zip(single.parameters(), models["foreach"].parameters(), strict=True):
            assert_state_equal(opts["single"].state[p], opts["foreach"].state[q])
    # float32: erf_float32 (2e-6); bfloat16: a rounding of the parameter (one ulp at 2^-2)
    atol = {torch.float32: 1e-5, torch.bfloat16: 4e-3, F64: 1e-13}[dtype]
    assert_params(single, models["fused"], atol=atol)
    key = "cprop_state" if wrapper else "state"
    assert_states_close(
        single,
        getattr(opts["single"], key),
        models["fused"],
        getattr(opts["fused"], key),
        atol=max(atol, 1e-6),
    )
    assert_matches_twin(single, opts["single"], twin_model, twin, atol)
    if not wrapper:  # the NaN step was skipped everywhere
        assert float(opts["single"].state[next(single.parameters())]["step"]) == 7


def test_fused_sgd_float32_bf16_train():
    for dtype in (torch.float32, torch.bfloat16):
        a, b = mlp(dtype), mlp(dtype)
        ref = ss.CPropSGD(a.parameters(), lr=0.1, momentum=0.9, fused=False)
        fused = ss.CPropSGD(b.parameters(), lr=0.1, momentum=0.9, fused=True)
        train(a, ref, 10, dtype=dtype)
        train(b, fused, 10, dtype=dtype)
        atol = 1e-5 if dtype == torch.float32 else 2e-2
        assert_params(a, b, atol=atol)
        assert fused.state[next(b.parameters())]["momentum_buffer"].dtype == torch.float32


# --------------------------------------------------------------------------------------------
# c -> inf is the bare optimizer, bitwise
# --------------------------------------------------------------------------------------------

BASES = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05),
    "NAdam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
}


@pytest.mark.parametrize("c", [1e30, math.inf])
@pytest.mark.parametrize("base", ["SGD", "Adam", "AdamW", "RMSprop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_c_is_bitwise_the_bare_optimizer(base, c, dtype):
    a, b = mlp(dtype), mlp(dtype)
    bare = BASES[base](a.parameters())
    wrapped = ss.CProp(BASES[base](b.parameters()), c=c)
    train(a, bare, 15, dtype=dtype)
    train(b, wrapped, 15, dtype=dtype)
    assert_params(a, b)


# --------------------------------------------------------------------------------------------
# State: resume, deepcopy, pickle
# --------------------------------------------------------------------------------------------


def _skip_count_apart(sd):
    """The state_dict without the native classes' ``skipped_steps`` (a bad step counts one)."""
    sd = dict(sd)
    sd["param_groups"] = [
        {k: v for k, v in g.items() if k != "skipped_steps"} for g in sd["param_groups"]
    ]
    return sd


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


MAKERS = {
    "wrapper-AdamW": lambda ps: ss.CProp(torch.optim.AdamW(ps, lr=1e-2), beta=0.9),
    "wrapper-SGD": lambda ps: ss.CProp(torch.optim.SGD(ps, lr=0.1, momentum=0.9), cdf="bft"),
    "CPropSGD": lambda ps: ss.CPropSGD(ps, lr=0.1, momentum=0.9, cprop_beta=0.9),
    "CPropAdamW": lambda ps: ss.CPropAdamW(ps, lr=1e-2, amsgrad=True, cprop_beta=0.99),
    "CPropAdam-foreach": lambda ps: ss.CPropAdam(ps, lr=1e-2, foreach=True),
}


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("name", list(MAKERS))
def test_state_dict_resume_is_bitwise(name, k):
    make = MAKERS[name]
    ref_model = mlp()
    ref = make(ref_model.parameters())
    train(ref_model, ref, 2 * k)

    model = mlp()
    opt = make(model.parameters())
    train(model, opt, k)
    saved_model = _roundtrip(model.state_dict())
    saved_opt = _roundtrip(opt.state_dict())

    fresh_model = mlp(seed=99)
    fresh_model.load_state_dict(saved_model)
    fresh = make(fresh_model.parameters())
    fresh.load_state_dict(saved_opt)
    train(fresh_model, fresh, k, start=k)
    assert_params(ref_model, fresh_model)
    assert_state_equal(_roundtrip(ref.state_dict()), _roundtrip(fresh.state_dict()))


@pytest.mark.parametrize("name", ["wrapper-AdamW", "CPropAdamW"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_continue_identically(name, how):
    model = mlp()
    opt = MAKERS[name](model.parameters())
    train(model, opt, 3)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    train(model, opt, 3, start=3)
    train(model2, opt2, 3, start=3)
    assert_params(model, model2)
    assert_state_equal(_roundtrip(opt.state_dict()), _roundtrip(opt2.state_dict()))


def test_wrapper_state_dict_needs_cprop_state():
    opt = ss.CProp(torch.optim.SGD(mlp().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="cprop_state"):
        opt.load_state_dict(torch.optim.SGD(mlp().parameters(), lr=0.1).state_dict())


@pytest.mark.parametrize("name", ["wrapper-AdamW", "CPropAdamW", "CPropSGD"])
def test_bf16_params_keep_fp32_statistics_through_load(name):
    model = mlp(torch.bfloat16)
    opt = MAKERS[name](model.parameters())
    train(model, opt, 3, dtype=torch.bfloat16)
    fresh_model = mlp(torch.bfloat16)
    fresh = MAKERS[name](fresh_model.parameters())
    fresh.load_state_dict(_roundtrip(opt.state_dict()))
    state = fresh.cprop_state if isinstance(fresh, ss.CProp) else fresh.state
    for p in fresh_model.parameters():
        assert state[p]["cprop_exp_avg"].dtype == torch.float32
        assert state[p]["step"].dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Training: loss goes down for every wrapped optimizer, fp32 and bf16
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base", [*BASES, "CPropSGD", "CPropAdam", "CPropAdamW"])
def test_loss_decreases(base, dtype):
    model = mlp(dtype, hidden=16)
    if base == "CPropSGD":
        opt = ss.CPropSGD(model.parameters(), lr=0.1, momentum=0.9, cprop_beta=0.9)
    elif base.startswith("CProp"):
        opt = getattr(ss, base)(model.parameters(), lr=1e-2, cprop_beta=0.9)
    else:
        opt = ss.CProp(BASES[base](model.parameters()), beta=0.9)
    before = full_loss(model, dtype)
    train(model, opt, 60, dtype=dtype)
    after = full_loss(model, dtype)
    assert after < 0.8 * before
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Inputs and errors
# --------------------------------------------------------------------------------------------

BAD = [
    ("beta", 1.0),
    ("beta", -0.1),
    ("beta", math.nan),
    ("c", 0.0),
    ("c", -1.0),
    ("c", math.nan),
    ("eps", -1e-8),
    ("eps", math.nan),
    ("eps", math.inf),
    ("cdf", "gauss"),
    ("method", "sign"),
]


@pytest.mark.parametrize("arg,value", BAD)
def test_wrapper_invalid_hyperparameters(arg, value):
    with pytest.raises(ValueError, match=arg):
        ss.CProp(torch.optim.SGD(mlp().parameters(), lr=0.1), **{arg: value})


@pytest.mark.parametrize("arg,value", BAD)
@pytest.mark.parametrize("cls", [ss.CPropSGD, ss.CPropAdam, ss.CPropAdamW])
def test_native_invalid_hyperparameters(cls, arg, value):
    name = arg if arg in ("cdf", "method") else f"cprop_{arg}"
    with pytest.raises(ValueError, match=arg):
        cls(mlp().parameters(), **{name: value})


@pytest.mark.parametrize(
    "cls,kw",
    [
        (ss.CPropSGD, {"lr": -0.1}),
        (ss.CPropSGD, {"momentum": -0.5}),
        (ss.CPropSGD, {"nesterov": True}),
        (ss.CPropSGD, {"weight_decay": math.nan}),
        (ss.CPropAdam, {"betas": (1.0, 0.999)}),
        (ss.CPropAdam, {"betas": (0.9, math.nan)}),
        (ss.CPropAdam, {"eps": -1.0}),
        (ss.CPropAdamW, {"weight_decay": -0.1}),
        (ss.CPropAdamW, {"foreach": True, "fused": True}),
        (ss.CPropSGD, {"foreach": True, "fused": True}),
    ],
)
def test_native_invalid_base_hyperparameters(cls, kw):
    with pytest.raises(ValueError):
        cls(mlp().parameters(), **kw)


@pytest.mark.parametrize("make", [lambda ps: ss.CProp(torch.optim.SGD(ps)), ss.CPropAdamW])
def test_sparse_gradients_raise(make):
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = make(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_complex_gradients_raise_in_wrapper():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    opt = ss.CProp(torch.optim.SGD([p], lr=0.1))
    p.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


def test_complex_params_rejected_at_construction():
    with pytest.raises(ValueError, match="complex"):
        ss.CPropAdam([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


def test_wrapper_needs_an_optimizer():
    with pytest.raises(TypeError, match="Optimizer"):
        ss.CProp([torch.zeros(2)])


# --------------------------------------------------------------------------------------------
# Faults and invariants
# --------------------------------------------------------------------------------------------

ALL = {
    **MAKERS,
    "CPropSGD-nesterov": lambda ps: ss.CPropSGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1
    ),
    "CPropAdam-wd": lambda ps: ss.CPropAdam(ps, lr=1e-2, weight_decay=0.1),
    "CPropAdamW-fused": lambda ps: ss.CPropAdamW(ps, lr=1e-2, fused=True),
    "CPropSGD-fused": lambda ps: ss.CPropSGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, fused=True
    ),
    "wrapper-fused": lambda ps: ss.CProp(torch.optim.AdamW(ps, lr=1e-2), fused=True),
}


@pytest.mark.parametrize("name", list(ALL))
def test_grad_is_unchanged_by_step(name):
    model = mlp()
    opt = ALL[name](model.parameters())
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 4)).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), grads, strict=True):
            assert torch.equal(p.grad, g)


@pytest.mark.parametrize("bad_at", [0, 3])
@pytest.mark.parametrize("name", list(ALL))
def test_nonfinite_gradient_is_skipped_exactly(name, bad_at):
    """The bad step changes nothing of CProp (and nothing at all for the native classes)."""
    make = ALL[name]
    x, y = data()
    clean_model, dirty_model = mlp(), mlp()
    clean, dirty = make(clean_model.parameters()), make(dirty_model.parameters())
    for i in range(6):
        for model, opt in ((clean_model, clean), (dirty_model, dirty)):
            if opt is clean and i == bad_at:
                continue
            xb, yb = batch(i, x, y)
            opt.zero_grad()
            (model(xb) - yb).pow(2).mean().backward()
            if opt is dirty and i == bad_at:
                before = [p.detach().clone() for p in model.parameters()]
                next(model.parameters()).grad[0, 0] = math.nan
                opt.step()
                assert all(
                    torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
                )
                continue
            opt.step()
    if isinstance(clean, ss.CProp):
        # the base optimizer's own state saw the NaN (protecting it is the guard's job); CProp's
        # statistics did not: test_wrapper_nonfinite_keeps_cprop_statistics
        return
    assert_params(clean_model, dirty_model)
    assert int(dirty.stats()["skipped_steps"]) == 1 + int(clean.stats()["skipped_steps"])
    assert_state_equal(
        _roundtrip(_skip_count_apart(clean.state_dict())),
        _roundtrip(_skip_count_apart(dirty.state_dict())),
    )


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "aminmax"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_grads_finite_is_exact_at_the_gradient_limit(dtype, fused, monkeypatch):
    """Note [huge gradients]: elements up to the limit (2**63 for float32 statistics, the
    largest value for float16) pass, the next larger value and NaN, inf, -inf do not; on the
    kernel path and the aminmax path alike."""
    if not fused:
        monkeypatch.setenv("STEADYSTEP_FUSED", "0")
    limit = _kernels.gradient_limit(_kernels.stats_dtype(dtype))
    big = min(limit, torch.finfo(dtype).max)
    assert torch.tensor(big, dtype=dtype).item() == big  # the limit is representable
    grads = [torch.full((1000,), big, dtype=dtype), torch.full((7,), -big, dtype=dtype)]
    assert bool(cprop_module.grads_finite(grads))
    assert bool(cprop_module.grads_finite([*grads, torch.empty(0, dtype=dtype)]))
    assert bool(cprop_module.grads_finite([torch.empty(0), torch.empty(0, 3)]))
    assert bool(cprop_module.grads_finite([]))
    above = torch.nextafter(torch.tensor(big, dtype=F64), torch.tensor(math.inf, dtype=F64))
    bads = [math.nan, math.inf, -math.inf]
    if big < torch.finfo(dtype).max:  # a finite value above the limit exists
        bads += [torch.tensor(big * 2, dtype=dtype).item(), -big * 2]
    assert above > big
    for bad in bads:
        for where in (0, 999):
            poisoned = grads[0].clone()
            poisoned[where] = bad
            assert not bool(cprop_module.grads_finite([grads[1], poisoned]))
    mixed = [torch.ones(3, dtype=dtype), torch.ones(2, dtype=F64)]
    assert bool(cprop_module.grads_finite(mixed))
    mixed[1][0] = math.nan
    assert not bool(cprop_module.grads_finite(mixed))


def test_wrapper_nonfinite_keeps_cprop_statistics():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ss.CProp(torch.optim.SGD([p], lr=0.1))
    p.grad = torch.tensor([1.0, -1.0, 0.5])
    opt.step()
    saved = {k: v.clone() for k, v in opt.cprop_state[p].items()}
    before = p.detach().clone()
    p.grad = torch.tensor([1.0, math.inf, 0.5])
    opt.step()
    assert torch.equal(p.detach(), before)
    for k, v in saved.items():
        assert torch.equal(opt.cprop_state[p][k], v)


def test_frozen_empty_and_scalar_params():
    a = torch.nn.Parameter(torch.ones(()))  # 0-d
    frozen = torch.nn.Parameter(torch.ones(2))
    for opt in (
        ss.CPropAdamW([{"params": [a, frozen]}, {"params": []}], lr=0.1),
        ss.CProp(torch.optim.Adam([{"params": [a, frozen]}, {"params": []}], lr=0.1)),
    ):
        for _ in range(3):
            a.grad = torch.ones(())
            opt.step()
        state = opt.cprop_state if isinstance(opt, ss.CProp) else opt.state
        assert frozen not in state or not state[frozen]
        assert a in state
        opt2 = copy.deepcopy(opt)
        opt2.load_state_dict(_roundtrip(opt.state_dict()))


def test_zero_gradients_leave_params_unchanged_and_no_nan():
    model = mlp()
    for opt in (ss.CPropAdam(model.parameters()), ss.CProp(torch.optim.Adam(model.parameters()))):
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
        for p, b in zip(model.parameters(), before, strict=True):
            assert torch.equal(p, b)
        assert all(not v.isnan().any() for v in opt.stats().values())


# --------------------------------------------------------------------------------------------
# API: sharing, groups, closure, schedulers, hooks, telemetry
# --------------------------------------------------------------------------------------------


def test_shared_v_when_betas_match():
    p = torch.nn.Parameter(torch.ones(3))
    cases = [
        (ss.CPropAdamW([p], weight_decay=0.1), True),
        (ss.CPropAdam([p]), True),
        (ss.CPropAdam([p], weight_decay=0.1), False),  # Adam sees g + wd p
        (ss.CPropAdamW([p], betas=(0.9, 0.99)), False),
        (ss.CPropAdamW([p], method="relative"), False),
    ]
    for opt, shared in cases:
        p.grad = torch.ones(3)
        opt.step()
        key = "cprop_exp_avg_abs" if opt.param_groups[0]["cprop_method"] == "relative" else None
        has_own = (key or "cprop_exp_avg_sq") in opt.state[p]
        assert has_own != shared


def test_add_param_group_gets_cprop_defaults_and_overrides():
    a, b, c = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    opt = ss.CProp(torch.optim.SGD([a], lr=0.1), beta=0.9, c=2.0)
    opt.add_param_group({"params": [b]})
    opt.add_param_group({"params": [c], "cprop_c": 5.0})
    assert [g["cprop_c"] for g in opt.param_groups] == [2.0, 2.0, 5.0]
    assert opt.param_groups is opt.optimizer.param_groups
    with pytest.raises(ValueError, match="cprop_beta"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "cprop_beta": 1.5})
    native = ss.CPropAdamW([a], cdf="bft")
    native.add_param_group({"params": [b], "cdf": "bfo"})
    assert [g["cprop_cdf"] for g in native.param_groups] == ["bft", "bfo"]


@pytest.mark.parametrize("make", [lambda ps: ss.CProp(torch.optim.SGD(ps, lr=0.1)), ss.CPropSGD])
def test_closure_and_loss_keyword(make):
    model = mlp()
    opt = make(model.parameters())
    x, y = data()

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor)
    closure()
    assert opt.step(loss=first.detach()) is None


def test_wrapper_with_lbfgs_closure():
    model = mlp()
    opt = ss.CProp(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), c=math.inf)
    x, y = data()

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    before = full_loss(model)
    for _ in range(3):
        opt.step(closure)
    assert full_loss(model) < before


def test_scheduler_hooks_and_zero_grad_delegate():
    model = mlp()
    opt = ss.CProp(torch.optim.SGD(model.parameters(), lr=0.1))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    train(model, opt, 1)
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.05
    assert calls == ["pre", "post"]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "CProp" in repr(opt)


def test_stats_are_0d_tensors_in_unit_interval():
    model = mlp()
    for opt in (
        ss.CPropAdamW(model.parameters(), cprop_beta=0.9),
        ss.CProp(torch.optim.SGD(model.parameters(), lr=0.1), beta=0.9),
    ):
        native = not isinstance(opt, ss.CProp)  # the native classes count skipped steps
        assert opt.stats() == ({"skipped_steps": torch.tensor(0)} if native else {})
        train(model, opt, 10)
        stats = opt.stats()
        assert int(stats.pop("skipped_steps", 0)) == 0
        assert set(stats) == {
            "mean_scale",
            "frac_scale_below_half",
            "group0.mean_scale",
            "group0.frac_scale_below_half",
        }
        for v in stats.values():
            assert isinstance(v, torch.Tensor) and v.dim() == 0
            assert 0.0 <= v.item() <= 1.0
        assert stats["mean_scale"] < 1.0


@pytest.mark.parametrize("cls", [ss.CPropAdamW, ss.CPropSGD])
def test_fused_changing_lr_builds_nothing_new(cls):
    """A scheduler's lr and a guard's cut are arguments of the kernel call: no new library."""
    model = mlp()
    opt = cls(model.parameters(), lr=1e-2, fused=True)
    train(model, opt, 2)
    built = dict(_kernels._cpu._LOADED)
    for lr in (5e-3, 1e-3):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.scale_lr_(torch.tensor(0.5, dtype=torch.float64))
        train(model, opt, 2, start=2)
    assert _kernels._cpu._LOADED == built


def test_erf_float32_approximation_error():
    x = torch.linspace(0, 12, 400001)
    error = (cprop_module.erf_float32(x).double() - torch.erf(x.double())).abs().max().item()
    assert error < 2e-6
    assert torch.equal(
        cprop_module.erf_float32(torch.tensor([0.0, math.inf])), torch.tensor([0.0, 1.0])
    )


@pytest.mark.parametrize("kw", [{"cprop_c": 2.0}, {"cdf": "bft", "cprop_beta": 0.99}])
def test_fused_float32_close_to_reference(kw):
    a, b = mlp(), mlp()
    ref = ss.CPropAdamW(a.parameters(), lr=1e-2, fused=False, **kw)
    fused = ss.CPropAdamW(b.parameters(), lr=1e-2, fused=True, **kw)
    train(a, ref, 10)
    train(b, fused, 10)
    assert_params(a, b, atol=1e-5)
    torch.testing.assert_close(
        fused.stats()["mean_scale"], ref.stats()["mean_scale"], atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("kw", [{}, {"method": "relative", "c": 3.0, "cdf": "bft", "beta": 0.9}])
def test_fused_wrapper_matches_eager_wrapper(kw):
    a, b = mlp(F64), mlp(F64)
    eager = ss.CProp(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), fused=False, **kw)
    fused = ss.CProp(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), fused=True, **kw)
    train(a, eager, 12, dtype=F64)
    train(b, fused, 12, dtype=F64)
    assert_params(a, b, atol=1e-12)
    assert_states_close(a, eager.cprop_state, b, fused.cprop_state, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_wrapper_with_infinite_c_is_bitwise_the_bare_optimizer(dtype):
    a, b = mlp(dtype), mlp(dtype)
    bare = torch.optim.AdamW(a.parameters(), lr=1e-2)
    wrapped = ss.CProp(torch.optim.AdamW(b.parameters(), lr=1e-2), c=math.inf, fused=True)
    train(a, bare, 8, dtype=dtype)
    train(b, wrapped, 8, dtype=dtype)
    assert_params(a, b)


# --------------------------------------------------------------------------------------------
# The guard's protocol: lr_multiplier, scale_lr_, max_lr, masked_step (native classes)
# --------------------------------------------------------------------------------------------

PROTOCOL = {
    "CPropSGD": lambda ps, lr: ss.CPropSGD(ps, lr=lr, momentum=0.9, weight_decay=0.1),
    "CPropSGD-foreach": lambda ps, lr: ss.CPropSGD(
        ps, lr=lr, nesterov=True, momentum=0.9, foreach=True
    ),
    "CPropAdamW": lambda ps, lr: ss.CPropAdamW(ps, lr=lr, amsgrad=True),
    "CPropAdam-foreach": lambda ps, lr: ss.CPropAdam(ps, lr=lr, weight_decay=0.1, foreach=True),
    "CPropAdamW-fused": lambda ps, lr: ss.CPropAdamW(ps, lr=lr, fused=True),
    "CPropSGD-fused": lambda ps, lr: ss.CPropSGD(ps, lr=lr, momentum=0.9, fused=True),
}


def test_native_classes_are_maskable_and_the_wrapper_is_not():
    params = list(mlp().parameters())
    for make in PROTOCOL.values():
        assert isinstance(make(params, 1e-2), ss.optim.MaskableOptimizer)
    assert not isinstance(ss.CProp(torch.optim.SGD(params, lr=0.1)), ss.optim.MaskableOptimizer)


@pytest.mark.parametrize("name", list(PROTOCOL))
def test_lr_multiplier_scales_the_rate_on_every_path(name):
    """``scale_lr_(0.5)`` gives the steps of ``lr / 2`` (to rounding); a factor of 1 changes
    no bit; ``max_lr`` is ``lr * lr_multiplier``."""
    make = PROTOCOL[name]
    models = [mlp(F64) for _ in range(3)]
    cut, half = make(models[0].parameters(), 0.02), make(models[1].parameters(), 0.01)
    one = make(models[2].parameters(), 0.02)
    reference = mlp(F64)
    plain = make(reference.parameters(), 0.02)
    assert all(
        g["lr_multiplier"].dtype == F64 and float(g["lr_multiplier"]) == 1.0
        for g in cut.param_groups
    )
    cut.scale_lr_(torch.tensor(0.5))
    one.scale_lr_(torch.tensor(1.0, dtype=F64))
    assert float(cut.max_lr()) == 0.01 and float(one.max_lr()) == 0.02
    for model, opt in zip([*models, reference], [cut, half, one, plain], strict=True):
        train(model, opt, 6, dtype=F64)
    assert_params(models[0], models[1], atol=1e-12)
    assert_params(models[2], reference)  # bitwise
    assert not torch.allclose(next(models[0].parameters()), next(reference.parameters()))


@pytest.mark.parametrize("name", list(PROTOCOL))
def test_masked_step_is_an_exact_no_op(name):
    """``masked_step(True)`` changes no parameter and no state (step counts included); the run
    then goes on as one without that batch. ``masked_step(False)`` is ``step()``."""
    make = PROTOCOL[name]
    x, y = data()
    clean_model, masked_model = mlp(), mlp()
    clean, masked = make(clean_model.parameters(), 1e-2), make(masked_model.parameters(), 1e-2)
    for i in range(6):
        for model, opt in ((clean_model, clean), (masked_model, masked)):
            if opt is clean and i == 3:
                continue
            xb, yb = batch(i, x, y)
            opt.zero_grad()
            (model(xb) - yb).pow(2).mean().backward()
            if opt is masked and i == 3:
                before = copy.deepcopy(_roundtrip(opt.state_dict()))
                params = [p.detach().clone() for p in model.parameters()]
                opt.masked_step(torch.tensor(True))
                assert all(
                    torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True)
                )
                assert_state_equal(before, _roundtrip(opt.state_dict()))
            elif opt is masked:
                opt.masked_step(torch.tensor(False))
            else:
                opt.step()
    assert_params(clean_model, masked_model)
    assert_state_equal(_roundtrip(clean.state_dict()), _roundtrip(masked.state_dict()))


def test_lr_multiplier_checkpoints_and_old_checkpoints_load_with_one():
    model = mlp()
    opt = ss.CPropAdamW(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    opt.scale_lr_(torch.tensor(0.25))
    saved = opt.state_dict()
    opt.scale_lr_(torch.tensor(0.5))  # a later cut does not reach the saved dict
    assert float(saved["param_groups"][0]["lr_multiplier"]) == 0.25
    fresh_model = mlp()
    fresh = ss.CPropAdamW(fresh_model.parameters(), lr=1e-2)
    fresh.load_state_dict(_roundtrip(saved))
    assert float(fresh.param_groups[0]["lr_multiplier"]) == 0.25
    assert fresh.param_groups[0]["lr_multiplier"] is not saved["param_groups"][0]["lr_multiplier"]
    old = _roundtrip(saved)
    for group in old["param_groups"]:
        del group["lr_multiplier"]  # a checkpoint from before the multiplier existed
    fresh.load_state_dict(old)
    multiplier = fresh.param_groups[0]["lr_multiplier"]
    assert multiplier.dtype == F64 and multiplier.dim() == 0 and float(multiplier) == 1.0
    before = [p.detach().clone() for p in fresh_model.parameters()]
    train(fresh_model, fresh, 1)  # and it steps
    assert not torch.equal(before[0], next(fresh_model.parameters()))


@pytest.mark.parametrize("name", ["wrapper-AdamW", "wrapper-SGD", "CPropAdamW", "CPropSGD"])
def test_scales_are_the_per_element_scales_that_stats_summarise(name):
    model = mlp()
    opt = MAKERS[name](model.parameters())
    assert opt.scales() == {}  # no statistics before the first step
    train(model, opt, 6)
    scales = opt.scales()
    assert [id(p) for p in scales] == [id(p) for p in model.parameters()]
    for p, s in scales.items():
        assert s.shape == p.shape and s.dtype == torch.float32
        assert ((s >= 0) & (s <= 1)).all()
    flat = torch.cat([s.flatten() for s in scales.values()])
    stats = opt.stats()
    torch.testing.assert_close(flat.mean(), stats["mean_scale"], rtol=1e-6, atol=0)
    assert torch.equal((flat < 0.5).float().mean(), stats["frac_scale_below_half"])
    # the functional core on the same statistics gives the same numbers
    state = opt.cprop_state if isinstance(opt, ss.CProp) else opt.state
    group = opt.param_groups[0]
    params = list(model.parameters())
    second = [state[p].get("cprop_exp_avg_sq", state[p].get("exp_avg_sq")) for p in params]
    reference = cprop_module.cprop_scales(
        [state[p]["cprop_exp_avg"] for p in params],
        second,
        [state[p]["step"] for p in params],
        found_finite=torch.tensor(True),
        beta=group["cprop_beta"],
        c=group["cprop_c"],
        eps=group["cprop_eps"],
        cdf=group["cprop_cdf"],
        method=group["cprop_method"],
    )
    for s, ref in zip(scales.values(), reference, strict=True):
        assert torch.equal(s, ref)
    assert not torch.equal(flat, torch.ones_like(flat))


@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "foreach"])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps, fe: ss.CPropAdamW(ps, lr=1e30, foreach=fe, fused=False),
        lambda ps, fe: ss.CPropAdam(ps, lr=1e30, weight_decay=0.1, foreach=fe, fused=False),
        lambda ps, fe: ss.CPropSGD(
            ps, lr=1e30, momentum=0.9, weight_decay=0.1, foreach=fe, fused=False
        ),
    ],
    ids=["CPropAdamW", "CPropAdam-l2", "CPropSGD"],
)
def test_a_skipped_step_at_a_huge_lr_leaves_params_and_state_unchanged(make, foreach):
    """At lr = 1e30 a clean step leaves parameters near 1e30; on the next, NaN-gradient step
    AdamW's decoupled decay ``-lr * wd * p`` would overflow to inf and a multiply by the 0 of
    the skipped step would give NaN. The skip is a select on the step's factors, so the
    parameters and every statistic stay bitwise as they were."""
    p = torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(0)))
    opt = make([p], foreach)
    p.grad = torch.randn(6, generator=torch.Generator().manual_seed(1))
    opt.step()
    assert torch.isfinite(p).all()
    before = p.detach().clone()
    state = copy.deepcopy(opt.state_dict())
    p.grad = p.grad.clone()
    p.grad[2] = math.nan
    opt.step()
    assert torch.equal(p.detach(), before)
    if "skipped_steps" in opt.param_groups[0]:  # the native classes count the skipped step
        assert int(opt.param_groups[0]["skipped_steps"]) == 1
        state, now = _skip_count_apart(state), _skip_count_apart(opt.state_dict())
    else:
        now = opt.state_dict()
    assert_state_equal(_roundtrip(state), _roundtrip(now))


def test_the_import_paths_of_the_single_module_layout_still_work():
    """Code written against ``steadystep/optim/cprop.py`` (before it became a package) imports
    the same objects from ``steadystep.optim.cprop`` as from ``steadystep``."""
    import steadystep.optim.cprop as old

    for name in ("CProp", "CPropAdam", "CPropAdamW", "CPropSGD"):
        assert getattr(old, name) is getattr(ss, name), name
    for name in ("cprop_adam", "cprop_scales", "cprop_sgd", "cprop_update_", "grads_finite"):
        assert callable(getattr(old, name)), name
    assert set(old.__all__) <= set(dir(old))
