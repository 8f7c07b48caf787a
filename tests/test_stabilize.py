"""ss.stabilize: ALRC, the guard and CProp composed in the one order that works.

The order (wrong ones refused at construction, the right one passing loss=, closures and stats),
the raw loss reaching the guard while the gradient comes from the clipped one, the issue's
gradient explosion caught, the native CProp classes chosen for plain torch optimizers, one
state_dict resuming every component bitwise, schedulers, rho from the sizes, and bad input."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import steadystep as ss
from steadystep.stabilize import configure_detector

F64 = torch.float64


def _stabilize(*args, **kwargs):
    """ss.stabilize with ALRC on (opt-in since the clean-run benchmark): these tests exercise
    ALRC inside the composition; a test of the defaults calls ss.stabilize itself."""
    return ss.stabilize(*args, **{"alrc": True, **kwargs})


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    return net.to(dtype)


def batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (16,), generator=g)
    return x, y


def per_sample_loss(model, step, dtype=torch.float32, spike_at=None):
    """Cross-entropy per sample; 50 times larger at ``spike_at`` (a corrupted batch)."""
    x, y = batch(step, dtype)
    loss = F.cross_entropy(model(x), y, reduction="none")
    return loss * 50.0 if step == spike_at else loss


def train(model, opt, steps, *, start=0, dtype=torch.float32, spike_at=None):
    for step in range(start, start + steps):
        loss = opt.clip(per_sample_loss(model, step, dtype, spike_at)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_equal_params(a, b):
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)


def flat_tensors(obj, prefix=""):
    """Every tensor of a (nested) state_dict, by path."""
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}/{i}"))
    return out


# -- the order ---------------------------------------------------------------------------------


def sgd(model, **kw):
    return torch.optim.SGD(model.parameters(), lr=0.05, **kw)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: ss.SALeRA(ss.layer_groups(m), lr=0.1),
        lambda m: ss.SPALeRA(m.parameters(), lr=0.1),
        lambda m: ss.CatastropheGuard(sgd(m)),
        lambda m: ss.CatastropheGuard(ss.CPropAdamW(m.parameters())),
    ],
    ids=["SALeRA", "SPALeRA", "guard(SGD)", "guard(CPropAdamW)"],
)
def test_cprop_around_a_guard_is_refused_naming_the_right_order(make):
    model = mlp()
    with pytest.raises(ValueError, match=r"CatastropheGuard\(CProp\(base\)\)") as info:
        ss.CProp(make(model))
    assert "half-undo" in str(info.value)


def test_salera_refusal_says_how_to_put_cprop_inside():
    with pytest.raises(ValueError, match=r"CatastropheGuard\(CProp\(ALeRA"):
        ss.CProp(ss.SALeRA(ss.layer_groups(mlp()), lr=0.1))


@pytest.mark.parametrize(
    "make",
    [
        lambda m: ss.CProp(sgd(m)),
        lambda m: ss.CPropAdamW(m.parameters()),
        lambda m: ss.CPropSGD(m.parameters()),
    ],
    ids=["CProp(SGD)", "CPropAdamW", "CPropSGD"],
)
def test_double_cprop_is_refused(make):
    with pytest.raises(ValueError, match="already applies CProp"):
        ss.CProp(make(mlp()))


def test_double_guard_and_wrapping_a_stabilized_are_refused():
    model = mlp()
    with pytest.raises(ValueError, match="already a CatastropheGuard"):
        ss.CatastropheGuard(ss.CatastropheGuard(ss.CProp(sgd(model))))
    stabilized = _stabilize(sgd(model))
    with pytest.raises(ValueError, match=r"guard=\.\.\. to ss\.stabilize"):
        ss.CatastropheGuard(stabilized)
    with pytest.raises(ValueError, match=r"cprop=\.\.\. to ss\.stabilize"):
        ss.CProp(stabilized)
    with pytest.raises(ValueError, match="already a Stabilized"):
        _stabilize(stabilized)


def test_guard_around_cprop_passes_loss_closure_and_stats():
    # the order that works, built by hand: loss= reaches the guard, stats include CProp's
    model = mlp()
    opt = ss.CatastropheGuard(
        ss.CProp(torch.optim.AdamW(model.parameters(), lr=1e-2)), ss.PageHinkley(1.0, rho=0.5)
    )
    for step in range(12):
        loss = per_sample_loss(model, step).mean() + (100.0 if step == 8 else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
    stats = opt.stats()
    assert {"alarms", "mean_scale", "detector_threshold"} <= set(stats)
    assert opt.history()[0]["step"] == 8 and int(stats["alarms"]) == 1

    def closure():
        opt.zero_grad()
        out = per_sample_loss(model, 12).mean()
        out.backward()
        return out

    returned = opt.step(closure)
    assert torch.equal(opt.detector.last_loss, returned.detach())


def test_stabilized_closure_clips_inside_and_the_guard_sees_the_raw_loss():
    model = mlp()
    opt = _stabilize(sgd(model), alrc={"mu1_init": 0.1, "mu2_init": 0.02}, guard=ss.PageHinkley())
    seen = {}

    def closure():
        opt.zero_grad()
        per_sample = per_sample_loss(model, 0)
        seen["raw"] = per_sample.detach().mean()
        loss = opt.clip(per_sample).mean()
        loss.backward()
        return loss

    clipped = opt.step(closure)
    assert torch.equal(opt.guard.detector.last_loss, seen["raw"])
    assert clipped < seen["raw"]  # ALRC clipped (the low initial moments), the guard did not care


# -- the raw loss for the guard, the clipped one for the gradient ------------------------------


def test_guard_watches_raw_mean_and_gradient_comes_from_clipped_losses():
    model = mlp()
    alrc_settings = {"mu1_init": 0.1, "mu2_init": 0.02}  # low moments: this batch is clipped
    opt = _stabilize(sgd(model), alrc=alrc_settings, cprop=False, guard=ss.PageHinkley())
    twin = mlp()
    reference_alrc = ss.ALRC(**alrc_settings)
    per_sample = per_sample_loss(model, 0)
    loss = opt.clip(per_sample).mean()
    loss.backward()
    reference = reference_alrc(per_sample_loss(twin, 0)).mean()
    reference.backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)  # the gradient of the clipped losses
    opt.step()
    raw = per_sample.detach().mean()
    assert torch.equal(opt.guard.detector.last_loss, raw)
    assert float(loss.detach()) < float(raw)
    assert float(opt.stats()["alrc/clipped_fraction"]) > 0


def test_accumulation_gives_the_guard_the_mean_raw_loss_and_loss_overrides():
    model = mlp()
    opt = _stabilize(sgd(model), guard=ss.PageHinkley())  # its last_loss: what it watched
    raws = []
    opt.zero_grad()
    for step in range(3):  # three micro-batches, one step
        per_sample = per_sample_loss(model, step)
        raws.append(per_sample.detach().mean())
        (opt.clip(per_sample).mean() / 3).backward()
    opt.observe_loss(torch.tensor(123.0))  # a callback's (clipped) loss loses to clip()'s
    opt.step()
    torch.testing.assert_close(opt.guard.detector.last_loss, torch.stack(raws).mean())
    # an explicit loss= wins; then nothing is left for the next step
    opt.clip(per_sample_loss(model, 3))
    opt.step(loss=torch.tensor(0.5))
    assert float(opt.guard.detector.last_loss) == 0.5
    with pytest.raises(RuntimeError, match=r"opt\.clip"):
        opt.step()
    opt.observe_loss(torch.tensor(0.25))  # without clip(), an observed loss is used
    opt.step()
    assert float(opt.guard.detector.last_loss) == 0.25


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``k`` backward: a gradient explosion."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.k, None


def _digits_run(composed, steps=150, explode_at=80):
    """Digits MLP, SGD + CProp + guard + ALRC; the gradient x1e4 at ``explode_at``.

    ``composed``: ss.stabilize, the guard sees the raw loss. Otherwise the same pieces by hand
    with the guard fed ALRC's clipped loss, as the README's Lightning example used to."""
    from steadystep.experiments.datasets import load_classification

    data = load_classification("digits")
    x_all, y_all = data.x_train.flatten(1), data.y_train
    n, b = len(y_all), 32
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    if composed:
        # the same detector as by hand below: the comparison is of the loss it is fed
        opt = _stabilize(
            torch.optim.SGD(model.parameters(), lr=0.1),
            guard=ss.PageHinkley(),
            batch_size=b,
            dataset_size=n,
        )
        guard, alrc = opt.guard, None
    else:
        alrc = ss.ALRC()
        guard = opt = ss.CatastropheGuard(
            ss.CPropSGD(model.parameters(), lr=0.1), ss.PageHinkley(rho=b / n)
        )
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(n, generator=g)
    alarm_steps, full_loss, before_explosion, raw_after = [], {}, None, None
    for step in range(steps):
        idx = perm[(step * b) % (n - b + 1) :][:b]
        out = model(x_all[idx])
        if step == explode_at:
            out = _ScaleGrad.apply(out, 1e4)
            before_explosion = params_of(model)
        per_sample = F.cross_entropy(out, y_all[idx], reduction="none")
        loss = opt.clip(per_sample).mean() if composed else alrc(per_sample).mean()
        opt.zero_grad()
        loss.backward()
        alarms = int(guard.alarms)
        opt.step() if composed else opt.step(loss=loss.detach())
        if int(guard.alarms) > alarms:
            alarm_steps.append(step)
        if step == explode_at + 1:
            raw_after = (float(per_sample.detach().mean()), float(loss.detach()))
        if step == explode_at + 2:  # the ladder's rollback (Note [the ladder])
            after_rollback = params_of(model)
        with torch.no_grad():
            if step in (explode_at - 1, steps - 1):
                full_loss[step] = float(F.cross_entropy(model(x_all), y_all))
    return {
        "alarms": alarm_steps,
        "full_loss": full_loss,
        "before_explosion": before_explosion,
        "after_rollback": after_rollback,
        "raw_and_seen": raw_after,
    }


def test_gradient_explosion_unseen_through_clipped_loss_caught_through_raw_loss():
    explode = 80
    fed_clipped = _digits_run(composed=False, explode_at=explode)
    composed = _digits_run(composed=True, explode_at=explode)
    # The weights were thrown away at step 80: the raw loss at 81 is huge, ALRC's clipped loss
    # (what the hand-built guard saw) is a few times the normal loss.
    raw, seen = fed_clipped["raw_and_seen"]
    assert raw > 20 * seen
    # fed the clipped loss, the guard saw nothing at the explosion or the step after it ...
    assert not {explode, explode + 1} & set(fed_clipped["alarms"])
    # ... and the run never recovered: worse at the end than before the explosion
    last = max(fed_clipped["full_loss"])
    assert fed_clipped["full_loss"][last] > fed_clipped["full_loss"][explode - 1]
    # the composition alarms at the step after it (the first raw loss of the thrown weights):
    # it skips that batch, alarms again at the same weights, rolls the explosion's update back
    # bitwise (the ladder's second rung), and trains on below the pre-explosion loss
    assert composed["alarms"][:2] == [explode + 1, explode + 2]
    assert_equal_params(composed["after_rollback"], composed["before_explosion"])
    assert composed["full_loss"][last] < composed["full_loss"][explode - 1]


# -- the native classes for plain torch optimizers ---------------------------------------------


@pytest.mark.parametrize(
    "base_cls,kw,native_cls",
    [
        (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}, ss.CPropSGD),
        (torch.optim.Adam, {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 1e-3}, ss.CPropAdam),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}, ss.CPropAdamW),
    ],
    ids=["SGD", "Adam", "AdamW"],
)
# the scheduler built on the base never sees that object step, and says so
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_native_class_has_the_base_settings_and_matches_the_wrapper(base_cls, kw, native_cls):
    a, b = mlp(F64), mlp(F64)
    groups_a = [
        {"params": list(a[0].parameters()), "lr": kw["lr"] / 2},
        {"params": list(a[2].parameters())},
    ]
    groups_b = [
        {"params": list(b[0].parameters()), "lr": kw["lr"] / 2},
        {"params": list(b[2].parameters())},
    ]
    base = base_cls(groups_a, **kw)
    sched = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.5)  # built on the base
    # no guard here: its cut goes to lr_multiplier (native) or lr (wrapper), tested below
    native = _stabilize(base, cprop={"beta": 0.99}, guard=False)
    wrapper = _stabilize(base_cls(groups_b, **kw), cprop={"beta": 0.99}, guard=False, native=False)
    assert type(native.cprop) is native_cls and isinstance(wrapper.cprop, ss.CProp)
    assert native.param_groups[0] is groups_a[0]  # the same dicts: the scheduler drives them
    for key, value in kw.items():
        assert native.param_groups[1][key] == value
    sched_b = torch.optim.lr_scheduler.StepLR(wrapper, step_size=1, gamma=0.5)
    for start in range(0, 20, 5):
        train(a, native, 5, start=start, dtype=F64)
        train(b, wrapper, 5, start=start, dtype=F64)
        sched.step()
        sched_b.step()
    assert native.param_groups[0]["lr"] == wrapper.param_groups[0]["lr"] == kw["lr"] / 32
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-12, rtol=0)  # same math, other rounding


def test_native_equals_the_hand_built_chain_bitwise():
    a, b = mlp(), mlp()
    opt_a = _stabilize(
        torch.optim.AdamW(a.parameters(), lr=1e-2), cprop=True, guard=ss.PageHinkley(1.0, rho=0.5)
    )
    alrc = ss.ALRC()
    opt_b = ss.CatastropheGuard(
        ss.CPropAdamW(b.parameters(), lr=1e-2), ss.PageHinkley(1.0, rho=0.5)
    )
    for step in range(15):
        spike = 100.0 if step == 9 else 0.0
        loss_a = opt_a.clip(per_sample_loss(a, step)).mean()
        opt_a.zero_grad()
        loss_a.backward()
        opt_a.step(loss=per_sample_loss(a, step).detach().mean() + spike)
        per_sample = per_sample_loss(b, step)
        loss_b = alrc(per_sample).mean()
        opt_b.zero_grad()
        loss_b.backward()
        opt_b.step(loss=per_sample.detach().mean() + spike)
    assert_equal_params(params_of(a), params_of(b))
    assert int(opt_a.guard.alarms) == int(opt_b.alarms) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, maximize=True),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
        lambda ps: type("MyAdamW", (torch.optim.AdamW,), {})(ps, lr=1e-2),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, decoupled_weight_decay=True),
        lambda ps: torch.optim.SGD(ps, lr=torch.tensor(0.1)),
    ],
    ids=["maximize", "RMSprop", "subclass", "Adam-decoupled", "tensor-lr"],
)
def test_other_optimizers_get_the_wrapper(make):
    opt = _stabilize(make(mlp().parameters()), cprop=True)
    assert isinstance(opt.cprop, ss.CProp) and not opt.native


def test_a_stepped_base_keeps_its_state_in_the_wrapper():
    model = mlp()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_plain(model, base, 2)
    opt = _stabilize(base, cprop=True)
    assert isinstance(opt.cprop, ss.CProp) and opt.base is base


def train_plain(model, opt, steps):
    for step in range(steps):
        loss = per_sample_loss(model, step).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


# -- one state_dict, bitwise resume ------------------------------------------------------------


BUILDS = {
    "adamw-native": lambda m: _stabilize(
        torch.optim.AdamW(m.parameters(), lr=2e-2), batch_size=16, dataset_size=64
    ),
    "adamw-wrapper": lambda m: _stabilize(
        torch.optim.AdamW(m.parameters(), lr=2e-2), native=False, guard={"lr_factor": 0.25}
    ),
    "sgd-native": lambda m: _stabilize(
        torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), alrc={"beta1": 0.9, "beta2": 0.9}
    ),
    "alera": lambda m: _stabilize(ss.ALeRA(ss.layer_groups(m), lr=0.05)),
    "salera-no-cprop": lambda m: _stabilize(ss.SALeRA(ss.layer_groups(m), lr=0.05), cprop=False),
}


@pytest.mark.parametrize("name", list(BUILDS))
@pytest.mark.parametrize("k", [3, 10])
def test_resume_is_bitwise_across_every_component(name, k):
    build = BUILDS[name]
    spike = 7  # a 50x batch: clipped by ALRC, an alarm for the guard, before or after k
    model_a = mlp()
    opt_a = build(model_a)
    train(model_a, opt_a, 2 * k + 4, spike_at=spike)

    model_b = mlp()
    opt_b = build(model_b)
    train(model_b, opt_b, k, spike_at=spike)
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_c = mlp(seed=5)  # other weights: everything must come from the checkpoint
    opt_c = build(model_c)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    train(model_c, opt_c, k + 4, start=k, spike_at=spike)

    assert_equal_params(params_of(model_c), params_of(model_a))
    state_a, state_c = flat_tensors(opt_a.state_dict()), flat_tensors(opt_c.state_dict())
    assert state_a.keys() == state_c.keys()
    for key, value in state_a.items():  # bitwise, NaN (the unused alarm history) included
        torch.testing.assert_close(value, state_c[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert int(opt_a.stats()["alrc/clipped_total"]) >= 1
    assert int(opt_a.stats()["guard/alarms"]) >= 1


def test_state_dict_names_every_component_and_refuses_another_build():
    model = mlp()
    opt = _stabilize(torch.optim.AdamW(model.parameters()), cprop=True)
    train(model, opt, 2)
    state = opt.state_dict()
    # the nested form of the flat dict (Note [flat checkpoints] of steadystep.compose.wrapper)
    view = opt._nested_state_dict(state)
    assert view["stabilized"]["cprop"] == "native" and view["alrc"]["mu1"].ndim == 0
    guard_view = opt.guard._nested_state_dict(view["optimizer"])
    assert {"detector", "snapshots", "alarms"} <= set(guard_view["guard"])
    assert "exp_avg" in guard_view["optimizer"]["state"][0]
    other = _stabilize(torch.optim.AdamW(mlp().parameters()), cprop=True, native=False)
    with pytest.raises(ValueError, match="components"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not saved from a Stabilized"):
        other.load_state_dict(view["optimizer"])


def test_deepcopy_and_pickle_step_like_the_original():
    model = mlp()
    opt = _stabilize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    train(model, opt, 3)
    for clone in (copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))):
        twin_model, twin_opt = clone
        train(twin_model, twin_opt, 3, start=3)
    train(model, opt, 3, start=3)
    assert_equal_params(params_of(twin_model), params_of(model))


# -- stats, schedulers, rho ------------------------------------------------------------------


def test_stats_are_prefixed_per_component():
    model = mlp()
    opt = _stabilize(ss.ALeRA(ss.layer_groups(model), lr=0.05), cprop=True)
    train(model, opt, 2)
    assert {key.split("/")[0] for key in opt.stats()} == {"clip", "alrc", "guard"}
    stats = opt.stats(per_parameter=True)
    prefixes = {key.split("/")[0] for key in stats}
    assert prefixes == {"clip", "alrc", "guard", "cprop", "base"}
    assert {"alrc/threshold", "guard/alarms", "cprop/mean_scale"} <= set(stats)
    assert any(key.startswith("guard/detector_") for key in stats)
    assert "base/skipped_steps" in stats  # ALeRA's own
    assert all(v.numel() >= 1 for v in stats.values())
    assert not any(key.startswith("guard/mean_scale") for key in stats)  # not twice


def _ops(fn):
    """The aten ops ``fn()`` runs, by name (each counted once per call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Count() as mode:
        fn()
    return mode.ops


@pytest.mark.parametrize("base", ["adamw", "alera"])
def test_default_stats_cost_the_same_for_any_number_of_parameters(base):
    # stats() runs every step under a Monitor: no reduction over the parameters (CProp's
    # scale summaries, ALeRA's per-tensor rates) unless per_parameter=True asks for them
    def build(width, depth):
        torch.manual_seed(0)
        layers = [torch.nn.Linear(6, width)]
        layers += [torch.nn.Linear(width, width) for _ in range(depth)]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 3))
        inner = (
            torch.optim.AdamW(model.parameters(), lr=1e-3)
            if base == "adamw"
            else ss.ALeRA(model.parameters(), lr=0.05, granularity="param")
        )
        opt = _stabilize(inner, cprop=True)
        train(model, opt, 2)
        return opt

    small, large = build(4, 0), build(12, 6)
    assert len(small.base.state) < len(large.base.state)
    assert _ops(small.stats) == _ops(large.stats)
    assert small.stats().keys() == large.stats().keys()
    assert _ops(lambda: small.stats(per_parameter=True)) != _ops(
        lambda: large.stats(per_parameter=True)
    )


