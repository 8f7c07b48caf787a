"""Checks of a checkpoint before anything is loaded: the class that wrote it, its keys, shapes.

Every steadystep ``load_state_dict`` (the native CProp classes, the CProp wrapper, ALeRA and
AgAdam, the guard and the detector) validates the whole dict first and only then changes
anything, so a checkpoint of another class, another model or another format fails at load time
with a ValueError that names what was expected and what was found, and leaves the object as it
was. Nothing missing is rebuilt silently.

Note [class tag]: each ``state_dict()`` records the steadystep class whose format it is under
:data:`CLASS_KEY` (``"CPropAdamW"``, ``"ALeRA"``, ``"CatastropheGuard"``, ...; a subclass that
keeps the format keeps the name, so SALeRA's checkpoint is a ``"CatastropheGuard"`` one). The
tag is optional on load: checkpoints written before it existed, and dicts rebuilt by tools that
keep only ``state`` and ``param_groups`` (``torch.distributed.checkpoint``), are checked by
their keys and shapes alone.

Note [what a load checks]: besides the class, keys and shapes, every tensor of a checkpoint's
state is checked for what the optimizer itself would hold: its dtype is the one the optimizer
creates (statistics of bf16 parameters are fp32, and a bf16-cast checkpoint would give NaN
parameters at the first step or mixed dtypes that crash it, so another dtype is refused, not
cast; a Python-number ``step`` of an old torch checkpoint is the one exception, converted
exactly to the float32 count), its values are finite (:func:`check_finite`: an inf moment would
put non-finite values into the parameters), and second moments, variances and counts are not
negative (:data:`NONNEGATIVE_KEYS`). A ``format`` field names a layout this version reads
(:func:`check_format`). Composites (the guard, :class:`~steadystep.Stabilized`) check every
component (:func:`check_optimizer_state`) before they load any.

Examples:
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> sd = ss.CPropAdamW([p]).state_dict()
    >>> sd["class"]
    'CPropAdamW'
    >>> ss.CPropSGD([p]).load_state_dict(sd)
    Traceback (most recent call last):
    ...
    ValueError: CPropSGD.load_state_dict: this state_dict was saved by CPropAdamW, expected ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "CLASS_KEY",
    "NONNEGATIVE_KEYS",
    "Kind",
    "check_class",
    "check_dtype",
    "check_finite",
    "check_format",
    "check_groups",
    "check_optimizer_state",
    "check_param_state",
    "check_same",
    "check_shape",
    "check_state_values",
    "step_tensor",
]

CLASS_KEY = "class"

# What a per-parameter state entry must be: shaped like its parameter, or a 0-d count/scalar
# (a Python number is accepted for "scalar": old torch checkpoints keep ``step`` as a float).
Kind = Literal["param", "scalar"]

# State entries that are second moments, variances, absolute values or counts: never negative
# (steadystep's and torch.optim's names).
NONNEGATIVE_KEYS = frozenset(
    {
        "step",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "cprop_exp_avg_sq",
        "cprop_exp_avg_abs",
        "lr_multiplier",
        "skipped_steps",
        "square_avg",
        "sum",
        "acc_delta",
    }
)


def _names(keys: Iterable[Any]) -> str:
    return ", ".join(repr(k) for k in sorted(keys, key=str)) or "none"


def check_class(
    state_dict: Any,
    *,
    owner: str,
    expected: str,
    required: Iterable[str] = (),
    what: str = "the state_dict",
) -> None:
    """``state_dict`` is a dict, its class tag (when present) is ``expected`` and it has the
    keys ``required``; ``what`` names it in the message (a nested part of a checkpoint)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"{owner}.load_state_dict: {what} must be a dict returned by state_dict(), got "
            f"{type(state_dict).__name__}"
        )
    found = state_dict.get(CLASS_KEY)
    if found is not None and found != expected:
        raise ValueError(
            f"{owner}.load_state_dict: this state_dict was saved by {found}, expected one saved "
            f"by {expected}"
        )
    required = tuple(required)
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(
            f"{owner}.load_state_dict: {what} lacks {_names(missing)}, so it was not saved by "
            f"{expected} (expected the keys {_names(required)}, found {_names(state_dict)})"
        )


