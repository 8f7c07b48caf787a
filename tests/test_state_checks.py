"""Checkpoints of another class, model, granularity or format fail at load time.

Every steadystep ``load_state_dict`` (steadystep.checkpoint) refuses, with a ValueError
that names what was expected and what was found, and leaves the object as it was: nothing
missing is rebuilt. Checkpoints written before the class tag existed, and old torch-style ones
with a float ``step``, still load where they are unambiguous.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch

import steadystep as ss
from steadystep.checkpoint import CLASS_KEY

Make = Callable[[torch.nn.Module], Any]

MAKERS: dict[str, Make] = {
    "CPropSGD": lambda m: ss.CPropSGD(m.parameters(), lr=0.05, momentum=0.9),
    "CPropAdam": lambda m: ss.CPropAdam(m.parameters(), lr=1e-2, amsgrad=True),
    "CPropAdamW": lambda m: ss.CPropAdamW(m.parameters(), lr=1e-2, cprop_beta=0.99),
    "CProp(Adam)": lambda m: ss.CProp(torch.optim.Adam(m.parameters(), lr=1e-2)),
    "ALeRA(group)": lambda m: ss.ALeRA(ss.layer_groups(m), lr=0.05),
    "ALeRA(tensor)": lambda m: ss.ALeRA(ss.layer_groups(m), lr=0.05, granularity="tensor"),
    "ALeRA(param)": lambda m: ss.ALeRA(ss.layer_groups(m), lr=0.05, granularity="param"),
    "AgAdam": lambda m: ss.AgAdam(ss.layer_groups(m), lr=1e-2),
    "SALeRA": lambda m: ss.SALeRA(ss.layer_groups(m), lr=0.05),
    "SPALeRA": lambda m: ss.SPALeRA(ss.layer_groups(m), lr=0.05),
    "CatastropheGuard(AdamW)": lambda m: ss.CatastropheGuard(
        torch.optim.AdamW(m.parameters(), lr=1e-2)
    ),
    "CatastropheGuard(CPropAdamW)": lambda m: ss.CatastropheGuard(
        ss.CPropAdamW(m.parameters(), lr=1e-2)
    ),
}
NAMES = list(MAKERS)


def _model(shape: tuple[int, int] = (3, 4), seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    n_in, n_hidden = shape
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, n_hidden), torch.nn.Tanh(), torch.nn.Linear(n_hidden, 1)
    )


def _train(model: torch.nn.Module, opt: Any, steps: range) -> None:
    n_in = model[0].in_features
    for t in steps:
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(8, n_in, generator=gen)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if isinstance(opt, torch.optim.Optimizer) and type(opt).__module__.startswith("torch"):
            opt.step()
        else:
            opt.step(loss=loss.detach())


def _trained(name: str, shape: tuple[int, int] = (3, 4)) -> tuple[torch.nn.Module, Any]:
    model = _model(shape)
    opt = MAKERS[name](model)
    _train(model, opt, range(3))
    return model, opt


def _leaves(obj: Any) -> list[Any]:
    return torch.utils._pytree.tree_leaves(obj)


def _same(a: Any, b: Any) -> bool:
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and torch.equal(x.nan_to_num(), y.nan_to_num())):
                return False
        elif x != y:
            return False
    return True


def _refused(opt: Any, state_dict: dict[str, Any], match: str) -> None:
    """The load raises a ValueError matching ``match`` and changes nothing."""
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state_dict)
    assert _same(before, opt.state_dict())


def _untagged(state_dict: Any) -> Any:
    """The checkpoint without its class tags (an older one, or one rebuilt by a tool)."""
    if isinstance(state_dict, dict):
        return {k: _untagged(v) for k, v in state_dict.items() if k != CLASS_KEY}
    if isinstance(state_dict, list):
        return [_untagged(v) for v in state_dict]
    return state_dict


# --------------------------------------------------------------------------------------------
# Another class
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "untagged"])
def test_cpropsgd_refuses_cpropadamw_state(tagged):
    model, adamw = _trained("CPropAdamW")
    sd = adamw.state_dict() if tagged else _untagged(adamw.state_dict())
    sgd = ss.CPropSGD(model.parameters(), lr=0.05, momentum=0.9)
    match = "saved by CPropAdamW, expected one saved by CPropSGD" if tagged else "'momentum'"
    _refused(sgd, sd, match)


@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "untagged"])
def test_cpropadam_and_cpropadamw_refuse_each_other(tagged):
    model, adam = _trained("CPropAdam")
    sd = adam.state_dict() if tagged else _untagged(adam.state_dict())
    adamw = ss.CPropAdamW(model.parameters(), lr=1e-2, amsgrad=True)
    if tagged:
        _refused(adamw, sd, "saved by CPropAdam, expected one saved by CPropAdamW")
    else:  # same keys; the groups say decoupled_weight_decay=False
        _refused(adamw, sd, "decoupled_weight_decay")


def test_cpropadamw_refuses_torch_adam_state():
    model = _model()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, adam, range(2))
    _refused(ss.CPropAdamW(model.parameters()), adam.state_dict(), "lacks 'cprop_beta'")


@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "untagged"])
def test_agadam_refuses_alera_state_and_keeps_its_betas(tagged):
    model, alera = _trained("ALeRA(group)")
    sd = alera.state_dict() if tagged else _untagged(alera.state_dict())
    agadam = ss.AgAdam(ss.layer_groups(model), lr=1e-2, betas=(0.8, 0.9), alpha=0.002)
    _refused(agadam, sd, "saved by ALeRA" if tagged else "lacks 'betas', 'eps'")
    assert agadam.defaults["betas"] == (0.8, 0.9) and agadam.defaults["alpha"] == 0.002
    assert all(g["betas"] == (0.8, 0.9) for g in agadam.param_groups)


def test_alera_refuses_agadam_state():
    model, agadam = _trained("AgAdam")
    _refused(ss.ALeRA(ss.layer_groups(model), lr=0.05), agadam.state_dict(), "saved by AgAdam")


@pytest.mark.parametrize("name", ["CatastropheGuard(AdamW)", "SALeRA"])
def test_a_guard_refuses_a_plain_optimizers_state_dict(name):
    _, guard = _trained(name)
    plain = guard.optimizer.state_dict()
    if name == "SALeRA":  # ALeRA's dict names its class
        match = "saved by ALeRA, expected one saved by CatastropheGuard"
    else:
        match = r"lacks 'guard', 'optimizer'.*found 'param_groups', 'state'"
    _refused(guard, plain, match)
    _refused(guard, _untagged(plain), r"lacks 'guard', 'optimizer'.*found 'param_groups'")


def test_a_guard_refuses_the_state_of_a_guard_around_another_optimizer():
    model, adamw_guard = _trained("CatastropheGuard(AdamW)")
    sgd_guard = ss.CatastropheGuard(torch.optim.SGD(model.parameters(), lr=0.1))
    _refused(sgd_guard, adamw_guard.state_dict(), "optimizer_class='AdamW'.*'SGD'")


def test_a_guard_refuses_the_state_of_a_guard_with_another_detector():
    class OtherDetector(ss.PageHinkley):
        """Another detector class (one with the same state keys, so only its name differs)."""

    model, guard = _trained("CatastropheGuard(AdamW)")
    other = ss.CatastropheGuard(torch.optim.AdamW(model.parameters(), lr=1e-2), OtherDetector())
    _refused(other, guard.state_dict(), "detector_class='SpikeDetector'.*'OtherDetector'")


def test_cprop_refuses_the_state_of_cprop_around_another_base():
    model, cprop_adam = _trained("CProp(Adam)")
    cprop_sgd = ss.CProp(torch.optim.SGD(model.parameters(), lr=0.1))
    _refused(cprop_sgd, cprop_adam.state_dict(), "base_class='Adam'.*'SGD'")


def test_the_detector_refuses_a_dict_of_another_kind():
    ph = ss.PageHinkley()
    ph.update(torch.tensor(1.0))
    _refused(ph, {"ph_lambda": 0.1, "rho": 0.01}, r"missing \['alarms'")
    _refused(ph, {**ph.state_dict(), CLASS_KEY: "Cusum"}, r"unexpected \['class'\]")
    _refused(ph, {**ph.state_dict(), "detector": "Cusum"}, "found one of 'Cusum'")
    bad = ph.state_dict()
    bad["cusum"] = torch.zeros(3)
    _refused(ph, bad, r"'cusum' must be a tensor of shape \(\) .*found \(3,\)")


# --------------------------------------------------------------------------------------------
# Another model, another setting, a missing key
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_state_of_differently_shaped_params_is_refused_at_load(name):
    _, opt = _trained(name, shape=(3, 4))
    other = MAKERS[name](_model(shape=(4, 3)))  # the same number of tensors, other shapes
    _refused(other, opt.state_dict(), r"shape \(4, 3\).*shape \(3, 4\)")


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("CPropSGD", "momentum_buffer"),
        ("CPropSGD", "cprop_exp_avg"),
        ("CPropAdam", "max_exp_avg_sq"),
        ("CPropAdam", "exp_avg_sq"),
        ("CPropAdamW", "cprop_exp_avg_sq"),  # its own v (cprop_beta != betas[1])
        ("ALeRA(group)", "relaxed_path"),
        ("ALeRA(tensor)", "step"),
        ("ALeRA(param)", "lr_multiplier"),
        ("AgAdam", "exp_avg"),
        ("AgAdam", "step"),
    ],
)
def test_a_missing_per_parameter_state_key_is_an_error_not_rebuilt(name, key):
    model, opt = _trained(name)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0][key]
    _refused(MAKERS[name](model), sd, f"lacks '{key}'")


def test_cprop_wrapper_refuses_a_missing_cprop_state_key():
    model, opt = _trained("CProp(Adam)")
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][1]["cprop/cprop_exp_avg_sq"]  # Note [flat checkpoints]
    _refused(MAKERS["CProp(Adam)"](model), sd, r"cprop_state\[1\].*lacks 'cprop_exp_avg_sq'")


def test_alera_adopts_the_checkpoints_optimizer_wide_hyperparameters():
    """As torch's optimizers restore the groups' hyperparameters, ALeRA restores its
    optimizer-wide ones (alpha, C, norm_eps), which its step reads from ``defaults``."""
    model, opt = _trained("ALeRA(group)")
    fresh = ss.ALeRA(ss.layer_groups(model), lr=0.05, alpha=0.2, C=1.0)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.defaults["alpha"] == opt.defaults["alpha"] and fresh.defaults["C"] == 3e-6


# --------------------------------------------------------------------------------------------
# What still loads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_untagged_checkpoints_still_load_and_resume_bitwise(name):
    """A checkpoint without class tags (written before they existed, or rebuilt by a tool that
    keeps only ``state`` and ``param_groups``) loads, through torch.save / weights_only load."""
    model, opt = _trained(name)
    buffer = io.BytesIO()
    torch.save(_untagged(opt.state_dict()), buffer)
    buffer.seek(0)
    twin = _model()
    twin.load_state_dict(model.state_dict())
    resumed = MAKERS[name](twin)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    _train(model, opt, range(3, 6))
    _train(twin, resumed, range(3, 6))
    params = zip(model.parameters(), twin.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in params)
    assert _same(opt.state_dict(), resumed.state_dict())


@pytest.mark.parametrize("name", ["CPropAdamW", "AgAdam", "ALeRA(tensor)"])
def test_a_float_step_loads_and_steps_as_a_tensor_step(name):
    """Old torch-style checkpoints keep ``step`` as a Python float: it loads as the 0-d float32
    tensor the step updates, and the run continues exactly as from the tensor checkpoint."""
    model, opt = _trained(name)
    sd = copy.deepcopy(opt.state_dict())
    floats = copy.deepcopy(sd)
    for state in floats["state"].values():
        state["step"] = float(state["step"])
    runs = []
    for saved in (sd, floats):
        twin = _model()
        twin.load_state_dict(model.state_dict())
        resumed = MAKERS[name](twin)
        resumed.load_state_dict(saved)
        assert all(isinstance(s["step"], torch.Tensor) for s in resumed.state.values())
        _train(twin, resumed, range(3, 6))
        runs.append((list(twin.parameters()), resumed.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0], strict=True))
    assert _same(runs[0][1], runs[1][1])


def test_a_guard_around_torch_adam_loads_a_float_step_as_torch_does():
    """The wrapped optimizer's part goes to its own loader: torch's Adam turns a float step
    into a tensor, and the guarded run continues as from the tensor checkpoint."""
    model = _model()
    guard = ss.CatastropheGuard(torch.optim.Adam(model.parameters(), lr=1e-2))
    _train(model, guard, range(3))
    sd = copy.deepcopy(guard.state_dict())
    floats = copy.deepcopy(sd)
    for state in floats["state"].values():  # flat: Adam's state at the top
        state["step"] = float(state["step"])
    runs = []
    for saved in (sd, floats):
        twin = _model()
        twin.load_state_dict(model.state_dict())
        resumed = ss.CatastropheGuard(torch.optim.Adam(twin.parameters(), lr=1e-2))
        resumed.load_state_dict(saved)
        _train(twin, resumed, range(3, 6))
        runs.append(list(twin.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
