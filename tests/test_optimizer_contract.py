"""torch's generic optimizer contract, checked on every steadystep optimizer.

PyTorch tests each of its optimizers against one list of properties (``OptimizerInfo`` in
``torch/testing/_internal/common_optimizers.py``, the tests of ``test/test_optim.py``):
tensor learning rates, param-group edits, deterministic and loadable state dicts, deepcopy,
hooks, missing gradients, dtypes, older checkpoints, named parameters. The same properties
are written here for each class (RELIABILITY.md items 11, 13, 14, 23, 34), on the CPU, with
``torch.equal`` where the arithmetic is the same.

Each case builds the optimizer from ``(params, lr, **kwargs)``; native classes run once per
path (fused, foreach, per-tensor), since a property that holds on one path can fail on
another (a tensor ``lr`` did on the fused one).
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.nn import Parameter
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import steadystep as ss
from steadystep._kernels import FusedUnsupportedError
from steadystep.optim.cprop import functional as cprop_functional

# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One optimizer configuration: ``make(params, lr, **kwargs)`` builds it."""

    name: str
    make: Callable[..., torch.optim.Optimizer]
    weight_decay: bool = True  # the groups have a "weight_decay" that the step reads
    # a tensor lr gives bitwise the float's trajectory; False where torch.optim.AdamW steps
    # (its step divides a tensor lr by the bias correction as a tensor: equal to rounding)
    exact: bool = True
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.bfloat16)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, params: Any, lr: Any = 1e-2, **kwargs: Any) -> torch.optim.Optimizer:
        return self.make(params, lr, **{**self.kwargs, **kwargs})


def _native(cls: type, **path: Any) -> Callable[..., torch.optim.Optimizer]:
    return lambda params, lr, **kw: cls(params, lr=lr, **path, **kw)


_PATHS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "single": {"fused": False}}


def _native_cases() -> list[Case]:
    out = []
    for path, flags in _PATHS.items():
        out += [
            Case(f"CPropSGD-{path}", _native(ss.CPropSGD, **flags), kwargs={"momentum": 0.9}),
            Case(f"CPropAdam-{path}", _native(ss.CPropAdam, **flags), kwargs={"amsgrad": True}),
            Case(f"CPropAdamW-{path}", _native(ss.CPropAdamW, **flags)),
        ]
    return out


def _cprop_wrapper(params: Any, lr: Any, **kw: Any) -> torch.optim.Optimizer:
    return ss.CProp(torch.optim.AdamW(params, lr=lr, **kw))


def _guard(params: Any, lr: Any, **kw: Any) -> torch.optim.Optimizer:
    return ss.CatastropheGuard(torch.optim.AdamW(params, lr=lr, **kw))


def _stabilized(params: Any, lr: Any, **kw: Any) -> torch.optim.Optimizer:
    return ss.stabilize(torch.optim.AdamW(params, lr=lr, **kw))


def _salera(params: Any, lr: Any, **kw: Any) -> torch.optim.Optimizer:
    return ss.SALeRA(params, lr=lr, **kw)


CASES = [
    *_native_cases(),
    Case("CProp(AdamW)", _cprop_wrapper, exact=False),
    Case("ALeRA-fused", _native(ss.ALeRA, fused=True)),
    Case("ALeRA-single", _native(ss.ALeRA, fused=False)),
    Case("AgAdam-fused", _native(ss.AgAdam, fused=True), weight_decay=False),
    Case("AgAdam-single", _native(ss.AgAdam, fused=False), weight_decay=False),
    Case("CatastropheGuard(AdamW)", _guard, exact=False),
    Case("SALeRA", _salera),
    Case("stabilize(AdamW)", _stabilized, exact=False),
]

cases = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[Parameter]:
    """torch's test problem: ``weight`` (10, 5) and ``bias`` (10)."""
    g = torch.Generator().manual_seed(seed)
    return [
        Parameter(torch.randn(10, 5, generator=g, dtype=torch.float64).to(dtype)),
        Parameter(torch.randn(10, generator=g, dtype=torch.float64).to(dtype)),
    ]


def clones(params: list[Parameter]) -> list[Parameter]:
    return [Parameter(p.detach().clone()) for p in params]


def closure(opt: torch.optim.Optimizer, params: list[Parameter], i: int) -> torch.Tensor:
    """Gradients of ``|weight @ x_i + bias|^2`` for the i-th input (the same for every run)."""
    weight, bias = params[0], params[1]
    x = torch.randn(5, generator=torch.Generator().manual_seed(1000 + i), dtype=torch.float64)
    opt.zero_grad()
    loss = (weight.mv(x.to(weight.dtype)) + bias).pow(2).sum()
    loss.backward()
    return loss.detach()