def check_same(name: str, found: Any, expected: Any, *, owner: str) -> None:
    """A setting recorded in the checkpoint (``found``) equals this object's (``expected``)."""
    if found is not None and found != expected:
        raise ValueError(
            f"{owner}.load_state_dict: the state_dict was saved with {name}={found!r}, this "
            f"{owner} has {name}={expected!r}"
        )


def check_groups(
    saved_groups: Any,
    groups: list[dict[str, Any]],
    *,
    owner: str,
    required: Iterable[str],
) -> dict[Any, tuple[Tensor, dict[str, Any]]]:
    """Saved param groups match ``groups`` in number and sizes and hold every key in
    ``required``; returns ``{saved parameter id: (parameter, saved group)}``."""
    required = tuple(required)
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        found = len(saved_groups) if isinstance(saved_groups, list) else type(saved_groups)
        raise ValueError(
            f"{owner}.load_state_dict: the state_dict has {found} param groups, this optimizer "
            f"has {len(groups)}"
        )
    out: dict[Any, tuple[Tensor, dict[str, Any]]] = {}
    for gi, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        if not isinstance(saved, Mapping) or "params" not in saved:
            raise ValueError(f"{owner}.load_state_dict: param group {gi} is not a param group")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{owner}.load_state_dict: param group {gi} has {len(saved['params'])} "
                f"parameters in the state_dict, {len(group['params'])} in this optimizer"
            )
        missing = [key for key in required if key not in saved]
        if missing:
            raise ValueError(
                f"{owner}.load_state_dict: param group {gi} of the state_dict lacks "
                f"{_names(missing)} (found {_names(k for k in saved if k != 'params')}); it was "
                f"not saved by {owner}"
            )
        for saved_id, p in zip(saved["params"], group["params"], strict=True):
            out[saved_id] = (p, saved)
    return out


def check_shape(value: Any, kind: Kind, param: Tensor, *, owner: str, where: str) -> None:
    """``value`` is a tensor shaped like ``param`` (``kind="param"``) or a 0-d tensor or real
    number (``kind="scalar"``)."""
    if kind == "scalar":
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if is_number or (isinstance(value, Tensor) and value.dim() == 0):
            return
        found = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{owner}.load_state_dict: {where} must be 0-d, found {found}")
    if not isinstance(value, Tensor):
        raise ValueError(
            f"{owner}.load_state_dict: {where} must be a tensor of shape {tuple(param.shape)}, "
            f"found {type(value).__name__}"
        )
    if value.shape != param.shape:
        raise ValueError(
            f"{owner}.load_state_dict: {where} has shape {tuple(value.shape)}, but the parameter "
            f"has shape {tuple(param.shape)} (a checkpoint of another model?)"
        )


def check_param_state(
    saved_state: Any,
    params: Mapping[Any, tuple[Tensor, dict[str, Any]]],
    spec: Callable[[dict[str, Any]], Mapping[str, tuple[Kind, bool]]],
    *,
    owner: str,
    what: str = "state",
    dtype: Callable[[str, Tensor], torch.dtype | None] | None = None,
) -> None:
    """Every entry of ``saved_state`` (keyed by saved parameter id) belongs to a parameter of
    ``params`` (:func:`check_groups`) and matches ``spec(saved group)``: ``{key: (kind,
    required)}``; a required key that is missing, or an entry of the wrong shape, is an error.
    Every value is finite and not negative where its key says so (:func:`check_state_values`);
    with ``dtype``, a tensor under a key of ``spec`` has the dtype ``dtype(key, param)`` (None:
    not checked)."""
    if not isinstance(saved_state, Mapping):
        raise ValueError(f"{owner}.load_state_dict: {what} must be a dict, found {saved_state!r}")
    for key, entry in saved_state.items():
        if key not in params:
            raise ValueError(
                f"{owner}.load_state_dict: {what} has an entry for parameter {key!r}, which no "
                "param group of the state_dict lists"
            )
        param, group = params[key]
        if not isinstance(entry, Mapping):
            raise ValueError(f"{owner}.load_state_dict: {what}[{key!r}] must be a dict")
        where = f"{what}[{key!r}] (a parameter of shape {tuple(param.shape)})"
        expected = spec(group)
        missing = [k for k, (_, required) in expected.items() if required and k not in entry]
        if missing:
            raise ValueError(
                f"{owner}.load_state_dict: {where} lacks {_names(missing)} (expected "
                f"{_names(k for k, (_, r) in expected.items() if r)}, found {_names(entry)}); "
                "it was not saved by this optimizer's class and settings"
            )
        for k, (kind, _) in expected.items():
            if k in entry:
                check_shape(entry[k], kind, param, owner=owner, where=f"{where}[{k!r}]")
                want = None if dtype is None else dtype(k, param)
                if want is not None:
                    check_dtype(entry[k], want, owner=owner, where=f"{where}[{k!r}]")
        check_state_values(entry, owner=owner, where=where)


