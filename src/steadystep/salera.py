"""SALeRA and SPALeRA: ALeRA inside a Page-Hinkley :class:`~steadystep.CatastropheGuard`.

Schoenauer Sebag, Schoenauer & Sebag, "Stochastic Gradient Descent: Going As Fast As Possible
But Not Faster": SALeRA (Algorithm 1) is ALeRA's agnostic learning-rate adaptation
(:class:`~steadystep.ALeRA`) with its catastrophe detection and recovery, which is
:class:`~steadystep.CatastropheGuard` with a :class:`~steadystep.PageHinkley` detector; SPALeRA
(Algorithm 2) is the same with one learning rate per element. Both classes are those two
pieces composed, with the paper's defaults in their signatures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from steadystep._validation import check_positive
from steadystep.detect import PageHinkley
from steadystep.guard import CatastropheGuard
from steadystep.optim.alera import ALeRA

__all__ = ["SALeRA", "SPALeRA"]


class SALeRA(CatastropheGuard):
    """SALeRA (Algorithm 1): :class:`~steadystep.ALeRA` inside a Page-Hinkley
    :class:`~steadystep.CatastropheGuard`, with the paper's robust defaults ``alpha=0.01, C=3e-6``.

    Equivalent to ``CatastropheGuard(ALeRA(params, lr, alpha=alpha, C=C, ...),
    PageHinkley(ph_lambda, rho), lr_factor=lr_factor, backtrack=backtrack, min_lr=min_lr)``;
    every step is sync-free (Note [host syncs] of :mod:`steadystep.guard`). ``rho`` is
    ``batch_size / dataset_size`` in the paper. ``opt.optimizer`` is the ALeRA inside.

    Example:
        >>> import torch, steadystep as ss
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = ss.SALeRA(ss.layer_groups(model), lr=0.1)
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> loss.backward()
        >>> _ = opt.step(loss=loss.detach())
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        alpha: float = 0.01,
        C: float = 3e-6,
        granularity: str = "group",
        weight_decay: float = 0.0,
        norm_eps: float = 1e-6,
        ph_lambda: float = 0.1,
        rho: float = 0.01,
        lr_factor: float = 0.5,
        backtrack: bool = True,
        min_lr: float = 1e-15,
        snapshot_device: torch.device | str | None = None,
        check_every: int = 100,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_positive("lr", lr)
        base = ALeRA(
            params,
            lr,
            alpha=alpha,
            C=C,
            granularity=granularity,
            weight_decay=weight_decay,
            norm_eps=norm_eps,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(
            base,
            PageHinkley(ph_lambda=ph_lambda, rho=rho),
            lr_factor=lr_factor,
            backtrack=backtrack,
            min_lr=min_lr,
            snapshot_device=snapshot_device,
            check_every=check_every,
        )


class SPALeRA(SALeRA):
    """SPALeRA (Algorithm 2): SALeRA with one learning rate per element
    (``granularity="param"``) and the paper's defaults ``alpha=0.1, C=3e-8``.

    Same arguments as :class:`SALeRA` except ``granularity``, which is ``"param"`` by
    definition (a SPALeRA with another granularity is a SALeRA: use that class).

    Example:
        >>> import torch, steadystep as ss
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = ss.SPALeRA(model.parameters(), lr=0.1)
        >>> opt.optimizer.granularity
        'param'
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        alpha: float = 0.1,
        C: float = 3e-8,
        weight_decay: float = 0.0,
        norm_eps: float = 1e-6,
        ph_lambda: float = 0.1,
        rho: float = 0.01,
        lr_factor: float = 0.5,
        backtrack: bool = True,
        min_lr: float = 1e-15,
        snapshot_device: torch.device | str | None = None,
        check_every: int = 100,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            alpha=alpha,
            C=C,
            granularity="param",
            weight_decay=weight_decay,
            norm_eps=norm_eps,
            ph_lambda=ph_lambda,
            rho=rho,
            lr_factor=lr_factor,
            backtrack=backtrack,
            min_lr=min_lr,
            snapshot_device=snapshot_device,
            check_every=check_every,
            foreach=foreach,
            fused=fused,
        )