def test_default_stats_do_not_ask_cprop_or_the_base(monkeypatch):
    model = mlp()
    opt = _stabilize(ss.ALeRA(model.parameters(), lr=0.05), cprop=True)
    train(model, opt, 2)
    calls = []
    for part in (opt.cprop, opt.base):
        monkeypatch.setattr(part, "stats", lambda part=part: calls.append(part) or {})
    opt.stats()
    assert calls == []
    opt.stats(per_parameter=True)
    assert calls == [opt.cprop, opt.base]


@pytest.mark.parametrize("native", [True, False])
def test_scheduler_drives_the_innermost_groups_and_the_cut_applies(native):
    model = mlp()
    opt = _stabilize(
        torch.optim.SGD(model.parameters(), lr=0.1),
        cprop=True,
        native=native,
        guard=ss.PageHinkley(rho=0.5),
    )
    assert opt.param_groups is opt.base.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(6):
        loss = opt.clip(per_sample_loss(model, step)).mean()
        opt.zero_grad()
        loss.backward()
        # two alarms in a row: a skip, then a rollback and a cut (Note [the ladder])
        opt.step(loss=loss.detach() + (100.0 if step in (3, 4) else 0.0))
        sched.step()
    assert int(opt.guard.alarms) == 2 and int(opt.guard.rollbacks) == 1
    group = opt.base.param_groups[0]
    # the schedule lives in lr, untouched; the cut in the guard's scale (and, native, in
    # lr_multiplier): the applied rate carries both (Note [the learning-rate scale])
    assert group["lr"] == 0.1 * 0.5**6 and float(opt.guard.lr_scale) == 0.5
    if native:
        assert float(group["lr_multiplier"]) == 0.5
    assert float(opt.stats()["guard/lr"]) == pytest.approx(0.1 * 0.5**7, rel=1e-12)


