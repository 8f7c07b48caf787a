"""Param groups by layer: the unit of the paper's layer-wise learning rates."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["layer_groups"]


def layer_groups(model: torch.nn.Module, **group_kwargs: Any) -> list[dict[str, Any]]:
    """One param group per module that directly owns parameters (weight and bias together).

    This is the paper's "layer": with ``granularity="group"`` (the default of
    :class:`~steadystep.ALeRA` and :class:`~steadystep.AgAdam`) every layer gets its own
    learning-rate multiplier. Parameters that do not require grad are left out, a parameter
    shared by several modules is placed once (with its first owner), and each group carries
    the module's qualified name under ``"name"`` (``"<root>"`` for the model itself).

    Args:
        model: the module to split.
        **group_kwargs: extra keys copied into every group (e.g. ``weight_decay=1e-4``).

    Examples:
        >>> import torch, steadystep as ss
        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> [(g["name"], len(g["params"])) for g in ss.layer_groups(model)]
        [('0', 2), ('2', 2)]
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"layer_groups needs a torch.nn.Module, got {type(model).__name__}")
    seen: set[int] = set()
    groups = []
    for name, module in model.named_modules():
        params = []
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        if params:
            groups.append({"params": params, "name": name or "<root>", **group_kwargs})
    if not groups:
        raise ValueError("layer_groups found no parameter that requires grad in the model")
    return groups
