"""Mixed precision: a step that ``torch.amp.GradScaler`` skips is a step steadystep skips.

The optimizers need nothing: GradScaler does not call ``optimizer.step()`` when it finds an inf or
NaN gradient, so CProp's and ALeRA's statistics and the guard's detector stay as they were (a loss
given by ``observe_loss`` is simply replaced by the next one). :class:`~steadystep.ALRC` is
different: it updates its moments in the *forward* pass, before anyone knows that the scaled
gradients will overflow. :class:`skip_aware` keeps a reference to ALRC's moments before the forward
and puts them back, on the device, when the scaler skipped the step.

Note [how a skip is seen without a host sync]
    ``GradScaler.update()`` multiplies the scale by ``backoff_factor < 1`` exactly when some
    optimizer step of the iteration was skipped, and otherwise leaves it or grows it. So
    ``scale_after < scale_before`` is the skip decision as a device tensor. ``get_scale()`` would
    read it on the host, so the (long-standing, private) ``GradScaler._scale`` tensor is read
    instead, falling back to ``get_scale()`` where it is absent.

Examples:
    >>> import torch, steadystep as ss
    >>> from steadystep.integrations.amp import skip_aware
    >>> model, alrc = torch.nn.Linear(4, 1), ss.ALRC()
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> scaler = torch.amp.GradScaler("cpu")
    >>> for step in range(3):
    ...     with skip_aware(scaler, alrc):
    ...         loss = alrc(model(torch.randn(8, 4)).pow(2).squeeze(1)).mean()
    ...         scaler.scale(loss).backward()
    ...         scaler.step(opt)
    ...         scaler.update()
    ...         opt.zero_grad()
    >>> int(alrc.num_updates)
    3
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from steadystep.integrations import unwrap_optimizer

__all__ = ["restore_where", "scale_tensor", "skip_aware", "snapshot_buffers"]


def scale_tensor(scaler: Any) -> Tensor | None:
    """The scaler's current scale as a device tensor (a copy), or None before its first use."""
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, Tensor):
        return scale.detach().clone()
    if scale is None and hasattr(scaler, "_scale"):
        return None  # created lazily by the first scaler.scale(loss)
    return torch.tensor(float(scaler.get_scale()))  # no private tensor: read it (a host sync)


def snapshot_buffers(*modules: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """References to (clones of) every buffer of ``modules`` and their submodules."""
    out = []
    for root in modules:
        for module in root.modules():
            for name, buf in module.named_buffers(recurse=False):
                out.append((module, name, buf.detach().clone()))
    return out


def restore_where(snapshot: list[tuple[nn.Module, str, Tensor]], skipped: Tensor) -> None:
    """Set each buffer back to its snapshot where ``skipped`` (a 0-d bool tensor) is True."""
    with torch.no_grad():
        for module, name, old in snapshot:
            current = getattr(module, name)
            flag = skipped.to(current.device)
            # A new tensor is bound (not written in place), as ALRC itself does: the old one may
            # still be saved for a backward pass.
            setattr(module, name, torch.where(flag, old.to(current.device), current))


class skip_aware:  # lower case: used like contextlib's managers, `with skip_aware(...)`
    """Context manager: undo the ALRC moment updates of an iteration that ``scaler`` skipped.

    Put the forward, backward, ``scaler.step`` and ``scaler.update`` of one iteration inside it.
    On exit, if the scale went down (the scaler skipped a step) every buffer of ``modules`` is
    restored, on the device, to its value on entry. With a disabled scaler it does nothing.

    The recipe (``ss.stabilize``) passes its optimizer, which the scaler steps:
    ``skip_aware(scaler, opt)`` restores ``opt.alrc`` and, on exit, forgets the raw losses that
    ``opt.clip()`` remembered for the guard (a step the scaler skipped never consumed them; a
    step taken already did), so the next step's guard watches its own batch alone::

        with skip_aware(scaler, opt):
            loss = opt.clip(per_sample_losses).mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    Args:
        scaler: a ``torch.amp.GradScaler``.
        *modules: what must not change on a skipped step: modules (ALRC instances) whose
            buffers are restored, or optimizers (also under a framework's wrapper): a
            :class:`~steadystep.Stabilized` brings its ALRC, any other adds nothing (the
            scaler does not step it).

    Attributes:
        skipped: after exit, a 0-d bool tensor (on the scale's device): was the step skipped?
    """

    def __init__(self, scaler: Any, *modules: nn.Module | Optimizer) -> None:
        self.scaler = scaler
        self.modules: list[nn.Module] = []
        self.stabilized: list[Any] = []  # Stabilized optimizers: their loss windows
        for item in modules:
            if isinstance(item, nn.Module):
                self.modules.append(item)
                continue
            inner = unwrap_optimizer(item)
            if not isinstance(inner, Optimizer):
                raise TypeError(
                    f"skip_aware takes nn.Modules (ALRC) and optimizers, got {type(item).__name__}"
                )
            alrc = getattr(inner, "alrc", None)  # a Stabilized's (None with alrc=False)
            if isinstance(alrc, nn.Module):
                self.modules.append(alrc)
            if callable(getattr(inner, "reset_loss", None)):
                self.stabilized.append(inner)
        self.skipped: Tensor | None = None
        self._before: Tensor | None = None
        self._snapshot: list[tuple[nn.Module, str, Tensor]] = []

    def __enter__(self) -> skip_aware:
        self.begin()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.end()

    def begin(self) -> None:
        """Remember the scale and the buffers (what ``__enter__`` does)."""
        enabled = getattr(self.scaler, "is_enabled", lambda: True)()
        if not enabled:
            self._snapshot = []
            return
        self._before = scale_tensor(self.scaler)
        if self._before is None:
            init = float(getattr(self.scaler, "_init_scale", 2.0**16))
            self._before = torch.tensor(init, dtype=torch.float32)
        self._snapshot = snapshot_buffers(*self.modules)

    def end(self) -> Tensor | None:
        """Restore the buffers if the scale went down since :meth:`begin`; return ``skipped``.

        A Stabilized's raw losses are forgotten in any case: a step taken consumed them
        already, and a skipped one must not hand them to the next (no host read needed)."""
        for opt in self.stabilized:
            opt.reset_loss()
        if not self._snapshot and self._before is None:
            return None
        after = scale_tensor(self.scaler)
        if after is None or self._before is None:
            return None
        self.skipped = after < self._before.to(after.device)
        restore_where(self._snapshot, self.skipped)
        self._snapshot = []
        self._before = None
        return self.skipped