def test_rho_from_batch_and_dataset_size():
    model = mlp()
    opt = _stabilize(sgd(model), guard=ss.PageHinkley(), batch_size=32, dataset_size=1024)
    assert opt.guard.detector.rho == 32 / 1024
    default = _stabilize(sgd(mlp()), batch_size=32, dataset_size=1024).guard.detector
    if isinstance(default, ss.PageHinkley):  # whatever the default detector, it is configured
        assert default.rho == 32 / 1024
    given = ss.PageHinkley(ph_lambda=0.3)
    opt = _stabilize(sgd(mlp()), guard={"detector": given}, batch_size=8, dataset_size=100)
    assert opt.guard.detector is given and given.rho == 0.08 and given.ph_lambda == 0.3

    class Hooked:
        def __init__(self):
            self.sizes = None

        def configure(self, *, batch_size, dataset_size):
            self.sizes = (batch_size, dataset_size)

        def update(self, loss):
            return torch.zeros((), dtype=torch.bool)

        def state_dict(self):
            return {}

        def stats(self):
            return {}

    hooked = Hooked()
    _stabilize(sgd(mlp()), guard=hooked, batch_size=4, dataset_size=40)
    assert hooked.sizes == (4, 40)
    unchanged = ss.PageHinkley(rho=0.2)
    configure_detector(object(), batch_size=1, dataset_size=2)  # needs nothing: left alone
    _stabilize(sgd(mlp()), guard=unchanged)  # no sizes: the detector's own rho
    assert unchanged.rho == 0.2


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"batch_size": 32}, ValueError, "together"),
        ({"batch_size": 64, "dataset_size": 32}, ValueError, "at most dataset_size"),
        ({"batch_size": 0, "dataset_size": 32}, ValueError, "batch_size must be an int >= 1"),
        ({"batch_size": 2.5, "dataset_size": 32}, ValueError, "batch_size=2.5"),
        ({"cprop": 3}, TypeError, "cprop must be True"),
        ({"cprop": {"bta": 0.9}}, ValueError, "unknown settings"),
        ({"guard": {"lr_factr": 0.5}}, ValueError, "unknown settings"),
        ({"guard": "yes"}, TypeError, "guard must be True"),
        ({"guard": object()}, TypeError, "update"),
        ({"alrc": {"nsigma": 3}}, TypeError, "alrc got settings"),
        ({"alrc": torch.nn.Linear(1, 1)}, TypeError, "alrc must be"),
        ({"per_sample": "yes"}, TypeError, "per_sample"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        _stabilize(sgd(mlp()), **kwargs)


# -- bad input ---------------------------------------------------------------------------------


def test_a_per_sample_loss_given_as_the_guards_loss_is_refused():
    model = mlp()
    opt = _stabilize(sgd(model))
    per_sample = per_sample_loss(model, 0)
    opt.clip(per_sample).mean().backward()
    with pytest.raises(ValueError, match=r"scalar; got a loss of shape \(16,\)"):
        opt.step(loss=per_sample.detach())
    with pytest.raises(ValueError, match="scalar"):
        opt.observe_loss(per_sample.detach())
    guard = ss.CatastropheGuard(sgd(model))
    with pytest.raises(ValueError, match=r"per_sample\.mean\(\)"):
        guard.step(loss=per_sample.detach())
    with pytest.raises(ValueError, match="scalar"):
        guard.observe_loss(per_sample.detach())
    assert int(guard.steps) == 0  # refused before anything changed


def test_a_reduced_loss_is_refused_where_per_sample_is_needed():
    model = mlp()
    opt = _stabilize(sgd(model))
    with pytest.raises(ValueError, match="unreduced losses, one per sample"):
        opt.clip(per_sample_loss(model, 0).mean())
    with pytest.raises(TypeError, match="floating-point"):
        opt.clip(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="empty"):
        opt.clip(torch.zeros(0))
    # clipping the batch mean on purpose, or batch size 1 (where the loss is the sample's)
    for kwargs in ({"per_sample": False}, {"batch_size": 1, "dataset_size": 100}):
        other = _stabilize(sgd(mlp()), **kwargs)
        assert other.clip(torch.tensor(2.0)).ndim == 0


def test_components_on_another_device_are_refused():
    model = mlp()
    base = torch.optim.AdamW(model.parameters())
    keys = [set(group) for group in base.param_groups]
    with pytest.raises(ValueError, match="alrc's moments are on meta but the parameters are on"):
        _stabilize(base, alrc=ss.ALRC().to("meta"))
    # refused before the native class took the groups over (it adds cprop_* and lr_multiplier)
    assert [set(group) for group in base.param_groups] == keys
    detector = ss.PageHinkley(device="meta")
    with pytest.raises(ValueError, match="detector are on meta"):
        _stabilize(sgd(model), guard=detector)
    _stabilize(sgd(model), guard=ss.PageHinkley())  # a CPU detector moves at first use


def test_a_base_without_parameters_is_refused():
    with pytest.raises(ValueError, match="no parameters"):
        _stabilize(torch.optim.SGD([{"params": []}], lr=0.1))
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        _stabilize(mlp())


def test_prebuilt_layers_are_used_and_contradictions_refused():
    model = mlp()
    native = ss.CPropAdamW(model.parameters())
    opt = _stabilize(native)
    assert opt.cprop is native and opt.base is native
    with pytest.raises(ValueError, match="cprop must be True"):
        _stabilize(ss.CPropAdamW(model.parameters()), cprop={"c": 2.0})
    with pytest.raises(ValueError, match="cprop must be True"):
        _stabilize(ss.CProp(sgd(model)), cprop=False)
    salera = ss.SALeRA(ss.layer_groups(model), lr=0.1)
    with pytest.raises(ValueError, match="CProp goes inside the guard"):
        _stabilize(salera, cprop=True)
    assert _stabilize(salera).cprop is None  # CProp is opt-in
    with pytest.raises(ValueError, match="guard must be True"):
        _stabilize(salera, cprop=False, guard={"lr_factor": 0.1})
    with pytest.raises(ValueError, match="set rho there"):
        _stabilize(salera, cprop=False, batch_size=8, dataset_size=80)
    opt = _stabilize(ss.CatastropheGuard(ss.CProp(sgd(model))))
    assert isinstance(opt.cprop, ss.CProp) and opt.guard is opt.optimizer


def test_without_guard_closures_reach_the_base_and_no_loss_is_needed():
    model = mlp(F64)
    opt = _stabilize(
        torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), guard=False, cprop=False
    )
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = opt.clip(per_sample_loss(model, 0, F64)).mean()
        loss.backward()
        return loss

    first = float(closure())
    opt.step(closure)
    assert len(calls) > 2  # L-BFGS re-evaluated it
    assert float(per_sample_loss(model, 0, F64).mean()) < first
    assert opt.stats().keys() == {k for k in opt.stats() if k.startswith(("alrc/", "clip/"))}


