"""The base of optimizers that wrap another one (:class:`~steadystep.CProp`,
:class:`~steadystep.CatastropheGuard`).

A wrapper is a ``torch.optim.Optimizer`` (so LR schedulers, Lightning and the HF Trainer take
it) whose parameters, groups and per-parameter state are the wrapped optimizer's. This module is
the one place that knows which torch internals that takes: the hook dictionaries and the step
patch that ``Optimizer.__init__`` would have set up, and the hooks of a wrapped optimizer whose
step is taken without calling its ``step()``.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim import optimizer as torch_optimizer

__all__ = ["OptimizerWrapper", "call_with_step_hooks"]

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
    parameters of its own).

    Args:
        optimizer: the optimizer to wrap (a ``torch.optim.Optimizer``, else a TypeError).

    Examples:
        >>> class Plain(OptimizerWrapper):
        ...     def step(self, closure=None):
        ...         return self.optimizer.step(closure)
        ...     def _wrapped_state_dict(self):
        ...         return {"inner": self.optimizer.state_dict()}
        ...     def _load_wrapped_state_dict(self, state_dict):
        ...         self.optimizer.load_state_dict(state_dict["inner"])
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> opt = Plain(torch.optim.SGD([p], lr=0.1))
        >>> opt.param_groups[0]["lr"], sorted(opt.state_dict())
        (0.1, ['inner'])
    """

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
        out = self._wrapped_state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """:meth:`_load_wrapped_state_dict` (of a shallow copy) between the load hooks."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
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
