"""The papers' networks, adapted to the input shape.

Inputs are ``(N, C, L)`` for 1-D signals (MNIST-1D) or ``(N, C, H, W)`` for images; the
convolutional models use ``Conv1d`` / ``Conv2d`` accordingly ("adapted to the input").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "CPropCNN",
    "SupersamplingNet",
    "build_classifier",
    "mlp",
]


def _conv(dims: int, *args: int, **kwargs: int) -> nn.Module:
    return (nn.Conv1d if dims == 1 else nn.Conv2d)(*args, **kwargs)


def _pool(dims: int) -> nn.Module:
    return nn.MaxPool1d(2) if dims == 1 else nn.MaxPool2d(2)


def _batchnorm(dims: int, channels: int) -> nn.Module:
    return nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)


def mlp(
    in_features: int, hidden: Sequence[int], n_classes: int, batchnorm: bool = False
) -> nn.Module:
    """Flatten, then fully connected layers with ReLU (and BatchNorm) between them."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


class LeNetLike(nn.Module):
    """SALeRA's M4: two conv layers with max-pooling, two fully connected layers, BatchNorm."""

    def __init__(self, input_shape: Sequence[int], n_classes: int, sizes: Sequence[int]) -> None:
        super().__init__()
        dims = len(input_shape) - 1
        c1, c2, f1, f2 = sizes
        in_channels = input_shape[0]
        self.features = nn.Sequential(
            _conv(dims, in_channels, c1, kernel_size=5, padding=2),
            _batchnorm(dims, c1),
            nn.ReLU(),
            _pool(dims),
            _conv(dims, c1, c2, kernel_size=5, padding=2),
            _batchnorm(dims, c2),
            nn.ReLU(),
            _pool(dims),
        )
        spatial = math.prod(s // 4 for s in input_shape[1:])
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * spatial, f1),
            nn.BatchNorm1d(f1),
            nn.ReLU(),
            nn.Linear(f1, f2),
            nn.BatchNorm1d(f2),
            nn.ReLU(),
            nn.Linear(f2, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CPropCNN(nn.Module):
    """CProp's Fashion-MNIST CNN: conv 16, M, 32, M, 64, M, 128 (3x3, ReLU), global average
    pool, 1x1 conv to the logits. A pooling step is skipped once the input is too small for it."""

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dims = len(input_shape) - 1
        layers: list[nn.Module] = []
        width, size = input_shape[0], min(input_shape[1:])
        for i, c in enumerate(channels):
            layers += [_conv(dims, width, c, kernel_size=3, padding=1), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout1d(dropout) if dims == 1 else nn.Dropout2d(dropout))
            if i < len(channels) - 1 and size >= 2:
                layers.append(_pool(dims))
                size //= 2
            width = c
        self.features = nn.Sequential(*layers)
        self.dims = dims
        self.head = _conv(dims, width, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = h.mean(dim=tuple(range(2, h.dim())), keepdim=True)
        return self.head(h).flatten(1)


def build_classifier(name: str, input_shape: Sequence[int], n_classes: int) -> nn.Module:
    """The papers' classifiers by name.

    SALeRA (paper section 3.1): ``M0`` softmax regression; ``M2`` two ReLU hidden layers
    (500, 300); ``M2b`` the same with BatchNorm; ``M4`` LeNet-like (32, 64, 128, 128) with
    BatchNorm. CProp (supplement A.1/A.2): ``FC`` 784-300-100-10 (input size adapted) and ``CNN``.
    """
    in_features = math.prod(input_shape)
    if name == "M0":
        return mlp(in_features, (), n_classes)
    if name == "M2":
        return mlp(in_features, (500, 300), n_classes)
    if name == "M2b":
        return mlp(in_features, (500, 300), n_classes, batchnorm=True)
    if name == "M4":
        return LeNetLike(input_shape, n_classes, (32, 64, 128, 128))
    if name == "FC":
        return mlp(in_features, (300, 100), n_classes)
    if name == "CNN":
        return CPropCNN(input_shape, n_classes)
    raise ValueError(f"model must be one of M0, M2, M2b, M4, FC, CNN, got model={name!r}")


class SupersamplingNet(nn.Module):
    """ALRC's 2x supersampling network (paper Fig. 2, the authors' ``cifar10.py``).

    Bilinear upsampling of the 16x16 input to 32x32, then conv5x5(w1), conv3x3(w2),
    three skip-2 residual blocks of two conv3x3(w2), conv3x3(w1), conv5x5(3). ReLU after every
    convolution except the last; Xavier-uniform weights, zero biases. The paper's widths are
    ``w1, w2 = 64, 128`` (``width=1.0``); ``width`` scales both for CPU-sized runs.
    """

    def __init__(self, width: float = 1.0, channels: int = 3) -> None:
        super().__init__()
        w1, w2 = max(1, round(64 * width)), max(1, round(128 * width))
        self.head = nn.Sequential(
            nn.Conv2d(channels, w1, 5, padding=2),
            nn.ReLU(),
            nn.Conv2d(w1, w2, 3, padding=1),
            nn.ReLU(),
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(w2, w2, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(w2, w2, 3, padding=1),
                nn.ReLU(),
            )
            for _ in range(3)
        )
        self.tail = nn.Sequential(
            nn.Conv2d(w2, w1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w1, channels, 5, padding=2),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, low_res: torch.Tensor) -> torch.Tensor:
        size = (2 * low_res.shape[-2], 2 * low_res.shape[-1])
        x = F.interpolate(low_res, size=size, mode="bilinear", align_corners=True)
        x = self.head(x)
        for block in self.blocks:
            x = x + block(x)
        return self.tail(x)
