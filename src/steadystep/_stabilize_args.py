"""How :func:`~steadystep.stabilize` reads its arguments: each ``alrc=`` / ``guard=`` /
``cprop=`` value checked and turned into what is to be built, before anything is built (a
refused call leaves the caller's optimizer as it was)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from steadystep.alrc import ALRC
from steadystep.escalation import Escalation
from steadystep.guard import CatastropheGuard

__all__ = [
    "CPROP_KEYS",
    "GUARD_KEYS",
    "build_alrc",
    "build_guard",
    "check_device",
    "check_keys",
    "check_sizes",
    "configure_detector",
    "detector_devices",
    "devices_of",
    "guard_kwargs",
    "setting_kind",
    "tensor_devices",
]

CPROP_KEYS = ("beta", "c", "eps", "cdf", "method", "fused")
GUARD_KEYS = (
    "detector",
    "lr_factor",
    "backtrack",
    "min_lr",
    "snapshot_device",
    "check_every",
    "response",
    "recover_every",
    "rollback",
    "accept_after",
    "escalation",
)


def configure_detector(detector: Any, *, batch_size: int, dataset_size: int) -> None:
    """Set what a change detector derives from the batch and dataset sizes.

    A detector that defines ``configure(*, batch_size, dataset_size)`` is asked through it (the
    hook for detectors whose settings depend on the data); a :class:`~steadystep.PageHinkley`
    gets ``rho = batch_size / dataset_size``, the weight of its loss average in the paper (the
    fraction of the data one step sees); any other detector needs nothing and is left alone.
    Both sizes count samples per optimizer step over all ranks (the global batch).

    Examples:
        >>> ph = ss.PageHinkley()
        >>> configure_detector(ph, batch_size=32, dataset_size=1024)
        >>> ph.rho
        0.03125
    """
    check_sizes(batch_size, dataset_size)
    hook = getattr(detector, "configure", None)
    if callable(hook):
        hook(batch_size=batch_size, dataset_size=dataset_size)


def check_sizes(batch_size: Any, dataset_size: Any) -> None:
    for name, value in (("batch_size", batch_size), ("dataset_size", dataset_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
    if batch_size > dataset_size:
        raise ValueError(
            "batch_size must be at most dataset_size (one step sees a fraction of the data), "
            f"got batch_size={batch_size}, dataset_size={dataset_size}"
        )


def devices_of(params: list[Tensor]) -> list[torch.device]:
    return sorted({p.device for p in params}, key=str)


def tensor_devices(obj: Any) -> set[torch.device]:
    if isinstance(obj, Tensor):
        return {obj.device}
    if isinstance(obj, Mapping):
        return set().union(*(tensor_devices(v) for v in obj.values())) if obj else set()
    return set()


def check_device(what: str, found: set[torch.device], devices: list[torch.device]) -> None:
    """Statistics must live beside the parameters (a CPU detector may move at first use)."""
    stray = sorted((d for d in found if d not in devices), key=str)
    if stray and not (what == "guard's detector" and all(d.type == "cpu" for d in stray)):
        raise ValueError(
            f"{what} are on {', '.join(map(str, stray))} but the parameters are on "
            f"{', '.join(map(str, devices))}: move it to the parameters' device first "
            "(e.g. alrc.to(device)), or build the optimizer after moving the model"
        )


def build_alrc(alrc: Any, params: list[Tensor], devices: list[torch.device]) -> ALRC | None:
    """The ALRC module that ``alrc=`` asks for (checked, on the parameters' device)."""
    kind = setting_kind(alrc, "alrc", "ALRC's settings")
    if kind == "off":
        return None
    if isinstance(alrc, ALRC):
        check_device("alrc's moments", {b.device for b in alrc.buffers()}, devices)
        return alrc
    if kind == "object":
        raise TypeError(
            "alrc must be True, False, a dict of ALRC's settings or an ALRC, got "
            f"alrc={type(alrc).__name__}"
        )
    settings = {} if kind == "on" else dict(alrc)
    try:
        built = ALRC(**settings)
    except TypeError as e:
        raise TypeError(f"alrc got settings ALRC does not take: {e}") from None
    # Where the loss is: beside the last parameter (the output layer of a split model).
    return built.to(params[-1].device)


def guard_kwargs(
    guard: Any,
    given: CatastropheGuard | None,
    batch_size: int | None,
    devices: list[torch.device],
    model: torch.nn.Module | None = None,
    escalation: Escalation | None = None,
) -> dict[str, Any] | None:
    """CatastropheGuard's arguments for ``guard=`` with stabilize's ``model=`` and
    ``escalation=`` (checked), or None when none is to be built."""
    kind = setting_kind(guard, "guard", "CatastropheGuard's settings")
    if escalation is not None:
        if not isinstance(escalation, Escalation):
            raise TypeError(f"escalation must be an ss.Escalation, got {escalation!r}")
        if given is not None or kind == "off":
            raise ValueError(
                "escalation is a rung of the guard that stabilize builds: "
                + (
                    f"optimizer is already a {type(given).__name__}; build it with "
                    "escalation=... instead"
                    if given is not None
                    else f"guard must not be off, got guard={guard!r}"
                )
            )
        if kind == "settings" and "escalation" in guard:
            raise ValueError("escalation given twice: as escalation= and in guard={...}")
    if given is not None:
        if kind != "on":
            raise ValueError(
                f"optimizer is already a CatastropheGuard ({type(given).__name__}), so guard "
                f"must be True (it is used as built), got guard={guard!r}"
            )
        if batch_size is not None:
            raise ValueError(
                "batch_size and dataset_size configure the detector of a guard that stabilize "
                f"builds; {type(given).__name__} was built with its own: set rho there (e.g. "
                "PageHinkley(rho=batch_size / dataset_size)), or pass the unguarded optimizer"
            )
        check_device("the guard's counters", {given.alarms.device}, devices)
        return None
    if kind == "off":
        return None
    if kind == "object":
        kwargs: dict[str, Any] = {"detector": guard}
    elif kind == "settings":
        kwargs = check_keys("guard", guard, GUARD_KEYS)
    else:
        kwargs = {}
    detector = kwargs.get("detector")
    if detector is not None:
        if not callable(getattr(detector, "update", None)):
            raise TypeError(
                "guard's detector needs an update(loss) -> alarm method, got "
                f"{type(detector).__name__}"
            )
        check_device("guard's detector", detector_devices(detector), devices)
    if model is not None:
        kwargs["model"] = model
    if escalation is not None:
        kwargs["escalation"] = escalation
    return kwargs


def build_guard(
    optimizer: Any, settings: dict[str, Any], batch_size: int | None, dataset_size: int | None
) -> CatastropheGuard:
    """The guard around ``optimizer`` with :func:`guard_kwargs`'s settings, its detector
    configured from the sizes when given."""
    guard = CatastropheGuard(optimizer, **settings)
    if batch_size is not None and dataset_size is not None:
        configure_detector(guard.detector, batch_size=batch_size, dataset_size=dataset_size)
    return guard


def setting_kind(value: Any, name: str, what: str) -> str:
    """``"off"``, ``"on"`` (True: defaults), ``"settings"`` (a dict) or ``"object"``."""
    if value is None or value is False:
        return "off"
    if value is True:
        return "on"
    if isinstance(value, Mapping):
        return "settings"
    if isinstance(value, (bool, int, float, str)):
        raise TypeError(f"{name} must be True, False, a dict of {what} or an object, got {value!r}")
    return "object"


def check_keys(name: str, settings: Mapping[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"{name} got unknown settings {unknown}; the settings are {list(allowed)}")
    return dict(settings)


def detector_devices(detector: Any) -> set[torch.device]:
    """The devices of a detector's state (through its ``state_dict()``, when it has one)."""
    state_dict = getattr(detector, "state_dict", None)
    return tensor_devices(state_dict()) if callable(state_dict) else set()
