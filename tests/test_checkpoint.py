"""A load validates the whole checkpoint (class, format, shapes, dtypes, finite values) before it
changes anything (RELIABILITY.md 35; issue 20, item 3).

steadystep.checkpoint's shared checks (``check_format``, ``check_dtype``, ``check_finite``)
are used by every ``load_state_dict``: a statistic in another dtype than the one the optimizer
creates, a NaN/inf statistic, a negative second moment, variance or count, an unknown format
and an untagged checkpoint of a sibling class are refused with a ValueError naming the key, what
was expected and what was found, and the object is left as it was. A composite
(:class:`~steadystep.Stabilized`, the guard) checks every component before loading any.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

import steadystep as ss
from tests.test_state_checks import MAKERS, NAMES, _model, _refused, _same, _train, _trained

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _stabilize(*args, **kwargs):
    """ss.stabilize with ALRC on (opt-in since the clean-run benchmark): these tests exercise
    ALRC inside the composition; a test of the defaults calls ss.stabilize itself."""
    return ss.stabilize(*args, **{"alrc": True, **kwargs})


def _nested(opt: Any, sd: Any = None) -> Any:
    """A copy of ``opt``'s checkpoint with every wrapper's part nested (Note [flat
    checkpoints] of steadystep.compose.wrapper): the layout these tests edit; it loads as the
    flat one does."""
    sd = copy.deepcopy(opt.state_dict()) if sd is None else sd
    if hasattr(opt, "_is_flat") and opt._is_flat(sd):
        sd = opt._nested_state_dict(sd)
    inner = getattr(opt, "optimizer", None)
    if isinstance(sd, dict) and "optimizer" in sd and inner is not None:
        sd["optimizer"] = _nested(inner, sd["optimizer"])
    return sd


def _per_param_state(sd: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    """The per-parameter state of an optimizer's state_dict (the wrapper's own and its
    base's for CProp; the wrapped optimizer's for a guard)."""
    if "guard" in sd:
        sd = sd["optimizer"]
    return sd.get("cprop_state") or sd["state"]


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """Every floating tensor of a (nested) state_dict cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cast_floats(v, dtype) for v in obj]
    return obj


def _stabilized(model: torch.nn.Module) -> ss.Stabilized:
    return _stabilize(torch.optim.AdamW(model.parameters(), lr=1e-2))


def _train_stabilized(model: torch.nn.Module, opt: ss.Stabilized, steps: range) -> None:
    for t in steps:
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(t))
        per_sample = (model(x) - x.sum(1, keepdim=True)).pow(2).squeeze(1)
        loss = opt.clip(per_sample).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_bf16_cast_checkpoint_is_refused_naming_the_key_and_both_dtypes(name):
    """A checkpoint whose statistics were cast to bf16 would give NaN parameters at the first
    step (or mixed dtypes that crash it): refused, nothing loaded."""
    model, opt = _trained(name)
    sd = _cast_floats(_nested(opt), torch.bfloat16)
    _refused(MAKERS[name](model), sd, r"dtype.*float32.*bfloat16|bfloat16.*float32")


def test_fp32_statistics_of_bf16_params_load_and_bf16_statistics_are_refused():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    opt = ss.CPropAdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3, dtype=torch.bfloat16)).pow(2).mean().backward()
    opt.step()
    sd = _nested(opt)
    fresh = ss.CPropAdamW(model.parameters(), lr=1e-2)
    fresh.load_state_dict(sd)  # fp32 statistics, as the optimizer creates them
    assert fresh.state[model.weight]["exp_avg"].dtype == torch.float32
    _refused(
        ss.CPropAdamW(model.parameters()),
        _cast_floats(sd, torch.bfloat16),
        r"\['\w+'\] has dtype torch.bfloat16, expected torch.float32",
    )


# --------------------------------------------------------------------------------------------
# Non-finite and negative statistics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key", "value", "match"),
    [
        ("CPropAdamW", "exp_avg", math.inf, r"'exp_avg'.*non-finite"),
        ("CPropAdamW", "exp_avg_sq", math.nan, r"'exp_avg_sq'.*non-finite"),
        ("CPropAdamW", "exp_avg_sq", -1.0, r"'exp_avg_sq'.*negative"),
        ("CPropAdamW", "cprop_exp_avg_sq", -1.0, r"'cprop_exp_avg_sq'.*negative"),
        ("CPropAdam", "max_exp_avg_sq", -1.0, r"'max_exp_avg_sq'.*negative"),
        ("CPropSGD", "momentum_buffer", math.nan, r"'momentum_buffer'.*non-finite"),
        ("CPropSGD", "step", -3.0, r"'step'.*negative"),
        ("CProp(Adam)", "cprop_exp_avg", math.inf, r"'cprop_exp_avg'.*non-finite"),
        ("ALeRA(group)", "relaxed_path", math.nan, r"'relaxed_path'.*non-finite"),
        ("ALeRA(param)", "lr_multiplier", -1.0, r"'lr_multiplier'.*negative"),
        ("ALeRA(tensor)", "step", math.nan, r"'step'.*non-finite"),
        ("AgAdam", "exp_avg_sq", -1.0, r"'exp_avg_sq'.*negative"),
        ("AgAdam", "exp_avg", math.inf, r"'exp_avg'.*non-finite"),
    ],
)
def test_a_nonfinite_or_negative_statistic_is_refused_naming_the_key(name, key, value, match):
    model, opt = _trained(name)
    sd = _nested(opt)
    entry = _per_param_state(sd)[0]
    entry[key] = torch.full_like(entry[key], value)
    _refused(MAKERS[name](model), sd, match)


