"""Which steadystep wrapper may wrap which optimizer: the order of the composition.

Note [the order of the composition]
    From the loss to the parameters, the pieces compose in one order::

        ALRC (on the per-sample losses) -> CatastropheGuard -> CProp -> base optimizer

    The guard is outermost because it decides, from the raw loss, whether the step happens at
    all and rolls the parameters back to where they were before the last *whole* update. CProp
    is inside it: it snapshots the parameters, lets the base step and scales what changed. Put
    the other way round, CProp around a guard would snapshot before the guard's step and scale
    "what changed" after it, so on an alarm it would scale the rollback itself and half-undo
    it; and it would not pass ``loss=`` on to the guard. CProp twice scales the update twice.
    :func:`~steadystep.stabilize` composes them in this order; the wrappers refuse any other at
    construction, with a message naming the right one.

The checks look through the chain of wrappers (each wrapper's ``.optimizer``), so a guard hidden
under another wrapper is found too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from torch.optim import Optimizer

from steadystep.compose.wrapper import OptimizerWrapper

__all__ = ["Composable", "check_wrappable", "layers"]

Role = Literal["stabilized", "guard", "cprop"]


class Composable:
    """Mixin of the steadystep optimizers that take a place in the composition order: each
    declares its role (``"stabilized"``, ``"guard"`` or ``"cprop"``), which
    :func:`check_wrappable` reads, so this module needs none of their classes."""

    composition_role: ClassVar[Role]


def layers(optimizer: Any) -> Iterator[Any]:
    """``optimizer``, then what it wraps, and so on down to the base (through ``.optimizer``)."""
    seen: set[int] = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        yield optimizer
        if not isinstance(optimizer, OptimizerWrapper):
            return
        optimizer = optimizer.optimizer


def _role(layer: Any) -> Role | None:
    return layer.composition_role if isinstance(layer, Composable) else None


def _salera_hint(layer: Any) -> str:
    name = type(layer).__name__
    if name in ("SALeRA", "SPALeRA"):
        return (
            f" ({name} is CatastropheGuard(ALeRA(...), PageHinkley(...)): for CProp inside it "
            "write CatastropheGuard(CProp(ALeRA(...)), PageHinkley(ph_lambda, rho)))"
        )
    return ""


def check_wrappable(wrapper: str, optimizer: Optimizer) -> None:
    """Raise a ValueError if ``wrapper`` (``"CProp"`` or ``"CatastropheGuard"``) may not wrap
    ``optimizer`` (see Note [the order of the composition]).

    Examples:
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> check_wrappable("CProp", torch.optim.SGD([p], lr=0.1))  # fine
        >>> check_wrappable("CProp", ss.CatastropheGuard(torch.optim.SGD([p], lr=0.1)))
        Traceback (most recent call last):
        ...
        ValueError: CProp cannot wrap CatastropheGuard: ... CatastropheGuard(CProp(base))...
    """
    for depth, layer in enumerate(layers(optimizer)):
        role = _role(layer)
        name = type(layer).__name__
        where = "" if depth == 0 else f" (found inside {type(optimizer).__name__})"
        if role == "stabilized":
            arg = "cprop" if wrapper == "CProp" else "guard"
            raise ValueError(
                f"{wrapper} cannot wrap a Stabilized optimizer{where}: ss.stabilize already "
                f"composed ALRC, the guard and CProp in the right order; pass {arg}=... to "
                "ss.stabilize instead"
            )
        if role == "guard" and wrapper == "CProp":
            kind = "" if name == "CatastropheGuard" else ", a CatastropheGuard"
            raise ValueError(
                f"CProp cannot wrap {name}{where}{kind}: CProp snapshots the "
                "parameters before the inner step and scales what changed after it, so on an "
                "alarm it would scale the guard's rollback and half-undo it (and it would not "
                "pass loss= on to the guard). Wrap the guard outside: "
                f"CatastropheGuard(CProp(base)){_salera_hint(layer)}, or let "
                "ss.stabilize(base) compose them"
            )
        if role == "guard" and wrapper == "CatastropheGuard":
            raise ValueError(
                f"optimizer is already a CatastropheGuard ({name}{where}); a second guard would "
                "watch the same loss and roll back twice: wrap the base optimizer once"
            )
        if role == "cprop" and wrapper == "CProp":
            raise ValueError(
                f"optimizer already applies CProp ({name}{where}); CProp twice would scale "
                f"every update by s twice: use {name} alone, or wrap the base optimizer once, "
                "CProp(base)"
            )
