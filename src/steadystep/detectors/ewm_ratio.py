"""Loss over its exponentially weighted moving average (metaseq's ``ewm_ratio_to_skip_batch``).

metaseq (facebookresearch/metaseq, ``metaseq/trainer.py``, ``Trainer.skip_spike``, option
``--ewm-ratio-to-skip-batch``: "Skip current batch if the loss to loss ewm ratio is higher than
this value") keeps an exponentially weighted mean of the loss with span 9 (weight
``alpha = 2 / (span + 1) = 0.2``), started at the first loss, and updated only on steps that
are not spikes. With ``E`` that mean before step ``t``:

.. math::
    \\text{alarm}_t = L_t > r\\,E_{t-1}, \\qquad
    E_t = \\begin{cases} E_{t-1} & \\text{alarm} \\\\
    (1 - \\alpha)\\,E_{t-1} + \\alpha L_t & \\text{otherwise}\\end{cases}, \\qquad
    E_0 = L_{\\text{first}}

``r`` is ``threshold`` (metaseq's option has no default value: -1 turns it off). metaseq
compares ``L_t / E_{t-1} > r``; we compare ``L_t > r E_{t-1}`` (the same for the positive
losses the rule is meant for, and no division by a zero mean). A loss that rises for good keeps
alarming, since the mean is frozen while it alarms. Our own code, from that public description.
"""

from __future__ import annotations

from typing import Any

import torch

from steadystep._validation import check_positive
from steadystep.detectors._base import Detector

__all__ = ["EWMRatio"]


class EWMRatio(Detector):
    """Alarm when the loss exceeds ``threshold`` times its moving average of non-spike losses.

    Args:
        threshold: the ratio ``r`` above which a loss alarms (default 3.0; > 1).
        span: span of the exponentially weighted mean, ``alpha = 2 / (span + 1)`` (default 9,
            metaseq's; >= 1).
        dtype, device: of the statistics (default float32, CPU).

    Meant for positive losses (cross-entropy, squared error). The rule is in the module
    docstring.

    Examples:
        >>> import torch, steadystep as ss
        >>> det = ss.EWMRatio(threshold=2.0)
        >>> [bool(det.update(torch.tensor(x))) for x in (1.0, 0.9, 0.8, 2.5, 0.8)]
        [False, False, False, True, False]
    """

    _HPARAMS = ("threshold", "span")
    _STATE = ("ewm", "initialized")
    _RESET = _STATE

    def __init__(
        self,
        threshold: float = 3.0,
        span: float = 9.0,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        hp = self._check_hparams({"threshold": threshold, "span": span})
        self.threshold, self.span = hp["threshold"], hp["span"]
        super().__init__(dtype=dtype, device=device)

    def _check_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        threshold = check_positive("threshold", hparams["threshold"])
        if not threshold > 1.0:
            raise ValueError(f"threshold must be > 1 (a ratio), got threshold={threshold}")
        span = check_positive("span", hparams["span"])
        if not span >= 1.0:
            raise ValueError(f"span must be >= 1, got span={span}")
        return {"threshold": threshold, "span": span}

    @property
    def alpha(self) -> float:
        return 2.0 / (self.span + 1.0)

    def _init_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "ewm": torch.zeros((), dtype=self.dtype, device=device),
            "initialized": torch.zeros((), dtype=torch.bool, device=device),
        }

    def _advance(
        self, loss: torch.Tensor, grad_norm: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        previous = torch.where(self.initialized, self.ewm, loss)
        change = ~(loss <= self.threshold * previous)  # NaN-aware
        updated = (1.0 - self.alpha) * previous + self.alpha * loss
        ewm = torch.where(change, previous, updated)
        return change, {"ewm": ewm, "initialized": torch.ones_like(self.initialized)}

    def stats(self) -> dict[str, torch.Tensor]:
        """0-d tensors: ``ewm`` (the mean the next loss is compared with), ``alarms``."""
        return {"ewm": self.ewm, "alarms": self.alarms}