def check_format(found: Any, known: Iterable[Any], *, owner: str, what: str = "format") -> None:
    """``found`` (a checkpoint's format field) is one of the ``known`` formats this version
    reads."""
    known = tuple(known)
    if found not in known or isinstance(found, bool):
        raise ValueError(
            f"{owner}.load_state_dict: the state_dict has {what}={found!r}, this version of "
            f"steadystep reads {what} {' or '.join(repr(k) for k in known)} (a checkpoint "
            "written by a newer steadystep, or edited?)"
        )


def check_dtype(value: Any, expected: torch.dtype, *, owner: str, where: str) -> None:
    """``value`` (a tensor) has the dtype the optimizer creates for it (Note [what a load
    checks]: another dtype is refused, not cast)."""
    if isinstance(value, Tensor) and value.dtype != expected:
        raise ValueError(
            f"{owner}.load_state_dict: {where} has dtype {value.dtype}, expected {expected} (the "
            "dtype this object creates for it; a cast checkpoint loses precision or mixes "
            "dtypes in the step): load the state_dict as it was saved"
        )


def check_finite(value: Any, *, owner: str, where: str, nonnegative: bool = False) -> None:
    """``value`` (a tensor or a real number) holds no NaN or inf and, with ``nonnegative``,
    nothing below 0 (one host read per tensor: loads are rare)."""
    if isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool or value.numel() == 0:
            return
        values = value.detach()
        if hasattr(values, "to_local"):  # a DTensor: this rank's shard
            values = values.to_local()
        bad_finite = values.is_floating_point() and not bool(torch.isfinite(values).all())
        bad_sign = nonnegative and not bad_finite and bool((values < 0).any())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        bad_finite = not math.isfinite(value)
        bad_sign = nonnegative and not bad_finite and value < 0
    else:
        return
    if bad_finite:
        raise ValueError(
            f"{owner}.load_state_dict: {where} holds non-finite values (NaN or inf), expected "
            "finite statistics; the run that wrote it had diverged, or the file is corrupt"
        )
    if bad_sign:
        raise ValueError(
            f"{owner}.load_state_dict: {where} holds negative values, expected values >= 0 (a "
            "second moment, variance or count); the file is corrupt or edited"
        )


def check_state_values(entry: Mapping[Any, Any], *, owner: str, where: str) -> None:
    """Every tensor or number of a per-parameter state ``entry`` is finite, and those under
    :data:`NONNEGATIVE_KEYS` are not negative."""
    for key, value in entry.items():
        nonnegative = key in NONNEGATIVE_KEYS
        check_finite(value, owner=owner, where=f"{where}[{key!r}]", nonnegative=nonnegative)


def check_optimizer_state(optimizer: Any, state_dict: Any, *, owner: str) -> None:
    """Check ``state_dict`` for ``optimizer`` without loading it: its own ``check_state_dict``
    (every steadystep class has one), else, for any other optimizer, the finite and sign checks
    of its per-parameter ``state`` (its own ``load_state_dict`` checks the rest)."""
    check = getattr(optimizer, "check_state_dict", None)
    if callable(check):
        check(state_dict)
        return
    state = state_dict.get("state") if isinstance(state_dict, Mapping) else None
    if isinstance(state, Mapping):
        for key, entry in state.items():
            if isinstance(entry, Mapping):
                check_state_values(entry, owner=owner, where=f"state[{key!r}]")


def step_tensor(value: Any, device: torch.device) -> Tensor:
    """A saved step count as the 0-d float32 tensor the steps update in place (a Python
    number, as in old torch checkpoints, becomes one, as torch's optimizers convert it)."""
    if isinstance(value, Tensor):
        return value.detach().to(device=device, copy=True)
    return torch.tensor(float(value), dtype=torch.float32, device=device)
