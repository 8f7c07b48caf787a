"""The base of optimizers that wrap another one (:class:`~steadystep.CProp`,
:class:`~steadystep.CatastropheGuard`).

A wrapper is a ``torch.optim.Optimizer`` (so LR schedulers, Lightning and the HF Trainer take
it) whose parameters, groups and per-parameter state are the wrapped optimizer's. This module is
the one place that knows which torch internals that takes: the hook dictionaries and the step
patch that ``Optimizer.__init__`` would have set up, the hooks of a wrapped optimizer whose
step is taken without calling its ``step()``, and the checkpoint layout that
``torch.distributed.checkpoint`` can read (Note [flat checkpoints]).

Note [flat checkpoints]: ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``
keeps only ``state`` and ``param_groups`` of ``optim.state_dict()``, maps the keys of ``state``
(parameter ids) and the ids in each group's ``params`` to FQNs, gathers (full) or keeps
(sharded) the DTensor shards it finds, and hands ``set_optimizer_state_dict``'s result, FQN
keyed and with those two keys only, to ``load_state_dict``. Everything else is dropped. So a
wrapper's ``state_dict()`` is the wrapped optimizer's flat dict with the wrapper's own state
inside it, under the wrapper's :attr:`~OptimizerWrapper.checkpoint_key` (``"guard"``,
``"cprop"``, ``"stabilized"``):

* per-parameter tensors (the guard's rollback snapshots, CProp's statistics) in that
  parameter's ``state`` entry as ``"<key>/<name>"``, so DCP shards and gathers them like the
  parameter's own moments;
* the rest (counters, the detector, settings, class tags, and the wrapped dict's top-level keys
  other than ``state`` and ``param_groups``) as one dict in ``param_groups[0]["<key>"]``;
* ``"class"``: the wrapper's class tag (informational; DCP drops it).

Wrappers around wrappers nest: each strips its own keys and hands the rest down. A subclass
writes and reads its checkpoint in the nested form (:meth:`~OptimizerWrapper._wrapped_state_dict`
``{"optimizer": inner, ...}``), and says which of its tensors are per parameter in
:meth:`~OptimizerWrapper._split_checkpoint` / :meth:`~OptimizerWrapper._join_checkpoint`; a
nested dict (a checkpoint written before this layout) still loads as it is.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as torch_optimizer

from steadystep.checkpoint import CLASS_KEY

__all__ = ["OptimizerWrapper", "call_with_step_hooks", "is_state_init_step"]

_WRAPPED_KEYS = "wrapped_keys"  # the wrapped dict's other top-level keys, kept in the payload

# Note [global step hooks]: torch runs the hooks of register_optimizer_step_pre_hook /
# _post_hook around every optimizer's step(); through a wrapper (Stabilized -> guard -> CProp ->
# base) they would run once per layer, 2 to 4 times per user step. The outermost wrapper's
# step runs them once, as torch does; while its body runs they are hidden from every optimizer
# it steps (the dicts are emptied and refilled, hooks registered meanwhile kept). Hooks
# registered on an optimizer itself still run at its own step. The dicts are process-wide, so
# a plain optimizer stepped by another thread during a wrapper's step misses them.
_nesting = threading.local()


def _hiding_global_hooks(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def step(*args: Any, **kwargs: Any) -> Any:
        depth = getattr(_nesting, "depth", 0)
        if depth:
            return func(*args, **kwargs)
        hooks = (
            torch_optimizer._global_optimizer_pre_hooks,
            torch_optimizer._global_optimizer_post_hooks,
        )
        saved = [dict(h) for h in hooks]
        for h in hooks:
            h.clear()
        _nesting.depth = 1
        try:
            return func(*args, **kwargs)
        finally:
            _nesting.depth = 0
            for h, old in zip(hooks, saved, strict=True):
                added = dict(h)
                h.clear()
                h.update(old)
                h.update(added)

    return step


class OptimizerWrapper(Optimizer):
    """An optimizer around ``optimizer``: delegation, hooks, nested ``state_dict``, pickling.

    ``param_groups``, ``state`` and ``defaults`` (read and assigned), ``add_param_group`` and
    ``zero_grad`` are the wrapped optimizer's. Hooks registered on the wrapper
    (``register_step_pre_hook``, ``register_state_dict_post_hook``, ...) run as torch.optim runs
    them, around the wrapper's ``step``, ``state_dict`` and ``load_state_dict``. A subclass
    implements ``step`` and the two halves of a checkpoint, :meth:`_wrapped_state_dict` and
    :meth:`_load_wrapped_state_dict`; it never calls ``Optimizer.__init__`` (there are no
    parameters of its own). ``state_dict()`` lays the two out flat, as
    ``torch.distributed.checkpoint`` needs (Note [flat checkpoints]); ``checkpoint_key`` names
    the wrapper's part of it.

    Args:
        optimizer: the optimizer to wrap (a ``torch.optim.Optimizer``, else a TypeError).

    Examples:
        >>> class Plain(OptimizerWrapper):
        ...     def step(self, closure=None):
        ...         return self.optimizer.step(closure)
        ...     def _wrapped_state_dict(self):
        ...         return {"optimizer": self.optimizer.state_dict()}
        ...     def _load_wrapped_state_dict(self, state_dict):
        ...         self.optimizer.load_state_dict(state_dict["optimizer"])
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> opt = Plain(torch.optim.SGD([p], lr=0.1))
        >>> opt.param_groups[0]["lr"], sorted(opt.state_dict())
        (0.1, ['class', 'param_groups', 'state'])
    """

    checkpoint_key = "wrapper"  # the namespace of this wrapper's part of a flat state_dict

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer for {type(self).__name__} to wrap, "
                f"got optimizer={type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        # What Optimizer.__init__ would set up: the wrapper's own hooks and the patched step
        # that runs them.
        self._optimizer_step_pre_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._patch_step_function()

    @staticmethod
    def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
        """torch's step patch (the global and the wrapper's own step hooks around ``step``),
        with the global hooks hidden from the optimizers stepped inside: Note [global step
        hooks]."""
        return Optimizer.profile_hook_step(_hiding_global_hooks(func))

    # -- delegation ------------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer."""
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """:meth:`_wrapped_state_dict` between the wrapper's state_dict hooks."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        out = self._flat_state_dict(self._wrapped_state_dict())
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """:meth:`_load_wrapped_state_dict` (of a shallow copy) between the load hooks; a flat
        dict (Note [flat checkpoints]) is nested again first, a nested one loads as it is."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if self._is_flat(state_dict):
            state_dict = self._nested_state_dict(state_dict)
        self._load_wrapped_state_dict(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _wrapped_state_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """The checkpoint: the wrapped optimizer's ``state_dict()`` and the wrapper's state."""
        raise NotImplementedError

    def _load_wrapped_state_dict(self, state_dict: dict[str, Any]) -> None:  # pragma: no cover
        """Restore what :meth:`_wrapped_state_dict` returned (the caller's copy: may be
        modified)."""
        raise NotImplementedError

    # -- the flat layout (Note [flat checkpoints]) ------------------------------------------

    def _split_checkpoint(
        self, nested: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[str, Any]]:
        """``nested`` -> (the wrapped optimizer's dict, the wrapper's per-parameter entries
        ``{index in group order: {name: tensor}}``, the rest of the wrapper's part).

        The default takes ``nested["optimizer"]`` as the wrapped dict and keeps nothing per
        parameter; a wrapper with per-parameter tensors overrides this and
        :meth:`_join_checkpoint`."""
        own = dict(nested)
        return own.pop("optimizer"), {}, own

    def _join_checkpoint(
        self, inner: dict[str, Any], per_param: dict[int, dict[str, Any]], own: dict[str, Any]
    ) -> dict[str, Any]:
        """The inverse of :meth:`_split_checkpoint`: the nested dict to load."""
        if per_param:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state_dict holds per-parameter "
                f"entries {sorted({k for e in per_param.values() for k in e})} under "
                f"{self.checkpoint_key!r}, which this wrapper does not keep"
            )
        return {**own, "optimizer": inner}

    def _is_flat(self, state_dict: Mapping[str, Any]) -> bool:
        groups = state_dict.get("param_groups")
        return (
            isinstance(groups, list)
            and bool(groups)
            and isinstance(groups[0], Mapping)
            and self.checkpoint_key in groups[0]
        )

    def _flat_state_dict(self, nested: dict[str, Any]) -> dict[str, Any]:
        """The nested checkpoint laid out flat (Note [flat checkpoints])."""
        key = self.checkpoint_key
        inner, per_param, own = self._split_checkpoint(nested)
        if not isinstance(inner, Mapping) or not {"state", "param_groups"} <= set(inner):
            found = sorted(inner) if isinstance(inner, Mapping) else type(inner).__name__
            raise TypeError(
                f"{type(self).__name__}.state_dict: the wrapped optimizer's state_dict must have "
                f"'state' and 'param_groups', as torch.optim's do; found {found}"
            )
        groups = [dict(group) for group in inner["param_groups"]]
        if not groups or key in groups[0]:
            raise ValueError(
                f"{type(self).__name__}.state_dict: the wrapped optimizer's first param group "
                f"already has a key {key!r} (a {type(self).__name__} inside another?)"
            )
        ids = [i for group in groups for i in group["params"]]
        state = {i: dict(entry) for i, entry in inner["state"].items()}
        for index, entries in per_param.items():
            entry = state.setdefault(ids[index], {})
            entry.update({f"{key}/{name}": value for name, value in entries.items()})
        extra = {k: v for k, v in inner.items() if k not in ("state", "param_groups")}
        groups[0][key] = {**own, _WRAPPED_KEYS: extra}
        tag = own.get(CLASS_KEY, type(self).__name__)
        return {"state": state, "param_groups": groups, CLASS_KEY: tag}

    def _nested_state_dict(self, flat: dict[str, Any]) -> dict[str, Any]:
        """A flat checkpoint (this layout, or DCP's FQN-keyed rebuild of it) nested again."""
        key, owner = self.checkpoint_key, type(self).__name__
        groups = [dict(group) for group in flat["param_groups"]]
        own = groups[0].pop(key)
        if not isinstance(own, Mapping):
            raise ValueError(
                f"{owner}.load_state_dict: param_groups[0][{key!r}] must be a dict, found "
                f"{type(own).__name__}"
            )
        own = dict(own)
        extra = own.pop(_WRAPPED_KEYS, None) or {}
        index = {saved_id: i for i, saved_id in enumerate(i for g in groups for i in g["params"])}
        saved_state = flat.get("state")
        if not isinstance(saved_state, Mapping):
            raise ValueError(f"{owner}.load_state_dict: 'state' must be a dict")
        prefix = f"{key}/"
        state: dict[Any, Any] = {}
        per_param: dict[int, dict[str, Any]] = {}
        for saved_id, entry in saved_state.items():
            mine = {k[len(prefix) :]: v for k, v in entry.items() if str(k).startswith(prefix)}
            rest = {k: v for k, v in entry.items() if not str(k).startswith(prefix)}
            if mine:
                if saved_id not in index:
                    raise ValueError(
                        f"{owner}.load_state_dict: 'state' has an entry for parameter "
                        f"{saved_id!r}, which no param group of the state_dict lists"
                    )
                per_param[index[saved_id]] = mine
            if rest:  # an entry that held only the wrapper's part was not the wrapped one's
                state[saved_id] = rest
        inner = {**extra, "state": state, "param_groups": groups}
        return self._join_checkpoint(inner, per_param, own)


