"""The spike benchmark's training tasks: real runs with decaying losses on embedded data.

* ``mnist1d_mlp``: MNIST-1D (the ``mnist1d`` package's generator, 4000 training signals of
  length 40), an MLP 40-256-256-10, batch 32.
* ``digits_cnn``: scikit-learn's 8x8 digits (1437 training images), a small CNN
  (conv 16, pool, conv 32, pool, linear), batch 32.
* ``arith_lm``: a character-level causal transformer (2 layers, width 48, 4 heads) on a
  generated arithmetic corpus (lines ``a+b=c`` with ``a, b < 1000`` from a seeded generator),
  windows of 32 characters, batch 16.

Each task trains with AdamW or SGD (momentum 0.9). ``Task.batch(step)`` is a pure function of
the step (a seeded epoch permutation), so a run can be forked at any step and replayed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from steadystep.experiments.datasets import load_classification

__all__ = ["OPTIMIZERS", "TASKS", "Task", "make_task"]

TASKS = ("mnist1d_mlp", "digits_cnn", "arith_lm")
OPTIMIZERS = ("adamw", "sgd")

# Learning rates: AdamW at its usual 1e-3; SGD (momentum 0.9) at a rate that trains each task
# steadily without diverging on its own.
_LR = {
    ("mnist1d_mlp", "adamw"): 1e-3,
    ("mnist1d_mlp", "sgd"): 0.02,
    ("digits_cnn", "adamw"): 1e-3,
    ("digits_cnn", "sgd"): 0.02,
    ("arith_lm", "adamw"): 1e-3,
    ("arith_lm", "sgd"): 0.1,
}
BATCH = 32
VOCAB = "0123456789+=\n"
SEQ = 32
LM_BATCH = 16


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a ReLU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        # Plain attention: at this size it is faster on a CPU than the fused kernel.
        scores = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        a = scores.masked_fill(causal, -math.inf).softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class CausalLM(nn.Module):
    """A small causal transformer over characters (learned positions, tied to nothing)."""

    def __init__(self, vocab: int, width: int = 48, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(SEQ, width) * 0.02)
        self.blocks = nn.Sequential(*[_Block(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(h)))


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def arithmetic_corpus(n_chars: int, seed: int = 0) -> torch.Tensor:
    """Token ids of ``a+b=c`` lines from a seeded generator (no download, no files)."""
    rng = random.Random(seed)
    lines, total = [], 0
    while total < n_chars:
        a, b = rng.randrange(1000), rng.randrange(1000)
        line = f"{a}+{b}={a + b}\n"
        lines.append(line)
        total += len(line)
    text = "".join(lines)[:n_chars]
    table = {c: i for i, c in enumerate(VOCAB)}
    return torch.tensor([table[c] for c in text], dtype=torch.int64)


@dataclass
class Task:
    """One task and optimizer: a model factory, the data, the loss and the batches."""

    name: str
    optimizer: str
    lr: float
    make_model: Callable[[], nn.Module]
    x: torch.Tensor
    y: torch.Tensor | None  # None: language modelling on x
    n_examples: int
    seed: int
    batch_size: int = BATCH

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return self.make_model()

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, fused=True)
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9, fused=True)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The minibatch of ``step``: a seeded permutation per epoch, then consecutive slices."""
        epoch, i = divmod(step, self.steps_per_epoch)
        index = self._permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        if self.y is None:  # windows of the corpus: inputs and next characters
            window = self.x[index.unsqueeze(1) + torch.arange(SEQ + 1)]
            return window[:, :-1], window[:, 1:]
        return self.x[index], self.y[index]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x)
        if self.y is None:
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.cross_entropy(out, y)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_examples // self.batch_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        cache = self.__dict__.setdefault("_perms", {})
        if epoch not in cache:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            cache.clear()  # one epoch at a time is enough: forks replay nearby steps
            cache[epoch] = torch.randperm(self.n_examples, generator=gen)
        return cache[epoch]


def make_task(name: str, optimizer: str, seed: int = 0) -> Task:
    """The task ``name`` trained with ``optimizer`` (``"adamw"`` or ``"sgd"``)."""
    lr = _LR[(name, optimizer)]
    if name == "mnist1d_mlp":
        data = load_classification("mnist1d")
        x = data.x_train.flatten(1)
        x = (x - x.mean(0)) / x.std(0)

        def make() -> nn.Module:
            return nn.Sequential(
                nn.Linear(x.shape[1], 256),
                nn.ReLU(),
                nn.Linear(256, 256),
                nn.ReLU(),
                nn.Linear(256, 10),
            )

        return Task(name, optimizer, lr, make, x, data.y_train, len(x), seed)
    if name == "digits_cnn":
        data = load_classification("digits")
        return Task(
            name, optimizer, lr, DigitsCNN, data.x_train, data.y_train, len(data.x_train), seed
        )
    if name == "arith_lm":
        corpus = arithmetic_corpus(200_000, seed=1234)
        n_windows = len(corpus) - SEQ - 1
        return Task(
            name,
            optimizer,
            lr,
            lambda: CausalLM(len(VOCAB)),
            corpus,
            None,
            n_windows,
            seed,
            batch_size=LM_BATCH,
        )
    raise ValueError(f"task must be one of {TASKS}, got task={name!r}")


def uniform_loss(name: str) -> float:
    """Cross-entropy of a uniform guess (the loss a blank model starts near)."""
    return math.log(len(VOCAB) if name == "arith_lm" else 10)
