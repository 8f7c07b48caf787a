"""The native CProp classes' checkpoint: what ``state_dict`` holds and the checks that
``load_state_dict`` runs before it changes anything (Note [what a load checks] of
:mod:`steadystep.checkpoint`), and the group tensors a load restores."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from steadystep._tensors import clone_tensors
from steadystep.checkpoint import (
    CLASS_KEY,
    check_class,
    check_groups,
    check_param_state,
    check_same,
)
from steadystep.checkpoint import check_finite as check_finite_state
from steadystep.optim.cprop._math import _stats_dtype
from steadystep.optim.cprop._state import _param_index_map, _states_by_param

__all__ = ["NativeCheckpoint"]


def _group_device(group: dict[str, Any]) -> torch.device:
    return group["params"][0].device if group["params"] else torch.device("cpu")


def _state_dtype(key: str, param: Tensor) -> torch.dtype:
    """The dtype this class creates a state entry in (checked on load): float32 counts,
    statistics in the parameter's statistics dtype (fp32 for bf16/fp16 parameters)."""
    return torch.float32 if key == "step" else _stats_dtype(param)


def _set_lr_multiplier(group: dict[str, Any]) -> None:
    """``group["lr_multiplier"]``: a 0-d float64 tensor beside the parameters, 1 when absent
    (a new group, or a checkpoint from before it existed)."""
    value = group.get("lr_multiplier", 1.0)
    group["lr_multiplier"] = torch.as_tensor(value, dtype=torch.float64).to(_group_device(group))


def _share_skipped_steps(groups: list[dict[str, Any]]) -> None:
    """``group["skipped_steps"]``: one optimizer-wide 0-d int64 count of the steps skipped for
    a non-finite gradient, held by every group (one add per step), 0 when a checkpoint from
    before it existed is loaded; saved per group, as ALeRA's."""
    first = groups[0]
    count = first.get("skipped_steps", 0)
    count = torch.as_tensor(count, dtype=torch.int64).to(_group_device(first))
    for group in groups:
        group["skipped_steps"] = count


class NativeCheckpoint:
    """The state_dict half of the native CProp classes (a mixin before ``Optimizer``)."""

    # provided by the optimizer
    _owner: str
    param_groups: list[dict[str, Any]]
    state: Any
    defaults: dict[str, Any]
    _class_entries: Any
    _state_spec: Any

    def state_dict(self) -> dict[str, Any]:
        """As torch's; the groups' ``lr_multiplier`` tensors are clones, so they do not change
        with later steps (per-parameter ``state`` holds the live tensors, as torch.optim's).
        ``state_dict()["class"]`` names the class (Note [class tag] of
        :mod:`steadystep.checkpoint`)."""
        out = super().state_dict()
        out["param_groups"] = [clone_tensors(group) for group in out["param_groups"]]
        out[CLASS_KEY] = self._owner
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; statistics keep their saved dtype (fp32 for bf16 params).

        ``torch.optim.Optimizer.load_state_dict`` would cast every floating state tensor to the
        parameter's dtype, rounding fp32 statistics of bf16 parameters; the state is therefore
        copied here, on the parameter's device, dtype unchanged. A checkpoint without
        ``lr_multiplier`` loads with 1; a float ``step`` (old torch style) as a tensor; one
        without ``foreach``/``fused`` keeps this optimizer's.

        The whole dict is checked first (:mod:`steadystep.checkpoint`): another
        class, a param group without this class's hyperparameters, a missing per-parameter
        state key or a statistic of another shape is a ValueError, and nothing is loaded.
        """
        self.check_state_dict(state_dict)
        saved_state = state_dict["state"]
        # a checkpoint from before the path flags keeps this optimizer's choice of path (torch
        # would reset it to the default, and the run would continue on another path)
        groups = [
            {**saved, **{k: group[k] for k in ("foreach", "fused") if k not in saved}}
            for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True)
        ]
        super().load_state_dict({**state_dict, "param_groups": groups, "state": {}})
        params = _param_index_map(self.param_groups)
        groups = state_dict["param_groups"]  # DCP keys the state by the groups' ids
        self.state.update(_states_by_param(saved_state, params, "state_dict", groups))
        for group in self.param_groups:
            _set_lr_multiplier(group)
        _share_skipped_steps(self.param_groups)

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checks of :meth:`load_state_dict`, without loading: a ValueError naming what
        was expected and found (Note [what a load checks] of :mod:`steadystep.checkpoint`:
        statistics in the dtype this class creates, finite, second moments and counts >= 0).
        """
        owner = self._owner
        check_class(state_dict, owner=owner, expected=owner, required=("state", "param_groups"))
        hyper = [k for k in self.defaults if k not in ("foreach", "fused", "differentiable")]
        saved = check_groups(
            state_dict["param_groups"], self.param_groups, owner=owner, required=hyper
        )
        for gi, group in enumerate(state_dict["param_groups"]):
            for key, value in self._class_entries().items():
                check_same(key, group[key], value, owner=owner)
            for key in ("lr_multiplier", "skipped_steps"):
                where = f"param group {gi}'s {key!r}"
                check_finite_state(group.get(key), owner=owner, where=where, nonnegative=True)
        check_param_state(
            state_dict["state"], saved, self._state_spec, owner=owner, dtype=_state_dtype
        )