def run(opt: torch.optim.Optimizer, params: list[Parameter], steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        opt.step(functools.partial(closure, opt, params, i))


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` equal, tensors bitwise (dtype and shape included), recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype} vs {b.dtype}"
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:  # NaN: the guard's empty loss history
        assert isinstance(b, float) and b != b, f"{where}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_params(a: list[torch.Tensor], b: list[torch.Tensor], exact: bool = True) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if not exact:  # torch's float32 tolerance (test_optim's assertEqual)
            torch.testing.assert_close(x, y, rtol=1.3e-6, atol=1e-5)
            continue
        assert torch.equal(x, y), f"param {i}: max diff {(x.double() - y.double()).abs().max()}"


# --------------------------------------------------------------------------------------------
# tensor lr (torch's test_tensor_lr)
# --------------------------------------------------------------------------------------------


@cases
@pytest.mark.parametrize("num_dim", [0, 1, 2])
def test_tensor_lr_gives_the_float_lr_trajectory(case: Case, num_dim: int) -> None:
    # the float is the tensor's value, so the arithmetic is the same: bitwise
    lr = torch.tensor(1e-2).reshape([1] * num_dim)
    params, params_t = make_params(), make_params()
    opt = case(params, lr=float(lr))
    opt_t = case(params_t, lr=lr)
    for i in range(5):
        opt.step(functools.partial(closure, opt, params, i))
        opt_t.step(functools.partial(closure, opt_t, params_t, i))
        assert_params(params, params_t, case.exact)


@cases
def test_tensor_lr_updated_in_place_takes_effect(case: Case) -> None:
    # schedulers update a tensor lr in place (param_group["lr"].fill_(x))
    params, params_t = make_params(), make_params()
    lr = torch.tensor(1e-2)
    opt, opt_t = case(params, lr=float(lr)), case(params_t, lr=lr.clone())
    run(opt, params, 2)
    run(opt_t, params_t, 2)
    for group, group_t in zip(opt.param_groups, opt_t.param_groups, strict=True):
        group["lr"] = float(torch.tensor(3e-2))
        group_t["lr"].fill_(3e-2)
    run(opt, params, 3, start=2)
    run(opt_t, params_t, 3, start=2)
    assert_params(params, params_t, case.exact)


@pytest.mark.parametrize("cls", [ss.CPropSGD, ss.CPropAdam, ss.CPropAdamW])
def test_fused_true_takes_a_tensor_lr(cls: type) -> None:
    # before: FusedUnsupportedError blaming the tensors (the kernels refused any tensor lr)
    params = make_params()
    opt = cls(params, lr=torch.tensor(1e-2), fused=True)
    try:
        run(opt, params, 2)
    except FusedUnsupportedError as error:  # pragma: no cover - the failure being tested
        pytest.fail(f"fused=True refused a tensor lr: {error}")


@pytest.mark.parametrize("cls", [ss.CPropAdam, ss.CPropAdamW])
def test_tensor_betas_and_weight_decay_match_floats(cls: type) -> None:
    params, params_t = make_params(), make_params()
    betas = (torch.tensor(0.9), torch.tensor(0.99))
    wd = torch.tensor(0.1)
    lr = torch.tensor(1e-2)
    floats = {"lr": float(lr), "betas": tuple(float(b) for b in betas), "weight_decay": float(wd)}
    opt = cls(params, **floats)
    opt_t = cls(params_t, lr=lr, betas=betas, weight_decay=wd)
    run(opt, params, 4)
    run(opt_t, params_t, 4)
    assert_params(params, params_t)


def test_tensor_lr_on_an_accelerator_is_folded_into_the_multiplier_without_a_host_read() -> None:
    # Note [tensor hyperparameters]: a device lr is never read on the host. Meta tensors
    # cannot be read at all, so this checks the decision on the CPU: lr goes into the
    # multiplier (lr_multiplier * lr on the device), the host lr is 1.
    params = [torch.empty(3, device="meta")]
    lr = torch.tensor(0.01, device="meta")
    host_lr, multiplier = cprop_functional._split_lr(lr, None, params)
    assert host_lr == 1.0 and multiplier.device.type == "meta" and multiplier.shape == ()
    m = torch.tensor(0.5, dtype=torch.float64, device="meta")
    host_lr, multiplier = cprop_functional._split_lr(lr.reshape(1, 1), m, params)
    assert host_lr == 1.0 and multiplier.dtype == torch.float64 and multiplier.shape == ()
    # a CPU tensor is read on the host (no device sync): exactly its value
    cpu_lr = torch.tensor(0.01)
    assert cprop_functional._split_lr(cpu_lr, None, make_params()) == (float(cpu_lr), None)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        cprop_functional._split_lr(torch.tensor([0.1, 0.1]), None, make_params())


# --------------------------------------------------------------------------------------------
# param_groups edits (torch's test_param_groups_lr / _weight_decay)
# --------------------------------------------------------------------------------------------


@cases
def test_lr_edit_in_param_groups_takes_effect(case: Case) -> None:
    # built at lr=a, edited to b before the first step == built at b
    params, params_e = make_params(), make_params()
    opt = case(params, lr=3e-2)
    opt_e = case(params_e, lr=1e-2)
    for group in opt_e.param_groups:
        group["lr"] = 3e-2
    run(opt, params, 3)
    run(opt_e, params_e, 3)
    assert_params(params, params_e)
    # and lr = 0 in one group mid-run: that group stands still, the other moves
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in params]
    run(opt, params, 2, start=3)
    assert_params(params, before)


@cases
def test_weight_decay_edit_in_param_groups_takes_effect(case: Case) -> None:
    if not case.weight_decay:
        pytest.skip(f"{case.name} has no weight_decay")
    params, params_e, params_0 = make_params(), make_params(), make_params()
    opt = case(params, weight_decay=0.5)
    opt_e = case(params_e, weight_decay=0.0)
    opt_0 = case(params_0, weight_decay=0.0)
    for group in opt_e.param_groups:
        group["weight_decay"] = 0.5
    run(opt, params, 3)
    run(opt_e, params_e, 3)
    run(opt_0, params_0, 3)
    assert_params(params, params_e)
    assert not torch.equal(params[0], params_0[0]), "weight_decay had no effect"


@cases
def test_param_groups_with_their_own_lr(case: Case) -> None:
    # two groups, one frozen by lr=0 (set after construction: ALeRA requires lr > 0 there)
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = case([{"params": [params[0]]}, {"params": [params[1]]}], lr=1e-2)
    opt.param_groups[1]["lr"] = 0.0
    run(opt, params, 3)
    assert not torch.equal(params[0], before[0])
    assert torch.equal(params[1], before[1])


@cases
def test_add_param_group_equals_building_with_the_group(case: Case) -> None:
    params, params_a = make_params(), make_params()
    opt = case([{"params": [params[0]]}, {"params": [params[1]], "lr": 2e-2}], lr=1e-2)
    opt_a = case([params_a[0]], lr=1e-2)
    opt_a.add_param_group({"params": [params_a[1]], "lr": 2e-2})
    assert len(opt_a.param_groups) == 2
    run(opt, params, 3)
    run(opt_a, params_a, 3)
    assert_params(params, params_a)


# --------------------------------------------------------------------------------------------
# state_dict (torch's test_state_dict_deterministic, test_save_load_equality_with_weights_only,
# test_can_load_older_state_dict, test_load_nontensor_step)
# --------------------------------------------------------------------------------------------


@cases
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_state_dict_is_deterministic_and_loads_to_continue_identically(
    case: Case, tensor_lr: bool
) -> None:
    lr = (lambda: torch.tensor(1e-2)) if tensor_lr else (lambda: 1e-2)
    params = make_params()
    opt = case(params, lr=lr())
    run(opt, params, 4)
    # a second, identical run gives an equal state_dict
    params_2 = make_params()
    opt_2 = case(params_2, lr=lr())
    run(opt_2, params_2, 4)
    assert_same(opt.state_dict(), opt_2.state_dict(), "state_dict")
    # a fresh optimizer loading a copy of it continues identically
    params_c = clones(params)
    opt_c = case(params_c, lr=lr())
    saved = copy.deepcopy(opt.state_dict())
    opt_c.load_state_dict(copy.deepcopy(saved))
    for i in range(4, 8):
        opt.step(functools.partial(closure, opt, params, i))
        opt_c.step(functools.partial(closure, opt_c, params_c, i))
        assert_params(params, params_c)
    assert_same(opt.state_dict(), opt_c.state_dict(), "state_dict after loading")


@cases
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_state_dict_round_trips_through_weights_only_load(case: Case, tensor_lr: bool) -> None:
    lr = (lambda: torch.tensor(1e-2)) if tensor_lr else (lambda: 1e-2)
    params = make_params()
    opt = case(params, lr=lr())
    run(opt, params, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert_same(opt.state_dict(), loaded, "weights_only load")
    params_c = clones(params)
    opt_c = case(params_c, lr=lr())
    opt_c.load_state_dict(loaded)
    run(opt, params, 3, start=3)
    run(opt_c, params_c, 3, start=3)
    assert_params(params, params_c)


@cases
def test_load_state_dict_of_a_deepcopied_optimizer_continues_identically(case: Case) -> None:
    params = make_params()
    opt = case(params, lr=torch.tensor(1e-2))
    run(opt, params, 3)
    twin = copy.deepcopy(opt)
    params_c = clones(params)
    opt_c = case(params_c, lr=torch.tensor(1e-2))
    opt_c.load_state_dict(twin.state_dict())
    run(opt, params, 3, start=3)
    run(opt_c, params_c, 3, start=3)
    assert_params(params, params_c)


def _older(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` as a torch-style checkpoint from before the later flags: the groups
    without ``foreach``/``fused``/``differentiable``/``maximize``/``capturable``, and float
    ``step`` counts (torch < 1.12), at every nesting level a wrapper adds."""
    out = copy.deepcopy(state_dict)

    def strip(sd: Any) -> None:
        if not isinstance(sd, dict):
            return
        for group in sd.get("param_groups", []) if isinstance(sd.get("param_groups"), list) else []:
            for flag in ("foreach", "fused", "differentiable", "maximize", "capturable"):
                group.pop(flag, None)
        state = sd.get("state")
        if isinstance(state, dict):
            for st in state.values():
                if isinstance(st, dict) and isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].item()
        for value in sd.values():
            if isinstance(value, dict):
                strip(value)

    strip(out)
    return out


@cases
def test_older_state_dict_without_flags_and_with_float_steps_loads(case: Case) -> None:
    params = make_params()
    opt = case(params, lr=1e-2)
    run(opt, params, 3)
    params_c = clones(params)
    opt_c = case(params_c, lr=1e-2)
    opt_c.load_state_dict(_older(opt.state_dict()))
    run(opt, params, 3, start=3)
    run(opt_c, params_c, 3, start=3)
    assert_params(params, params_c)


@pytest.mark.parametrize("cls", [ss.CPropSGD, ss.CPropAdam, ss.CPropAdamW, ss.ALeRA])
def test_native_state_dict_without_lr_multiplier_loads_with_one(cls: type) -> None:
    # documented: a checkpoint from before lr_multiplier loads with 1
    if cls is ss.ALeRA:
        pytest.skip("ALeRA's lr_multiplier is its algorithm's state, required in a checkpoint")
    params = make_params()
    opt = cls(params, lr=1e-2)
    run(opt, params, 3)
    old = opt.state_dict()
    for group in old["param_groups"]:
        del group["lr_multiplier"]
    params_c = clones(params)
    opt_c = cls(params_c, lr=1e-2)
    opt_c.load_state_dict(old)
    run(opt, params, 2, start=3)
    run(opt_c, params_c, 2, start=3)
    assert_params(params, params_c)


# --------------------------------------------------------------------------------------------
# deepcopy (torch's test_deepcopy_copies_all_public_attrs; RELIABILITY 23)
# --------------------------------------------------------------------------------------------


@cases
def test_deepcopy_steps_independently_and_identically(case: Case) -> None:
    params = make_params()
    opt = case(params, lr=torch.tensor(1e-2))
    run(opt, params, 3)
    params_c, opt_c = copy.deepcopy((params, opt))
    assert {k for k in vars(opt) if not k.startswith("_")} == {
        k for k in vars(opt_c) if not k.startswith("_")
    }
    run(opt, params, 3, start=3)
    run(opt_c, params_c, 3, start=3)
    assert_params(params, params_c)
    # stepping the copy leaves the original alone
    frozen = [p.detach().clone() for p in params]
    run(opt_c, params_c, 2, start=6)
    assert_params(params, frozen)


# --------------------------------------------------------------------------------------------
# zero_grad, missing gradients, hooks, printing
# --------------------------------------------------------------------------------------------


@cases
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(case: Case, set_to_none: bool) -> None:
    params = make_params()
    opt = case(params)
    closure(opt, params, 0)
    opt.zero_grad(set_to_none=set_to_none)
    for p in params:
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is not None and not p.grad.any()


@cases
def test_params_without_grad_are_skipped_and_get_no_state(case: Case) -> None:
    params, params_r = make_params(), make_params()
    frozen = Parameter(torch.randn(7))
    frozen_before = frozen.detach().clone()
    opt = case([*params, frozen])
    opt_r = case(params_r)
    run(opt, params, 3)
    run(opt_r, params_r, 3)
    assert frozen.grad is None and torch.equal(frozen, frozen_before)
    assert_params(params, params_r)
    inner = getattr(opt, "state", {})
    assert not inner.get(frozen), f"state for a parameter without grad: {inner.get(frozen)}"


@cases
def test_a_step_with_no_grads_at_all_is_a_no_op(case: Case) -> None:
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = case(params)
    opt.step(lambda: torch.tensor(1.0))
    assert_params(params, before)


@cases
def test_step_hooks_fire_once_per_step(case: Case) -> None:
    params = make_params()
    opt = case(params)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    run(opt, params, 2)
    assert calls == ["pre", "post", "pre", "post"]


@cases
def test_global_step_hooks_see_this_optimizer_once_per_step(case: Case) -> None:
    params = make_params()
    opt = case(params)
    seen: list[tuple[str, int]] = []
    pre = register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", id(o))))
    post = register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append(("post", id(o))))
    try:
        run(opt, params, 2)
    finally:
        pre.remove()
        post.remove()
    mine = [kind for kind, who in seen if who == id(opt)]
    assert mine == ["pre", "post", "pre", "post"]


@cases
def test_state_dict_hooks_fire(case: Case) -> None:
    params = make_params()
    opt = case(params)
    run(opt, params, 1)
    calls: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post") or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre") or sd)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["sd-pre", "sd-post", "load-pre", "load-post"]


@cases
def test_optimizer_can_be_printed(case: Case) -> None:
    assert repr(case(make_params()))


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@cases
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_float64_and_bfloat16_params(case: Case, dtype: torch.dtype) -> None:
    if dtype not in case.dtypes:
        pytest.skip(f"{case.name} does not take {dtype}")
    params, params_t = make_params(dtype), make_params(dtype)
    opt = case(params, lr=float(torch.tensor(1e-2)))
    opt_t = case(params_t, lr=torch.tensor(1e-2))
    first = closure(opt, params, 0)
    run(opt, params, 10)
    run(opt_t, params_t, 10)
    assert_params(params, params_t, case.exact)
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in params)
    assert closure(opt, params, 0) < first
    # statistics are float64 for float64 params and float32 (never bf16) for bf16 params
    state = opt.state_dict()["state"]
    want = torch.float64 if dtype == torch.float64 else torch.float32

    def floats(tree: Any) -> list[torch.Tensor]:
        if isinstance(tree, torch.Tensor):
            return [tree] if tree.is_floating_point() and tree.dim() > 0 else []
        if isinstance(tree, dict):
            return [t for v in tree.values() for t in floats(v)]
        return []

    stats = floats(state)
    assert stats, "no per-parameter state"
    assert {t.dtype for t in stats} <= {want, dtype}
    if dtype == torch.bfloat16:
        assert torch.float32 in {t.dtype for t in stats} or case.name.startswith(
            ("CProp(AdamW)", "CatastropheGuard", "stabilize")
        )


# --------------------------------------------------------------------------------------------
# named parameters (torch >= 2.6: param_names in the state_dict's groups)
# --------------------------------------------------------------------------------------------


def _param_names(state_dict: dict[str, Any]) -> list[list[str]]:
    found: list[list[str]] = []

    def walk(sd: Any) -> None:
        if isinstance(sd, dict):
            groups = sd.get("param_groups")
            if isinstance(groups, list):
                found.extend(g.get("param_names", []) for g in groups)
            for v in sd.values():
                walk(v)

    walk(state_dict)
    return found


@cases
def test_named_parameters(case: Case) -> None:
    if not hasattr(torch.optim.Optimizer, "_patch_step_function") or "param_names" not in (
        torch.optim.Optimizer.load_state_dict.__doc__ or ""
    ):
        pytest.skip("this torch has no named optimizer state dicts")
    model = torch.nn.Linear(5, 10, dtype=torch.float64)
    x = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def step(opt: torch.optim.Optimizer, m: torch.nn.Module) -> None:
        def loss() -> torch.Tensor:
            opt.zero_grad()
            out = m(x).pow(2).sum()
            out.backward()
            return out.detach()

        opt.step(loss)

    opt = case(model.named_parameters())
    step(opt, model)
    model_c = copy.deepcopy(model)
    names = _param_names(opt.state_dict())
    assert ["weight", "bias"] in names, names
    opt_c = case(model_c.named_parameters())
    # a copy, as torch's tests load: torch.optim's load_state_dict keeps the given tensors
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    step(opt, model)
    step(opt_c, model_c)
    assert_params(list(model.parameters()), list(model_c.parameters()))
