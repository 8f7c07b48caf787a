"""The one contract between :class:`~steadystep.CatastropheGuard` and a change detector.

Every detector of :mod:`steadystep.detectors` implements :class:`ChangeDetector` (through
:class:`~steadystep.detectors.Detector`), so the guard calls one method the same way whatever it
watches. A detector of your own may implement the protocol too (then it is used as it is), or
offer only ``update(loss) -> alarm`` with ``state_dict`` / ``load_state_dict`` / ``stats``:
:func:`as_detector` then adapts it (:class:`ForeignDetector`), at the cost of one host read per
step (Note [a foreign detector's skip]).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from steadystep.detectors._base import Detector

__all__ = ["ChangeDetector", "ForeignDetector", "as_detector"]


@runtime_checkable
class ChangeDetector(Protocol):
    """What the guard needs from a detector; every call free of host reads.

    * ``update(loss, *, grad_norm=None, skip=None)``: observe one minibatch loss (a 0-d tensor
      or float) and, when ``needs_grad_norm``, the global gradient norm; return the alarm as a
      0-d bool tensor. Where ``skip`` (0-d bool) is True, a finite loss is not observed (no
      alarm, state bitwise unchanged); a non-finite loss still alarms.
    * ``needs_grad_norm``: does ``update`` watch the gradient norm (the guard computes it only
      then)?
    * ``last_loss``: the loss the last ``update`` tested (0-d; under torch.distributed the rank
      mean), which the guard records in its alarm history.
    * ``reset(mask)``: restart the test where ``mask`` (0-d bool) is True (the guard accepts a
      change of level: the new level is the detector's baseline from then on);
    * ``revert(mask)``: where ``mask`` is True, take back the last ``update``'s observation (the
      guard skipped that batch or rolled back those weights);
    * ``stats()``: 0-d tensors for telemetry; ``state_dict()`` / ``load_state_dict()``: every
      evolving statistic, resumed bitwise.
    """

    needs_grad_norm: bool
    last_loss: Tensor

    def update(
        self,
        loss: Tensor | float,
        *,
        grad_norm: Tensor | float | None = None,
        skip: Tensor | None = None,
    ) -> Tensor: ...

    def reset(self, mask: Tensor | None = None) -> None: ...

    def revert(self, mask: Tensor) -> None: ...

    def stats(self) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class ForeignDetector:
    """A detector with ``update(loss)`` only, behind the :class:`ChangeDetector` contract.

    Note [a foreign detector's skip]: such a detector cannot mask an observation on the device,
    so the adapter keeps its ``state_dict()`` before each ``update`` and, where ``skip`` is set
    and there was no alarm, loads it back: one host read per step (a detector without
    ``state_dict`` / ``load_state_dict`` observes such a step; it cannot be checkpointed
    either). A ``needs_grad_norm`` attribute set on it is honoured (``update(loss,
    grad_norm=...)``). Attributes not defined here are the wrapped detector's.
    """

    def __init__(self, detector: Any) -> None:
        self.detector = detector
        if not callable(getattr(detector, "update", None)):
            raise TypeError(
                f"detector must have an update(loss) -> alarm method, got detector={detector!r} "
                "(subclass steadystep.detectors.Detector, or pass None for the default "
                "SpikeDetector)"
            )
        self.needs_grad_norm = bool(getattr(detector, "needs_grad_norm", False))
        self.last_loss = torch.full((), torch.nan)
        self._saved: dict[str, Any] | None = None
        self._restorable = callable(getattr(detector, "state_dict", None)) and callable(
            getattr(detector, "load_state_dict", None)
        )

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this adapter does not define: the wrapped detector's.
        if name == "detector":
            raise AttributeError(name)
        return getattr(self.detector, name)

    def update(
        self,
        loss: Tensor | float,
        *,
        grad_norm: Tensor | float | None = None,
        skip: Tensor | None = None,
    ) -> Tensor:
        saved = self.detector.state_dict() if self._restorable else None
        self._saved = saved
        restore = skip is not None and saved is not None
        if self.needs_grad_norm:
            alarm = self.detector.update(loss, grad_norm=grad_norm)
        else:
            alarm = self.detector.update(loss)
        alarm = torch.as_tensor(alarm, dtype=torch.bool)
        loss_t = torch.as_tensor(loss, dtype=torch.float32).detach().reshape(())
        if restore and bool(skip.to(alarm.device) & ~alarm):
            self.detector.load_state_dict(saved)  # Note [a foreign detector's skip]
            return torch.zeros_like(alarm)
        self.last_loss = loss_t
        return alarm

    def revert(self, mask: Tensor) -> None:
        if self._saved is not None and bool(mask):
            self.detector.load_state_dict(self._saved)

    def reset(self, mask: Tensor | None = None) -> None:
        reset = getattr(self.detector, "reset", None)
        if callable(reset) and (mask is None or bool(mask)):
            reset()

    def stats(self) -> dict[str, Tensor]:
        stats = getattr(self.detector, "stats", None)
        return stats() if callable(stats) else {}

    def state_dict(self) -> dict[str, Any]:
        return self.detector.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return repr(self.detector)


def as_detector(detector: Any) -> ChangeDetector:
    """``detector`` itself when it implements :class:`ChangeDetector` (every detector of
    :mod:`steadystep.detectors` does), else a :class:`ForeignDetector` around it.

    Examples:
        >>> from steadystep.detectors.protocol import as_detector
        >>> spike = ss.SpikeDetector()
        >>> as_detector(spike) is spike
        True
    """
    if isinstance(detector, (Detector, ChangeDetector)):
        return detector
    return ForeignDetector(detector)
