"""ALeRA's checkpoint: what :meth:`ALeRA.state_dict` holds and the checks that
:meth:`~ALeRA.load_state_dict` runs before it changes anything (Note [what a load checks] of
:mod:`steadystep.checkpoint`)."""

from __future__ import annotations

from typing import Any

import torch

from steadystep._kernels import stats_dtype
from steadystep._tensors import clone_tensors
from steadystep.checkpoint import (
    CLASS_KEY,
    Kind,
    check_class,
    check_dtype,
    check_groups,
    check_param_state,
    check_same,
    check_shape,
    step_tensor,
)
from steadystep.checkpoint import check_finite as check_finite_state
from steadystep.optim._alera_core import GRANULARITIES

__all__ = ["ALeRACheckpoint"]


def _state_dtype(key: str, param: torch.Tensor) -> torch.dtype:
    """The dtype a state entry is created in (checked on load): float32 step counts, the
    statistics' dtype (fp32 for bf16/fp16 parameters) for the rest."""
    return torch.float32 if key == "step" else stats_dtype(param.dtype)


class ALeRACheckpoint:
    """The state_dict half of :class:`~steadystep.ALeRA` (a mixin: it reads the optimizer's
    groups, state, defaults and granularity)."""

    # provided by the optimizer
    param_groups: list[dict[str, Any]]
    state: Any
    defaults: dict[str, Any]
    granularity: str
    _wide_keys: tuple[str, ...]
    _checkpoint_class: str

    def state_dict(self) -> dict[str, Any]:
        """As torch's; the 0-d tensors of ``param_groups`` (``lr_multiplier``, ``step``,
        ``skipped_steps``) are clones, so they do not change with later steps. Per-parameter
        ``state`` holds the live tensors, as torch.optim's optimizers do (``copy.deepcopy`` the
        result to keep a consistent in-memory copy of it)."""
        out = super().state_dict()
        # Each group gets its own clone (skipped_steps too, shared live): the saved format keeps
        # one entry per group; load_state_dict shares the count again.
        out["param_groups"] = [clone_tensors(group) for group in out["param_groups"]]
        out[CLASS_KEY] = self._checkpoint_class
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but statistics keep their saved dtype (fp32 stays fp32 for bf16 params).

        The whole dict is checked first (:mod:`steadystep.checkpoint`): a state_dict
        of another class (``state_dict()["class"]``), saved with another ``granularity`` (one
        written before the groups held it loads where its state tells it apart), with a param
        group that lacks a hyperparameter or a parameter's state that lacks a key or has
        another shape is refused with a ValueError, and nothing is loaded. As torch's optimizers
        restore the groups' hyperparameters, the optimizer-wide ones (``alpha``, ``C``,
        ``norm_eps``; AgAdam's ``betas``, ``eps``) are restored too.
        """
        self.check_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        wide = {k: saved_groups[0][k] for k in self._wide_keys if k != "granularity"}
        # the 0-d group tensors as this optimizer creates them (a Python number, as a tool may
        # write the group's step, becomes one: exactly, counts are integers)
        group_dtypes = [
            {k: g[k].dtype for k in ("lr_multiplier", "step", "skipped_steps")}
            for g in self.param_groups
        ]
        super().load_state_dict(state_dict)
        self.defaults.update(wide)
        saved_ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            entry = state_dict["state"].get(saved_id)
            if entry is None:
                continue
            state = {
                k: v.to(device=p.device, copy=True) if isinstance(v, torch.Tensor) else v
                for k, v in entry.items()
            }
            if "step" in state:  # a float step (old torch style) becomes the tensor it updates
                state["step"] = step_tensor(state["step"], p.device)
            self.state[p] = state
        for group, dtypes in zip(self.param_groups, group_dtypes, strict=True):
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            # A checkpoint written before skipped_steps existed starts the count at 0.
            group.setdefault("skipped_steps", torch.zeros((), dtype=torch.int64))
            for key in ("lr_multiplier", "step", "skipped_steps"):
                group[key] = torch.as_tensor(group[key], dtype=dtypes[key]).to(device)
        for group in self.param_groups[1:]:  # one shared optimizer-wide count again
            group["skipped_steps"] = self.param_groups[0]["skipped_steps"]
        for group in self.param_groups:
            group.setdefault("granularity", self.granularity)

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checks of :meth:`load_state_dict`, without loading (Note [what a load checks] of
        :mod:`steadystep.checkpoint`): the class (told apart by its keys when untagged), the
        groups' hyperparameters and granularity, every state entry's shape and dtype, and
        finite, non-negative multipliers, counts and second moments."""
        owner = type(self).__name__
        check_class(
            state_dict,
            owner=owner,
            expected=self._checkpoint_class,
            required=("state", "param_groups"),
        )
        skip = ("foreach", "fused", "differentiable", "granularity")
        required = [k for k in self.defaults if k not in skip] + ["lr_multiplier", "step"]
        saved_groups = state_dict["param_groups"]
        saved = check_groups(saved_groups, self.param_groups, owner=owner, required=required)
        if CLASS_KEY not in state_dict:
            self._check_sibling(saved_groups)
        self._check_granularity(state_dict)
        check_param_state(
            state_dict["state"], saved, self._state_spec, owner=owner, dtype=_state_dtype
        )
        wide = {k: saved_groups[0][k] for k in self._wide_keys if k != "granularity"}
        for group in saved_groups[1:]:
            for key, value in wide.items():
                check_same(key, group[key], value, owner=f"{owner} (optimizer-wide)")
        for gi, (saved_group, group) in enumerate(
            zip(saved_groups, self.param_groups, strict=True)
        ):
            for key in ("lr_multiplier", "step", "skipped_steps"):
                if key not in saved_group:
                    continue
                where = f"param group {gi}'s {key!r}"
                value = saved_group[key]
                check_shape(value, "scalar", group[key], owner=owner, where=where)
                check_dtype(value, group[key].dtype, owner=owner, where=where)
                check_finite_state(value, owner=owner, where=where, nonnegative=True)

    def _check_sibling(self, saved_groups: list[dict[str, Any]]) -> None:
        """An untagged checkpoint of AgAdam (whose groups hold Adam's ``betas`` and ``eps``)
        is not ALeRA's, though it has every key ALeRA needs."""
        extra = {k for g in saved_groups for k in ("betas", "eps") if k in g}
        extra -= set(self.defaults)
        if extra:
            owner = type(self).__name__
            raise ValueError(
                f"{owner}.load_state_dict: the state_dict's param groups hold "
                f"{', '.join(repr(k) for k in sorted(extra))}, so it was saved by AgAdam, "
                f"expected one saved by {self._checkpoint_class}"
            )

    def _state_spec(self, group: dict[str, Any]) -> dict[str, tuple[Kind, bool]]:
        """``{key: (kind, required)}`` of a parameter's state (checked on load)."""
        spec: dict[str, tuple[Kind, bool]] = {"relaxed_path": ("param", True)}
        if self.granularity == "tensor":
            spec.update(lr_multiplier=("scalar", True), step=("scalar", True))
        elif self.granularity == "param":
            spec["lr_multiplier"] = ("param", True)
        return spec

    def _check_granularity(self, state_dict: dict[str, Any]) -> None:
        saved = {g.get("granularity") for g in state_dict["param_groups"]} - {None}
        if saved:
            found = saved.pop() if len(saved) == 1 else sorted(saved)
            compatible: tuple[str, ...] = (found,) if isinstance(found, str) else ()
        else:
            # Written before the groups held it: only the per-parameter multipliers tell.
            found, compatible = self._granularity_from_state(state_dict)
        if self.granularity not in compatible:
            owner = type(self).__name__
            raise ValueError(
                f"{owner}.load_state_dict: the state_dict was saved with granularity={found!r}, "
                f"this {owner} has granularity={self.granularity!r}; create it with the "
                "checkpoint's granularity to load it"
            )

    def _granularity_from_state(self, state_dict: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        shapes = {i: tuple(p.shape) for i, p in zip(ids, params, strict=False)}
        kinds = set()
        for i, st in state_dict["state"].items():
            m = st.get("lr_multiplier") if isinstance(st, dict) else None
            if isinstance(m, torch.Tensor) and shapes.get(i, ()) != ():
                kinds.add("param" if tuple(m.shape) == shapes[i] else "tensor")
            elif isinstance(m, torch.Tensor):
                kinds.add("tensor or param")
            else:
                kinds.add("global or group")
        if len(kinds - {"tensor or param"}) == 1:
            kinds -= {"tensor or param"}
        if len(kinds) != 1:
            return " or ".join(sorted(kinds)) or "any", GRANULARITIES if not kinds else ()
        found = kinds.pop()
        return found, tuple(found.split(" or "))