# -- CUDA (run where a GPU is present) ---------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steady_state_step_does_not_sync():
    """ALRC's clip, the raw-loss window, the guard around the native CPropAdamW: warm-up steps
    create the state, then steady-state steps run under ``set_sync_debug_mode("error")``."""
    model = mlp().cuda()
    opt = _stabilize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    assert opt.alrc.mu1.is_cuda and isinstance(opt.cprop, ss.CPropAdamW)

    # every batch on the device first: a host-to-device copy is itself a sync
    batches = [tuple(t.cuda() for t in batch(step)) for step in range(8)]

    def steps(start, stop):
        for step in range(start, stop):
            x, y = batches[step]
            per_sample = F.cross_entropy(model(x), y, reduction="none")
            loss = opt.clip(per_sample).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    steps(0, 3)
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps(3, 8)
    finally:
        torch.cuda.set_sync_debug_mode(before)
    stats = opt.stats()
    assert int(stats["guard/steps"]) == 8 and stats["alrc/threshold"].is_cuda


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_alrc_on_the_cpu_is_refused():
    model = mlp().cuda()
    with pytest.raises(ValueError, match="alrc's moments are on cpu"):
        _stabilize(torch.optim.AdamW(model.parameters()), alrc=ss.ALRC())


def test_the_defaults_are_the_guard_with_alrc_and_cprop_opt_in():
    """Note [the recipe's defaults]: what costs nothing on healthy runs is on (the guard, the
    clip window's NaN mask); ALRC and CProp are asked for."""
    opt = ss.stabilize(torch.optim.AdamW(mlp().parameters()))
    assert opt.alrc is None and opt.cprop is None and isinstance(opt.guard, ss.CatastropheGuard)
    assert opt.guard.response == "ladder" and opt.guard.rollback == "full"
    full = ss.stabilize(torch.optim.AdamW(mlp().parameters()), alrc=True, cprop=True)
    assert isinstance(full.alrc, ss.ALRC) and isinstance(full.cprop, ss.CPropAdamW)
