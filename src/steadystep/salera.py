"""SALeRA and SPALeRA: ALeRA inside a :class:`~steadystep.CatastropheGuard`.

Schoenauer Sebag, Schoenauer & Sebag, "Stochastic Gradient Descent: Going As Fast As Possible
But Not Faster": SALeRA (Algorithm 1) is ALeRA's agnostic learning-rate adaptation
(:class:`~steadystep.ALeRA`) with catastrophe detection and recovery, which is
:class:`~steadystep.CatastropheGuard`; SPALeRA (Algorithm 2) is the same with one learning
rate per element. Both classes are those two pieces composed, with the paper's defaults in
their signatures. The paper detects with a Page-Hinkley test
(:class:`~steadystep.PageHinkleyPaper`, one argument away: ``ph_lambda=`` or ``rho=``); the
default is :class:`~steadystep.SpikeDetector`, which the spike benchmark shows catching far
more bad updates on decaying losses (``docs/detectors.md``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from steadystep._validation import check_positive
from steadystep.detectors import PageHinkleyPaper, SpikeDetector
from steadystep.detectors.protocol import ChangeDetector
from steadystep.guard import CatastropheGuard
from steadystep.optim.alera import ALeRA

__all__ = ["SALeRA", "SPALeRA"]


def _salera_detector(
    detector: ChangeDetector | None, ph_lambda: float | None, rho: float | None
) -> ChangeDetector:
    """SALeRA's detector: ``detector``, else the paper's Page-Hinkley test when ``ph_lambda`` or
    ``rho`` is given, else the default :class:`~steadystep.SpikeDetector`."""
    paper = ph_lambda is not None or rho is not None
    if detector is not None and paper:
        raise ValueError(
            "pass either detector=... or ph_lambda/rho (the paper's Page-Hinkley test), not "
            f"both; got detector={detector!r}, ph_lambda={ph_lambda}, rho={rho}"
        )
    if detector is not None:
        return detector
    if paper:
        return PageHinkleyPaper(
            ph_lambda=0.1 if ph_lambda is None else ph_lambda, rho=0.01 if rho is None else rho
        )
    return SpikeDetector()


class SALeRA(CatastropheGuard):
    """SALeRA (Algorithm 1): :class:`~steadystep.ALeRA` inside a
    :class:`~steadystep.CatastropheGuard`, with the paper's robust defaults
    ``alpha=0.01, C=3e-6``.

    Equivalent to ``CatastropheGuard(ALeRA(params, lr, alpha=alpha, C=C, ...), detector,
    lr_factor=lr_factor, backtrack=backtrack, min_lr=min_lr)``; every step is sync-free (Note
    [host syncs] of :mod:`steadystep.guard`). ``opt.optimizer`` is the ALeRA inside.

    The detector: ``detector`` when given; else the paper's Page-Hinkley test,
    ``PageHinkleyPaper(ph_lambda, rho)``, when ``ph_lambda`` or ``rho`` is given (the one not
    given takes the paper's value: 0.1, and 0.01 for ``rho``, which the paper sets to
    ``batch_size / dataset_size``); else :class:`~steadystep.SpikeDetector` ``()``, the
    benchmark's best (``docs/detectors.md`` says where and why it departs from the paper).
    ``fused`` and ``foreach`` pick ALeRA's path (:class:`~steadystep.ALeRA`).

    Examples:
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
        ph_lambda: float | None = None,
        rho: float | None = None,
        detector: ChangeDetector | None = None,
        lr_factor: float = 0.5,
        backtrack: bool = True,
        min_lr: float = 1e-15,
        snapshot_device: torch.device | str | None = None,
        check_every: int = 100,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_positive("lr", lr)
        detector = _salera_detector(detector, ph_lambda, rho)
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
            detector,
            lr_factor=lr_factor,
            backtrack=backtrack,
            min_lr=min_lr,
            snapshot_device=snapshot_device,
            check_every=check_every,
            # the paper's recovery: every alarm rolls the weights back one step and cuts,
            # for good (Note [the ladder] in steadystep.ladder)
            response="rollback",
            recover_every=None,
            rollback="params",
        )


class SPALeRA(SALeRA):
    """SPALeRA (Algorithm 2): SALeRA with one learning rate per element
    (``granularity="param"``) and the paper's defaults ``alpha=0.1, C=3e-8``.

    Same arguments as :class:`SALeRA` except ``granularity``, which is ``"param"`` by
    definition (a SPALeRA with another granularity is a SALeRA: use that class).

    Examples:
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
        ph_lambda: float | None = None,
        rho: float | None = None,
        detector: ChangeDetector | None = None,
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
            detector=detector,
            lr_factor=lr_factor,
            backtrack=backtrack,
            min_lr=min_lr,
            snapshot_device=snapshot_device,
            check_every=check_every,
            foreach=foreach,
            fused=fused,
        )
