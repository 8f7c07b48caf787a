"""The clean-run benchmark's tasks: small models on embedded data, one metric each.

* ``mnist1d_mlp``: MNIST-1D (``mnist1d`` generator, 4000 train / 1000 test signals of length
  40, standardized), an MLP 40-256-256-10 (``experiments.models.mlp``); test accuracy.
* ``digits_cnn_bn``: scikit-learn's 8x8 digits (1437 / 360), a LeNet-like CNN with BatchNorm
  after every conv and hidden linear layer (``experiments.models.LeNetLike``, sizes 16, 32,
  64, 32); test accuracy.
* ``arith_lm``: a character-level causal transformer (1 layer, width 32, 2 heads;
  ``spikes.tasks.CausalLM``) on generated ``a+b=c`` lines; test loss (nats per character) on
  a corpus from another seed.
* ``digits_ae``: a convolutional autoencoder on the digits (8x8 -> 4x4x16 -> 2x2x16 -> back);
  test mean squared error per pixel.

Every batch is a pure function of (seed, step): a seeded permutation per epoch. Events change
the data from ``event_step`` on: ``noise`` adds Gaussian noise (std ``NOISE_STD`` of the
standardized input) to every training and test input, a harder distribution; ``permute``
relabels the classes by a fixed permutation, a new but learnable task. The test set follows
the event, so the final metric measures the task the run ends on.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from spikes.tasks import SEQ, VOCAB, CausalLM, arithmetic_corpus
from steadystep.experiments.datasets import load_classification
from steadystep.experiments.models import LeNetLike, mlp

__all__ = ["EVENTS", "TASKS", "Task", "get_task"]

TASKS = ("mnist1d_mlp", "digits_cnn_bn", "arith_lm", "digits_ae")
EVENTS = ("none", "noise", "permute")
NOISE_STD = 1.0
LABELS = {
    "mnist1d_mlp": "MNIST-1D MLP",
    "digits_cnn_bn": "digits CNN+BN",
    "arith_lm": "arithmetic char LM",
    "digits_ae": "digits conv AE",
}


class ConvAE(nn.Module):
    """8x8 digits -> conv(16, stride 2) -> conv(16, stride 2) -> two transposed convs back."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(16, 1, 4, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@dataclass
class Task:
    """A task: model factory, training and test data, per-sample loss and test metric."""

    name: str
    kind: str  # "classify", "lm" or "reconstruct"
    make_model: Callable[[], nn.Module]
    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor | None
    batch_size: int
    n_examples: int
    metric: str  # name of the test metric
    higher_is_better: bool

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return self.make_model()

    def batch(
        self, step: int, seed: int, event: str = "none", event_step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.n_examples // self.batch_size)
        perm = _permutation(self.n_examples, seed * 100_003 + epoch)
        index = perm[i * self.batch_size : (i + 1) * self.batch_size]
        if self.kind == "lm":
            window = self.x_train[index.unsqueeze(1) + torch.arange(SEQ + 1)]
            return window[:, :-1], window[:, 1:]
        x = self.x_train[index]
        y = x if self.kind == "reconstruct" else self.y_train[index]
        if step >= event_step:
            x, y = self.apply_event(x, y, event, noise_seed=seed * 7919 + step)
        return x, y

    def apply_event(
        self, x: torch.Tensor, y: torch.Tensor, event: str, noise_seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if event == "none":
            return x, y
        if self.kind != "classify":
            raise ValueError(f"event {event!r} is defined for the classifiers, not {self.name}")
        if event == "noise":
            gen = torch.Generator().manual_seed(noise_seed)
            return x + NOISE_STD * torch.randn(x.shape, generator=gen), y
        if event == "permute":
            return x, _LABEL_PERM[y]
        raise ValueError(f"event must be one of {EVENTS}, got {event!r}")

    def per_sample_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x)
        if self.kind == "lm":  # one loss per character
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
        if self.kind == "reconstruct":
            return (out - y).pow(2).flatten(1).mean(1)
        return F.cross_entropy(out, y, reduction="none")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, event: str = "none") -> float:
        """The test metric (in eval mode; the model is put back in train mode after)."""
        model.eval()
        try:
            if self.kind == "lm":
                x, y = self.x_test[:, :-1], self.x_test[:, 1:]
                return float(self.per_sample_loss(model, x, y).mean())
            if self.kind == "reconstruct":
                return float(self.per_sample_loss(model, self.x_test, self.x_test).mean())
            x, y = self.apply_event(self.x_test, self.y_test, event, noise_seed=123_456_789)
            return float((model(x).argmax(1) == y).float().mean())
        finally:
            model.train()


_LABEL_PERM = torch.tensor([3, 7, 0, 9, 5, 1, 8, 2, 6, 4])  # fixed, no class kept


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@functools.cache
def get_task(name: str) -> Task:
    """The task ``name`` (built once per process)."""
    if name == "mnist1d_mlp":
        data = load_classification("mnist1d").standardized()
        return Task(
            name,
            "classify",
            lambda: mlp(40, (256, 256), 10),
            data.x_train.flatten(1),
            data.y_train,
            data.x_test.flatten(1),
            data.y_test,
            32,
            len(data.y_train),
            "test accuracy",
            True,
        )
    if name in ("digits_cnn_bn", "digits_ae"):
        data = load_classification("digits")
        if name == "digits_ae":
            return Task(
                name,
                "reconstruct",
                ConvAE,
                data.x_train,
                None,
                data.x_test,
                None,
                32,
                len(data.x_train),
                "test MSE",
                False,
            )
        data = data.standardized(per="global")
        return Task(
            name,
            "classify",
            lambda: LeNetLike((1, 8, 8), 10, (16, 32, 64, 32)),
            data.x_train,
            data.y_train,
            data.x_test,
            data.y_test,
            32,
            len(data.y_train),
            "test accuracy",
            True,
        )
    if name == "arith_lm":
        corpus = arithmetic_corpus(100_000, seed=1234)
        held_out = arithmetic_corpus(128 * (SEQ + 1), seed=4321).view(128, SEQ + 1)
        return Task(
            name,
            "lm",
            lambda: CausalLM(len(VOCAB), width=32, layers=1, heads=2),
            corpus,
            None,
            held_out,
            None,
            16,
            len(corpus) - SEQ - 1,
            "test loss (nats/char)",
            False,
        )
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")


def chance(name: str) -> float:
    """The metric of a blank guess (for reading diverged runs)."""
    if name == "arith_lm":
        return math.log(len(VOCAB))
    return 0.1 if get_task(name).kind == "classify" else float("nan")