def test_a_guard_refuses_a_nonfinite_moment_of_its_wrapped_optimizer():
    model, guard = _trained("CatastropheGuard(CPropAdamW)")
    sd = _nested(guard)
    sd["optimizer"]["state"][0]["exp_avg"][0] = math.inf
    _refused(MAKERS["CatastropheGuard(CPropAdamW)"](model), sd, r"'exp_avg'.*non-finite")


@pytest.mark.parametrize(
    ("counter", "value", "match"),
    [
        ("skips", -1, r"'skips'.*negative"),
        ("lr_scale", math.nan, r"'lr_scale'.*non-finite"),
        ("lr_scale", -0.5, r"'lr_scale'.*negative"),
    ],
)
def test_a_guard_refuses_a_negative_or_nonfinite_counter(counter, value, match):
    model, guard = _trained("CatastropheGuard(AdamW)")
    sd = _nested(guard)
    sd["guard"][counter] = torch.full_like(sd["guard"][counter], value)
    _refused(MAKERS["CatastropheGuard(AdamW)"](model), sd, match)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("mu1", math.nan, r"'mu1'.*non-finite"),
        ("mu2", math.inf, r"'mu2'.*non-finite"),
        ("mu2", -1.0, r"'mu2'.*negative"),
        ("num_updates", -1, r"'num_updates'.*negative"),
        ("clipped_total", -5, r"'clipped_total'.*negative"),
    ],
)
def test_alrc_refuses_a_nonfinite_or_negative_moment_or_count(key, value, match):
    """A NaN mean would turn clipping off for good (every comparison with it is False)."""
    alrc = ss.ALRC()
    for t in range(5):
        alrc(torch.rand(8, generator=torch.Generator().manual_seed(t)) + 1.0)
    sd = _nested(alrc)
    sd[key] = torch.full_like(sd[key], value)
    _refused(ss.ALRC(), sd, match)


def test_alrc_refuses_a_moment_of_another_dtype():
    alrc = ss.ALRC()
    alrc(torch.rand(8) + 1.0)
    sd = _nested(alrc)
    sd["mu1"] = sd["mu1"].to(torch.bfloat16)
    _refused(ss.ALRC(), sd, r"'mu1'.*dtype torch.bfloat16.*expected torch.float32")


# --------------------------------------------------------------------------------------------
# Format, class told apart by keys, float group step
# --------------------------------------------------------------------------------------------


def test_stabilized_refuses_an_unknown_format():
    model = _model()
    opt = _stabilized(model)
    _train_stabilized(model, opt, range(3))
    sd = _nested(opt)
    sd["stabilized"]["format"] = 99
    _refused(_stabilized(model), sd, r"format.*99.*1")


def test_alera_refuses_an_untagged_agadam_checkpoint_by_its_keys():
    model, agadam = _trained("AgAdam")
    sd = _nested(agadam)
    del sd["class"]
    _refused(ss.ALeRA(ss.layer_groups(model), lr=0.05), sd, "AgAdam")


@pytest.mark.parametrize("name", ["ALeRA(group)", "AgAdam", "ALeRA(tensor)"])
def test_a_float_group_step_loads_exactly_as_the_tensor_one(name):
    model, opt = _trained(name)
    sd = _nested(opt)
    floats = copy.deepcopy(sd)
    for group in floats["param_groups"]:
        group["step"] = float(group["step"])
    runs = []
    for saved in (sd, floats):
        twin = _model()
        twin.load_state_dict(model.state_dict())
        resumed = MAKERS[name](twin)
        resumed.load_state_dict(saved)
        assert all(isinstance(g["step"], torch.Tensor) for g in resumed.param_groups)
        _train(twin, resumed, range(3, 6))
        runs.append((list(twin.parameters()), resumed.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0], strict=True))
    assert _same(runs[0][1], runs[1][1])


# --------------------------------------------------------------------------------------------
# A composite checks every component before loading any
# --------------------------------------------------------------------------------------------


def test_stabilized_checks_every_component_before_loading_alrc():
    model = _model()
    opt = _stabilized(model)
    _train_stabilized(model, opt, range(4))
    sd = _nested(opt)
    sd["optimizer"]["optimizer"]["state"][0]["exp_avg"][0] = math.nan
    fresh = _stabilized(model)
    _train_stabilized(model, fresh, range(10, 12))
    alrc_before = copy.deepcopy(fresh.alrc.state_dict())
    _refused(fresh, sd, r"'exp_avg'.*non-finite")
    assert _same(alrc_before, fresh.alrc.state_dict())


def test_stabilized_refuses_a_bad_alrc_part_without_loading_the_optimizer():
    model = _model()
    opt = _stabilized(model)
    _train_stabilized(model, opt, range(4))
    sd = _nested(opt)
    sd["alrc"]["mu1"] = torch.tensor(math.nan)
    _refused(_stabilized(model), sd, r"'mu1'.*non-finite")


def test_a_clean_stabilized_checkpoint_still_loads_and_resumes():
    model = _model()
    opt = _stabilized(model)
    _train_stabilized(model, opt, range(4))
    twin = _model()
    twin.load_state_dict(model.state_dict())
    resumed = _stabilized(twin)
    resumed.load_state_dict(_nested(opt))
    _train_stabilized(model, opt, range(4, 7))
    _train_stabilized(twin, resumed, range(4, 7))
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True)
    )
