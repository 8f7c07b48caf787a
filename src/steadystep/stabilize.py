r"""One object that stabilizes a training loop: ALRC, the catastrophe guard and CProp, composed.

In the spirit of ``optax.chain``: :func:`stabilize` takes any ``torch.optim.Optimizer`` and returns
a :class:`Stabilized` optimizer that applies, from the loss to the parameters,

.. math::
    \tilde L_i &= \mathrm{ALRC}(L_i)
        \quad\text{(per-sample losses; the gradient comes from } \operatorname{mean}\tilde L_i)\\
    L &= \operatorname{mean} L_i \quad\text{(the raw loss: what the guard's detector watches)}\\
    A_t &: \ \theta \leftarrow \theta_b,\ \eta \leftarrow \texttt{lr\_factor}\cdot\eta
        \quad\text{(an alarm: roll back, cut the rate, no update)}\\
    \neg A_t &: \ \theta_b \leftarrow \theta,\
        \theta \leftarrow \theta + s \odot \Delta_{\text{base}}(g)
        \quad\text{(CProp's scale } s \text{ on the base optimizer's update)}

Note [the guard watches the raw loss]
    ALRC exists to bound what one bad batch does to the *gradient*; it also bounds the loss value
    (a clipped element's forward value is the threshold). A guard fed that clipped loss is blind
    to exactly the catastrophes it is for: after a gradient explosion has thrown the weights
    away, the raw loss is in the thousands while the clipped loss sits at ALRC's threshold, a
    few times the normal loss, so no alarm is raised and the damage is never rolled back (and
    the threshold, fed clipped values, creeps up until later alarms cut the rate to nothing).
    So the guard sees ``mean(L_i)`` of the *raw* per-sample losses and the gradient comes from
    the clipped ones. :meth:`Stabilized.clip` does both: it returns the clipped losses and
    remembers the raw mean for the next :meth:`Stabilized.step`, so the loop needs no extra
    argument and cannot hand the guard the wrong loss by accident.

Note [the recipe's defaults]
    The defaults are chosen on healthy runs (``benchmarks/bench_clean.py``, ``docs/clean.md``):
    at the plain optimizer's best learning rate a protection must cost nothing. The guard costs
    nothing until it alarms, so it is on. ALRC at 3 standard deviations clipped informative
    losses too and cost more than 0.5% in 3 of the 10 clean cells (at 5, in 1), and CProp damps
    every update (-38% on the autoencoder), so both are opt-in: ``alrc=True`` for losses with
    heavy tails or high powers (the ALRC paper's unstable quartic and small-batch runs),
    ``cprop=True`` for runs whose rate cannot be tuned or is pushed past the plain optimizer's
    best. :meth:`Stabilized.clip` masks non-finite losses either way.

The order (guard outermost, CProp in the middle, the base innermost) is the only one that works;
see Note [the order of the composition] in :mod:`steadystep.compose.order`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from steadystep._stabilize_args import (
    CPROP_KEYS,
    build_alrc,
    build_guard,
    check_keys,
    check_sizes,
    configure_detector,
    devices_of,
    guard_kwargs,
    setting_kind,
)
from steadystep._validation import check_scalar_loss
from steadystep.alrc import ALRC
from steadystep.checkpoint import check_format, check_optimizer_state
from steadystep.compose.order import Composable, layers
from steadystep.compose.wrapper import OptimizerWrapper
from steadystep.escalation import Escalation
from steadystep.guard import CatastropheGuard
from steadystep.optim.cprop import CProp
from steadystep.optim.cprop.convert import can_convert, is_native, native_for

__all__ = ["Stabilized", "configure_detector", "stabilize"]

_FORMAT = 1


class _LossWindow:
    """The raw loss handed from :meth:`Stabilized.clip` / ``observe_loss`` to the next step.

    Mutated in place, never rebound: Lightning's ``LightningOptimizer`` runs
    :meth:`Stabilized.clip` with itself as ``self`` and reads missing attributes from the real
    optimizer, so rebinding an attribute there would set it on the proxy and be lost.
    """

    def __init__(self) -> None:
        self.raw_sum: Tensor | None = None
        self.raw_count = 0
        self.observed: Tensor | float | None = None
        self.alrc_before: dict[str, Tensor] | None = None

    def clear(self) -> None:
        self.raw_sum, self.raw_count, self.observed = None, 0, None
        self.alrc_before = None

    def add_raw(self, raw: Tensor) -> None:
        self.raw_sum = raw if self.raw_sum is None else self.raw_sum + raw
        self.raw_count += 1

    def loss(self) -> Tensor | float | None:
        """The mean raw loss of the clip() calls since the last step, else the observed one."""
        if self.raw_sum is not None:
            return self.raw_sum / self.raw_count
        return self.observed


def params_of(optimizer: Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class Stabilized(OptimizerWrapper, Composable):
    """ALRC, a :class:`~steadystep.CatastropheGuard` and :class:`~steadystep.CProp` around an
    optimizer, as one ``torch.optim.Optimizer``; build it with :func:`stabilize` (same arguments).

    The loop::

        per_sample = F.cross_entropy(model(x), y, reduction="none")
        loss = opt.clip(per_sample).mean()   # ALRC; remembers mean(per_sample) for the guard
        opt.zero_grad()
        loss.backward()                      # the gradient of the clipped loss
        opt.step()                           # the guard watches the raw loss

    Attributes:
        alrc: the :class:`~steadystep.ALRC` module, or None. Calling it directly clips without
            remembering the raw loss; use :meth:`clip`.
        guard: the :class:`~steadystep.CatastropheGuard` (outermost), or None.
        cprop: the CProp layer (a native ``CPropSGD/Adam/AdamW`` or a ``CProp`` wrapper), or None.
        base: the innermost optimizer (the native class itself when CProp is native).
        optimizer: the outermost of guard, CProp, base: what ``param_groups``, ``state``,
            ``zero_grad`` and ``add_param_group`` delegate to. ``param_groups`` are the
            innermost optimizer's dicts, so an LR scheduler built on this object drives them.
        per_sample: does :meth:`clip` require unreduced losses?

    One :meth:`state_dict` holds every component (ALRC's moments, the guard with its detector
    and snapshot, CProp's statistics, the base optimizer's state); loading it into an object
    built the same way resumes bitwise. :meth:`stats` returns the components' statistics as
    0-d tensors under ``alrc/`` and ``guard/`` (``stats(per_parameter=True)``: also ``cprop/``
    and ``base/``, which reduce over every parameter).

    Examples:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = ss.Stabilized(torch.optim.SGD(model.parameters(), lr=0.1), cprop=False)
        >>> loss = opt.clip((model(torch.randn(8, 4)) - 1).pow(2).squeeze(1)).mean()
        >>> loss.backward()
        >>> _ = opt.step()
        >>> sd = opt.state_dict()  # flat, for torch.distributed.checkpoint
        >>> sorted(sd), sorted(sd["param_groups"][0]["stabilized"])
        (['class', 'param_groups', 'state'], ['alrc', 'stabilized', 'wrapped_keys'])
    """

    composition_role = "stabilized"  # Note [the order of the composition]
    stats_component = ""  # its stats() keys name their component (telemetry's Note [one naming])

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        alrc: bool | Mapping[str, Any] | ALRC | None = None,
        cprop: bool | Mapping[str, Any] | None = None,
        guard: bool | Mapping[str, Any] | Any = True,
        batch_size: int | None = None,
        dataset_size: int | None = None,
        per_sample: bool | None = None,
        native: bool = True,
        model: torch.nn.Module | None = None,
        escalation: Escalation | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer for stabilize to wrap, got "
                f"optimizer={type(optimizer).__name__}"
            )
        if (batch_size is None) != (dataset_size is None):
            raise ValueError(
                "batch_size and dataset_size must be given together (they set the detector's "
                f"rho = batch_size / dataset_size), got batch_size={batch_size}, "
                f"dataset_size={dataset_size}"
            )
        if batch_size is not None:
            check_sizes(batch_size, dataset_size)
        if per_sample is None:
            per_sample = batch_size != 1
        if not isinstance(per_sample, bool):
            raise TypeError(f"per_sample must be a bool, got per_sample={per_sample!r}")
        if not isinstance(native, bool):
            raise TypeError(f"native must be a bool, got native={native!r}")
        params = params_of(optimizer)
        if not params:
            raise ValueError(
                f"optimizer ({type(optimizer).__name__}) has no parameters: its param_groups "
                "hold no tensors; build it from model.parameters() of a model that has some"
            )
        devices = devices_of(params)

        # What the caller already built: a guard (outermost), then CProp, then the base.
        chain = list(layers(optimizer))
        for layer in chain:
            if isinstance(layer, Stabilized):
                raise ValueError(
                    "optimizer is already a Stabilized optimizer; pass its base optimizer to "
                    "ss.stabilize (it composes ALRC, the guard and CProp once)"
                )
        given_guard = chain[0] if isinstance(chain[0], CatastropheGuard) else None
        inner = given_guard.optimizer if given_guard is not None else optimizer
        given_cprop = inner if isinstance(inner, CProp) or is_native(inner) else None

        # Everything is checked before anything is built: a refused call leaves the caller's
        # optimizer as it was (building the native class takes over its param-group dicts).
        alrc_module = build_alrc(alrc, params, devices)
        guard_settings = guard_kwargs(guard, given_guard, batch_size, devices, model, escalation)
        # Note [the recipe's defaults]: CProp is opt-in (None: off, unless the optimizer given
        # applies it already, which is then used as built)
        cprop_kind = "on" if cprop is None and given_cprop is not None else None
        cprop_kind = cprop_kind or setting_kind(cprop, "cprop", "CProp's settings")
        if cprop_kind == "object":
            raise TypeError(
                "cprop must be True, False or a dict of CProp's settings "
                f"{list(CPROP_KEYS)}; to use a CProp you built, pass it as the optimizer: "
                f"got cprop={type(cprop).__name__}"
            )
        if given_cprop is not None and cprop_kind != "on":
            raise ValueError(
                f"optimizer already applies CProp ({type(given_cprop).__name__}), so cprop "
                f"must be True (its settings are those it was built with), got cprop={cprop!r}"
            )
        if given_cprop is None and cprop_kind != "off" and given_guard is not None:
            raise ValueError(
                f"optimizer is already a CatastropheGuard ({type(given_guard).__name__}) "
                "around its optimizer, and CProp goes inside the guard: pass the unguarded "
                "optimizer (e.g. ALeRA(...) for SALeRA) with guard={...}, or cprop=False"
            )
        settings = check_keys("cprop", cprop, CPROP_KEYS) if cprop_kind == "settings" else {}
        sparse = isinstance(inner, torch.optim.SparseAdam)
        if given_cprop is None and cprop_kind != "off" and sparse:
            raise ValueError(
                "optimizer=SparseAdam steps sparse gradients, which CProp's dense statistics "
                "cannot take; build it with cprop=False (ALRC and the guard alone)"
            )

        # -- CProp, in the middle ----------------------------------------------------------------
        self.native = False
        self.cprop: Optimizer | None = None
        if given_cprop is not None:
            self.cprop = given_cprop
            self.native = is_native(given_cprop)
            base = given_cprop if self.native else given_cprop.optimizer
        elif cprop_kind == "off":
            base = inner
        elif native and can_convert(inner):
            self.cprop = base = native_for(inner, **settings)
            self.native = True
        else:
            self.cprop = CProp(inner, **settings)
            base = inner
        self.base: Optimizer = base
        middle = self.cprop if self.cprop is not None else base

        # -- the guard, outermost -------------------------------------------------------------
        self.guard: CatastropheGuard | None = given_guard
        if guard_settings is not None:
            self.guard = build_guard(middle, guard_settings, batch_size, dataset_size)

        # -- ALRC, on the loss ------------------------------------------------------------------
        self.alrc: ALRC | None = alrc_module
        super().__init__(self.guard if self.guard is not None else middle)
        self.per_sample = per_sample
        self._window = _LossWindow()
        # Note [a non-finite sample]: elements clip() masked out, beside the loss
        loss_device = params[-1].device
        self.nonfinite_losses = torch.zeros((), dtype=torch.int64, device=loss_device)

    def __repr__(self) -> str:
        parts = [
            f"alrc={self.alrc!r}",
            f"guard={self.guard.detector!r}" if self.guard is not None else "guard=None",
            f"cprop={type(self.cprop).__name__ if self.cprop is not None else None}",
            f"base={type(self.base).__name__}",
        ]
        return f"Stabilized({', '.join(parts)})"

    # -- the loss side --------------------------------------------------------------------------

    def clip(self, losses: Tensor) -> Tensor:
        """ALRC on ``losses`` (one per sample, or per element); remember their raw mean.

        Returns the clipped losses (same shape; ``losses`` itself when ALRC is off): reduce
        them (``.mean()``) and backpropagate. The mean of the *raw* losses over all elements is
        kept for the next :meth:`step`, where the guard watches it (Note [the guard watches the
        raw loss]); several calls before one step (gradient accumulation) give it their mean.
        A loss reduced some other way (a sum, a weighted mean) is better passed to the step
        itself, ``step(loss=raw_loss)``.

        With ``per_sample=True`` (the default unless ``batch_size == 1``) a 0-d loss is refused:
        the paper applies ALRC "to individual losses" for batch sizes above 1, because a mean
        over the batch lets one bad sample hide among the good ones, and is clipped whole.

        Call it on training losses only; report validation losses raw.
        """
        if not isinstance(losses, Tensor) or not losses.is_floating_point():
            raise TypeError(
                "clip expects a floating-point tensor of losses, got "
                + (f"dtype {losses.dtype}" if isinstance(losses, Tensor) else type(losses).__name__)
            )
        if self.per_sample and losses.dim() == 0:
            raise ValueError(
                "clip needs the unreduced losses, one per sample (e.g. F.cross_entropy(..., "
                "reduction='none')), got a 0-d (already reduced) loss: ALRC clips each sample's "
                "loss, and a batch mean would hide a bad sample among good ones. For batch size "
                "1, or to clip the batch mean on purpose, build with per_sample=False"
            )
        if losses.numel() == 0:
            raise ValueError("clip got an empty tensor of losses (shape with a 0 dimension)")
        # Note [a non-finite sample]: a NaN or inf element is masked out of the batch (its
        # loss and gradient become 0; ALRC's moments skip a batch that holds one) and counted;
        # the guard watches the mean of the finite ones, so one bad sample is no catastrophe.
        x = losses.detach()
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        finite = torch.isfinite(x)
        count = finite.sum()
        total = torch.where(finite, x, 0.0).sum()
        raw = torch.where(count > 0, total / count.clamp(min=1), math.nan)
        self.nonfinite_losses.add_((finite.numel() - count).to(self.nonfinite_losses.device))
        self._window.add_raw(raw)
        if self.alrc is None:
            return torch.where(finite, losses, torch.zeros_like(losses))
        if self._window.alrc_before is None and self.alrc.training:
            # Note [a skipped step is no observation]
            self._window.alrc_before = self.alrc.moments()
        clipped = self.alrc(losses)
        return torch.where(finite, clipped, torch.zeros_like(clipped))

    def observe_loss(self, loss: Tensor | float) -> None:
        """Give the next :meth:`step` a loss, for loops that do not call :meth:`clip`.

        A loss remembered by :meth:`clip` wins over this one (framework callbacks such as
        Lightning's ``LossFeeder`` observe the training step's *clipped* result); ``loss=``
        given to :meth:`step` wins over both.
        """
        check_scalar_loss("Stabilized.observe_loss", loss)
        self._window.observed = loss.detach() if isinstance(loss, Tensor) else loss

    def reset_loss(self) -> None:
        """Forget the losses remembered since the last step (a step that was skipped, e.g. by a
        GradScaler that found an inf gradient, leaves them; the next window starts afresh)."""
        self._window.clear()

    # -- stepping ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(
        self, closure: Callable[[], Any] | None = None, *, loss: Tensor | float | None = None
    ) -> Any:
        """Watch the raw loss, then roll back and cut, or let CProp and the base step.

        The guard watches, in this order: ``loss`` given here (the raw, unclipped loss), else the
        mean raw loss remembered by :meth:`clip` since the last step (also inside ``closure``),
        else the loss given to :meth:`observe_loss`, else the closure's result. Without a guard
        the closure goes to the inner optimizer as it is (an L-BFGS line search works); with one
        it is evaluated once, here. Returns the closure's result when there is a closure, else
        the watched loss (None without a guard).
        """
        window = self._window
        if self.guard is None:
            try:
                return (
                    self.optimizer.step(closure) if closure is not None else self.optimizer.step()
                )
            finally:
                window.clear()
        # The guard alone decides (its Note [loss precedence]: ``loss=``, else an observed
        # loss, else the closure's result) and checks the loss. The raw mean remembered by
        # clip(), else observe_loss()'s, reaches it as its observed loss, after the closure has
        # run (clip() may be called inside it).
        guard = self.guard

        def observe_window() -> None:
            if loss is None and window.loss() is not None:
                guard.observe_loss(window.loss())

        watched_closure = None
        if closure is not None:

            def watched_closure() -> Any:
                result = closure()
                observe_window()
                return result

        else:
            observe_window()
        try:
            out = guard.step(watched_closure, loss=loss)
            skipped = getattr(guard, "last_step_skipped", None)
            if self.alrc is not None and window.alrc_before is not None and skipped is not None:
                # Note [a skipped step is no observation]: ALRC updated its moments in the
                # forward pass; a step the guard skipped for a non-finite gradient takes that
                # back, on the device (as skip_aware does for a GradScaler's skipped step).
                self.alrc.restore_moments_(window.alrc_before, skipped)
            return out
        finally:
            window.clear()

    # -- checkpoints and telemetry ---------------------------------------------------------------

    def _components(self) -> dict[str, Any]:
        return {
            "alrc": self.alrc is not None,
            "guard": self.guard is not None,
            "cprop": None if self.cprop is None else ("native" if self.native else "wrapper"),
            "base": type(self.base).__name__,
        }

    checkpoint_key = "stabilized"  # Note [flat checkpoints] (steadystep.compose.wrapper)

    def _wrapped_state_dict(self) -> dict[str, Any]:
        """``{"stabilized": components, "alrc": ALRC's buffers, "optimizer": the outermost's}``,
        laid out flat by ``state_dict()`` (Note [flat checkpoints] of
        :mod:`steadystep.compose.wrapper`: these two under ``param_groups[0]["stabilized"]``).

        ``"optimizer"`` nests the guard's (detector, counters, snapshot), CProp's and the base's;
        ALRC's buffers are clones.
        """
        return {
            "stabilized": {
                "format": _FORMAT,
                **self._components(),
                "per_sample": self.per_sample,
                "nonfinite_losses": self.nonfinite_losses.clone(),
            },
            "alrc": None
            if self.alrc is None
            else {k: v.clone() for k, v in self.alrc.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
        }

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checks of :meth:`load_state_dict`, without loading: the format and the
        components, then every component's part (ALRC's moments, the guard, CProp and the base
        optimizer; Note [what a load checks] of :mod:`steadystep.checkpoint`)."""
        if self._is_flat(state_dict):  # Note [flat checkpoints]: as state_dict() writes it
            state_dict = self._nested_state_dict(state_dict)
        meta = state_dict.get("stabilized") if isinstance(state_dict, Mapping) else None
        if not isinstance(meta, Mapping) or not {"alrc", "optimizer"} <= set(state_dict):
            raise ValueError(
                "state_dict was not saved from a Stabilized optimizer (expected the keys "
                f"'stabilized', 'alrc', 'optimizer', found {sorted(state_dict)})"
            )
        expected = self._components()
        found = {k: meta.get(k) for k in expected}
        if found != expected:
            raise ValueError(
                f"state_dict was saved from a Stabilized with components {found}, but this one "
                f"has {expected}: build it with the same alrc=, guard=, cprop=, native= and "
                "base optimizer"
            )
        check_format(meta.get("format"), (_FORMAT,), owner="Stabilized")
        if self.alrc is not None:
            self.alrc.check_state_dict(state_dict["alrc"])
        check_optimizer_state(self.optimizer, state_dict["optimizer"], owner="Stabilized")

    def _load_wrapped_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` saved from a Stabilized built the same way; every
        component's part is checked before any is loaded (:meth:`check_state_dict`)."""
        self.check_state_dict(state_dict)
        # the optimizer first: a third-party optimizer's own loader may still refuse its part
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if self.alrc is not None:
            self.alrc.load_state_dict(state_dict["alrc"])
        count = state_dict["stabilized"].get("nonfinite_losses")  # absent before the mask
        self.nonfinite_losses.copy_(torch.as_tensor(0 if count is None else count))
        self._window.clear()

    def stats(self, *, per_parameter: bool = False) -> dict[str, Tensor]:
        """Every component's statistics as 0-d tensors, no host sync: ``clip/nonfinite_losses``,
        ``alrc/<key>`` (:meth:`ALRC.stats <steadystep.ALRC.stats>`) and ``guard/<key>`` (the
        guard's counters, ``lr`` and ``detector_<key>``), at a cost that does not grow with the
        model (a Monitor calls it every step).

        ``per_parameter=True`` adds the statistics that reduce over every parameter:
        ``cprop/<key>`` (``mean_scale``, ``frac_scale_below_half``...) and ``base/<key>`` when
        the base optimizer has statistics of its own (ALeRA's rates and ``skipped_steps``).
        They cost reductions over CProp's (or ALeRA's) state, per parameter tensor: on a small
        model more than its training step, so ask for them when you read them, not every step.
        The names are the same everywhere (Note [one naming] in :mod:`steadystep.telemetry`).
        """
        out: dict[str, Tensor] = {"clip/nonfinite_losses": self.nonfinite_losses}
        if self.alrc is not None:
            out.update({f"alrc/{k}": v for k, v in self.alrc.stats().items()})
        if self.guard is not None:
            guard_stats = self.guard.stats(include_optimizer=False)
            out.update({f"guard/{k}": v for k, v in guard_stats.items()})
        if self.native and self.cprop is not None:
            # one shared 0-d count (O(1)): the native class's steps skipped for its gradients
            out["cprop/skipped_steps"] = self.cprop.param_groups[0]["skipped_steps"]
        if not per_parameter:
            return out
        for prefix, part in (("cprop", self.cprop), ("base", self.base)):
            if part is None or (prefix == "base" and part is self.cprop):
                continue
            part_stats = getattr(part, "stats", None)
            if callable(part_stats):
                out.update({f"{prefix}/{k}": v for k, v in part_stats().items()})
        return out


def stabilize(
    optimizer: Optimizer,
    *,
    alrc: bool | Mapping[str, Any] | ALRC | None = None,
    cprop: bool | Mapping[str, Any] | None = None,
    guard: bool | Mapping[str, Any] | Any = True,
    batch_size: int | None = None,
    dataset_size: int | None = None,
    per_sample: bool | None = None,
    native: bool = True,
    model: torch.nn.Module | None = None,
    escalation: Escalation | None = None,
) -> Stabilized:
    """Compose ALRC, the catastrophe guard and CProp around ``optimizer``, in the right order.

    Args:
        optimizer: the base optimizer (any ``torch.optim.Optimizer``: torch's, ALeRA, AgAdam,
            your own), or one with some layers already built: a CProp (``CProp(base)`` or a
            native ``CPropAdamW``...) and/or a guard around it (``CatastropheGuard(...)``,
            ``SALeRA``), which are used as built.
        alrc: loss clipping: None or False (default: off, Note [the recipe's defaults]), True
            (``ALRC()``), a dict of :class:`~steadystep.ALRC` settings (``n_sigma``, ...), or an
            ``ALRC`` (moved nowhere: it must be on the parameters' device). A built one goes
            beside the last parameter.
        cprop: None (default: off, or the CProp ``optimizer`` already applies), True (CProp's
            defaults), False, or a dict of :class:`~steadystep.CProp` settings (``beta``, ``c``,
            ``eps``, ``cdf``, ``method``, ``fused``). Must be True or None when ``optimizer``
            already applies CProp. Off by default since it costs accuracy at a well-tuned
            learning rate on the clean-run benchmark (``docs/clean.md``); turn it on for runs
            whose rate is too high to tune (Note [the recipe's defaults]).
        guard: True (default: a :class:`~steadystep.CatastropheGuard` with its default
            detector), False, a dict of its settings (``detector``, ``lr_factor``, ``backtrack``,
            ``min_lr``, ``snapshot_device``, ``check_every``, ...), or a detector
            (e.g. ``ss.PageHinkley(ph_lambda=0.5)``). Must be True when ``optimizer`` is a guard.
        batch_size, dataset_size: samples per optimizer step (over all ranks) and in the
            training set, given together; they set what the guard's detector derives from them
            (:func:`configure_detector`: PageHinkley's ``rho = batch_size / dataset_size``),
            on the default detector and on one passed in ``guard``. Default: the detector's
            own settings (PageHinkley: ``rho=0.01``).
        per_sample: :meth:`Stabilized.clip` refuses a 0-d (reduced) loss (default: True unless
            ``batch_size == 1``).
        native: when CProp is to be built around exactly ``torch.optim.SGD``, ``Adam`` or
            ``AdamW`` with settings the native classes have (no ``maximize``, ``capturable``,
            ``differentiable``, tensor ``lr``; not yet stepped; no hooks on it), build
            :class:`~steadystep.CPropSGD` / ``CPropAdam`` / ``CPropAdamW`` instead of the
            ``CProp`` wrapper (default True). Same hyperparameters and the same param-group
            dicts (an LR scheduler built on ``optimizer`` keeps driving them, though torch warns
            that it never saw that object step: build schedulers on the returned one; and do
            not step ``optimizer`` itself afterwards); the numbers match the wrapper's up to
            rounding, in fewer passes over memory, and the guard around it takes every decision
            on the device.
            The base's ``foreach`` is kept; steadystep's own fused kernels (C on CPU, Triton on
            CUDA) run by default wherever they take the tensors and a ``foreach=True`` base does
            not ask otherwise; ``cprop={"fused": False}`` turns them off and
            ``cprop={"fused": True}`` requires them. torch's ``fused`` flag is not read.
        model: the module being trained: the guard's full rollback restores its buffers
            (BatchNorm's running statistics) with the parameters and the optimizer's state
            (default None: no buffers).
        escalation: the guard's rung above the ladder (:class:`~steadystep.Escalation`: a ring
            of snapshots, and a sampler told which batches to skip), or None (default).

    Returns:
        a :class:`Stabilized` optimizer.

    Errors at construction: an optimizer with no parameters; an order that cannot work (a
    Stabilized inside, CProp asked for around a built guard); components given twice;
    ALRC or a detector on another device than the parameters; unknown settings.

    Examples:
        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = ss.stabilize(torch.optim.AdamW(model.parameters(), lr=1e-2), alrc=True)
        >>> opt.cprop, type(opt.guard).__name__  # CProp is opt-in (cprop=True), ALRC too
        (None, 'CatastropheGuard')
        >>> for _ in range(3):
        ...     x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        ...     loss = opt.clip(F.cross_entropy(model(x), y, reduction="none")).mean()
        ...     opt.zero_grad()
        ...     loss.backward()
        ...     _ = opt.step()
        >>> int(opt.stats()["guard/steps"]), int(opt.stats()["alrc/num_updates"])
        (3, 3)
    """
    return Stabilized(
        optimizer,
        alrc=alrc,
        cprop=cprop,
        guard=guard,
        batch_size=batch_size,
        dataset_size=dataset_size,
        per_sample=per_sample,
        native=native,
        model=model,
        escalation=escalation,
    )
