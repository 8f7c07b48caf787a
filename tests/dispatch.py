"""Counting the torch operations a piece of code dispatches (a count, not a timing): the tests
of the host work per step."""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """``with CountOps() as ops: ...``: ``ops.calls`` counts each dispatched operation by name,
    ``ops.count`` all of them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.calls.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))
