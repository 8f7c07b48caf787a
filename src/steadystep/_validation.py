"""Argument checks shared by every public class.

Each check names the argument, shows the value and states the rule, and is written so that
NaN fails it (``not (lo <= x < hi)`` is True for NaN).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "check_betas",
    "check_bool",
    "check_choice",
    "check_finite",
    "check_foreach_fused",
    "check_loss",
    "check_nonnegative",
    "check_optional_bool",
    "check_param_tensors",
    "check_positive",
    "check_probability",
    "check_unit_interval",
]


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {name}={value!r}")
    return float(value)


def check_finite(name: str, value: Any) -> float:
    """``value`` must be a finite real number."""
    x = _as_float(name, value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {name}={value}")
    return x


def check_positive(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """``value > 0`` (and finite unless ``allow_inf``)."""
    x = _as_float(name, value)
    if not (x > 0.0) or (not allow_inf and math.isinf(x)):
        rule = "> 0" if allow_inf else "> 0 and finite"
        raise ValueError(f"{name} must be {rule}, got {name}={value}")
    return x


def check_nonnegative(name: str, value: Any) -> float:
    """``0 <= value < inf``."""
    x = _as_float(name, value)
    if not (0.0 <= x < math.inf):
        raise ValueError(f"{name} must be >= 0 and finite, got {name}={value}")
    return x


def check_unit_interval(name: str, value: Any) -> float:
    """``0 <= value < 1``: decay rates of moving averages."""
    x = _as_float(name, value)
    if not (0.0 <= x < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {name}={value}")
    return x


def check_probability(name: str, value: Any) -> float:
    """``0 < value <= 1``: rates and factors that must leave something."""
    x = _as_float(name, value)
    if not (0.0 < x <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {name}={value}")
    return x


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` must be one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {name}={value!r}")
    return value


def check_param_tensors(params: Iterable[torch.Tensor], owner: str) -> None:
    """Parameters must be real floating-point tensors (no complex, no integer)."""
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"{owner} got a parameter of type {type(p).__name__}; expected a Tensor"
            )
        if p.is_complex():
            raise ValueError(
                f"{owner} does not support complex parameters (dtype={p.dtype}); "
                "view them as real with torch.view_as_real"
            )
        if not p.is_floating_point():
            raise ValueError(f"{owner} needs floating-point parameters, got dtype={p.dtype}")


def check_loss(owner: str, loss: Any, name: str = "loss") -> None:
    """``loss`` is None, a real number (not a bool) or a real-valued tensor (not complex, not
    bool), as every ``step(loss=...)`` takes it; else a TypeError naming the argument."""
    if loss is None:
        return
    if isinstance(loss, torch.Tensor):
        ok = not (loss.is_complex() or loss.dtype == torch.bool)
    else:
        ok = isinstance(loss, numbers.Real) and not isinstance(loss, bool)
    if not ok:
        kind = f"a {loss.dtype} tensor" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(
            f"{owner}: {name} must be a real number or a tensor, got {name}={loss!r} ({kind}); "
            "pass the minibatch loss, e.g. loss.detach()"
        )


def check_scalar_loss(owner: str, loss: Any, name: str = "loss") -> None:
    """:func:`check_loss`, and a tensor must hold one number: a guard watches the minibatch
    loss, so a per-sample loss is a mistake, said clearly."""
    check_loss(owner, loss, name)
    if isinstance(loss, torch.Tensor) and loss.numel() != 1:
        raise ValueError(
            f"{owner} watches the minibatch loss, a scalar; got a loss of shape "
            f"{tuple(loss.shape)} (per-sample losses?): pass their mean, e.g. "
            "opt.step(loss=per_sample.mean().detach()), or give them to opt.clip() when "
            "built by ss.stabilize"
        )


def check_bool(name: str, value: Any) -> bool:
    """``value`` is True or False (not 0, 1, None or a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {name}={value!r}")
    return value


def check_optional_bool(name: str, value: Any) -> bool | None:
    """``value`` is None, True or False (``foreach``, ``fused``: None picks the default)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be None, True or False, got {name}={value!r}")
    return value


def check_foreach_fused(foreach: Any, fused: Any) -> None:
    """``foreach`` and ``fused`` each None, True or False, and not both True (they pick
    different implementations)."""
    check_optional_bool("foreach", foreach)
    check_optional_bool("fused", fused)
    if foreach and fused:
        raise ValueError(
            "foreach and fused pick different implementations and cannot both be True, "
            f"got foreach={foreach!r}, fused={fused!r}"
        )


def check_betas(name: str, value: Any) -> tuple[float, float]:
    """``value`` is a pair ``(beta1, beta2)``, each in [0, 1)."""
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {name}={value!r}")
    if len(value) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {name}={value!r}")
    return (
        check_unit_interval(f"{name}[0]", value[0]),
        check_unit_interval(f"{name}[1]", value[1]),
    )


def check_count(name: str, value: Any, rule: str | None = None, *, low: int = 1) -> int:
    """``value`` is an int >= ``low`` (not a bool); else a ValueError naming ``name`` and the
    rule (``rule`` words it otherwise, e.g. "an int >= 1 or None")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be {rule or f'an int >= {low}'}, got {name}={value!r}")
    return value