def call_with_step_hooks(optimizer: Optimizer, step: Callable[[], None]) -> None:
    """Run ``step()`` between ``optimizer``'s own step pre- and post-hooks.

    For a wrapper that steps ``optimizer`` without calling its ``step()`` (a masked step on the
    device): the hooks registered on ``optimizer`` still run, with ``args=()`` and
    ``kwargs={}``; their return values are ignored.
    """
    for hook in list(optimizer._optimizer_step_pre_hooks.values()):
        hook(optimizer, (), {})
    step()
    for hook in list(optimizer._optimizer_step_post_hooks.values()):
        hook(optimizer, (), {})


@torch.no_grad()
def is_state_init_step(optimizer: Optimizer, closure: Callable[[], Any] | None) -> bool:
    """Is this ``step()`` the one ``torch.distributed.checkpoint`` takes to create the state?

    ``get_optimizer_state_dict`` and ``set_optimizer_state_dict`` call
    ``torch.distributed.checkpoint.state_dict._init_optim_state``: on an optimizer with no
    state yet it sets every gradient to zeros and every ``lr`` to 0 and calls ``step()``, so
    that the state exists for a checkpoint to be loaded into. That step has no loss; a wrapper
    that needs one (the guard) recognises it here, a host read it pays only on a step that
    would otherwise fail: no closure, no state, every ``lr`` 0 and every gradient zero.
    """
    if closure is not None or optimizer.state:
        return False
    groups = optimizer.param_groups
    if not all("lr" in group and float(group["lr"]) == 0.0 for group in groups):
        return False
    for group in groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            g = g.to_local() if hasattr(g, "to_local") else g  # this rank's shard (FSDP2)
            if bool(torch.count_nonzero(g._values() if g.is_sparse else g)):
                return False
    return True
