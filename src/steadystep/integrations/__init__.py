"""Optional integrations with training frameworks.

Each submodule imports its framework only when imported itself, so ``import steadystep`` never
needs them:

* :mod:`steadystep.integrations.lightning`: Lightning callbacks (``pip install lightning``).
* :mod:`steadystep.integrations.transformers`: a Hugging Face ``Trainer`` subclass and callback
  (``pip install transformers``).
* :mod:`steadystep.integrations.amp`: ``torch.amp.GradScaler`` skipped steps leave ALRC untouched.
* :mod:`steadystep.integrations.scheduler`: an LR scheduler that does not advance on a step the
  guard skipped (plain PyTorch; the Hugging Face integration uses it).
"""

from __future__ import annotations

from typing import Any

__all__ = ["find_stats_modules", "loss_needing", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer under framework wrappers (Lightning's ``LightningOptimizer``, accelerate's
    ``AcceleratedOptimizer``), found through their ``optimizer`` / ``_optimizer`` attributes."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        if type(optimizer).__name__ in ("LightningOptimizer", "AcceleratedOptimizer"):
            inner = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
            if inner is not None:
                optimizer = inner
                continue
        break
    return optimizer


def loss_needing(optimizer: Any) -> bool:
    """Does ``optimizer`` (unwrapped) take the loss through ``observe_loss``?"""
    return callable(getattr(unwrap_optimizer(optimizer), "observe_loss", None))


def find_stats_modules(module: Any) -> list[tuple[str, Any]]:
    """``(name, submodule)`` for every submodule of ``module`` with a ``stats()`` method (e.g.
    :class:`~steadystep.ALRC`), named by its attribute path with dots replaced by ``_``."""
    out = []
    for name, sub in module.named_modules():
        if callable(getattr(sub, "stats", None)):
            out.append((name.replace(".", "_") or type(sub).__name__.lower(), sub))
    return out
