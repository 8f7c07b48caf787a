"""Datasets for the experiments: embedded defaults, real files when present.

Embedded (no network, shipped with the ``exp`` extra):

* ``mnist1d``: MNIST-1D regenerated with the ``mnist1d`` package's generator
  (``mnist1d.data.make_dataset`` with its default arguments; its downloader is never called).
* ``digits``: scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``).
* ``crops``: random 32x32 crops of the two natural images bundled with scikit-learn
  (``load_sample_images``), the embedded stand-in for CIFAR-10 in the supersampling task.

Real (read from ``--data-dir``; nothing is ever downloaded):

* ``mnist`` / ``fashion-mnist``: IDX files, gzipped or not, in torchvision's layout
  (``DATA_DIR/MNIST/raw/train-images-idx3-ubyte[.gz]``, ``DATA_DIR/FashionMNIST/raw/...``) or
  directly in ``DATA_DIR``.
* ``cifar10``: the python pickle batches (``DATA_DIR/cifar-10-batches-py/data_batch_1..5`` and
  ``test_batch``) or the same files directly in ``DATA_DIR``.

Every loader returns float32 tensors on the CPU; the experiments move them to the device once.
"""

from __future__ import annotations

import functools
import gzip
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "EMBEDDED",
    "REAL",
    "ClassificationData",
    "DatasetNotFoundError",
    "load_cifar10",
    "load_classification",
    "load_idx_dataset",
    "load_supersampling_images",
    "read_idx",
    "write_idx",
]

EMBEDDED = ("mnist1d", "digits", "crops")
REAL = ("mnist", "fashion-mnist", "cifar10")

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# torchvision's folder names, then a few spellings people use.
_IDX_DIRS = {
    "mnist": ("MNIST/raw", "MNIST", "mnist/raw", "mnist"),
    "fashion-mnist": ("FashionMNIST/raw", "FashionMNIST", "fashion-mnist/raw", "fashion-mnist"),
}
_CIFAR_DIRS = ("cifar-10-batches-py", ".")
_CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


class DatasetNotFoundError(FileNotFoundError):
    """A real dataset was asked for but its files are not in the data directory."""


@dataclass(frozen=True)
class ClassificationData:
    """A classification dataset held in memory.

    ``x_*`` are float32 of shape ``(N, C, L)`` (1-D signals) or ``(N, C, H, W)`` (images);
    ``y_*`` are int64 class indices. ``source`` says where the numbers came from.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    source: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def subset(self, n_train: int | None, n_test: int | None) -> ClassificationData:
        """The first ``n_train`` / ``n_test`` examples (the loaders already shuffle)."""
        return ClassificationData(
            self.name,
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_test[:n_test],
            self.y_test[:n_test],
            self.n_classes,
            self.source,
        )

    def standardized(self, per: str = "coordinate") -> ClassificationData:
        """Normalize with the training set's mean and std, per coordinate or globally."""
        if per == "coordinate":
            mean = self.x_train.mean(0, keepdim=True)
            std = self.x_train.std(0, keepdim=True)
        elif per == "global":
            mean = self.x_train.mean()
            std = self.x_train.std()
        else:
            raise ValueError(f"per must be 'coordinate' or 'global', got per={per!r}")
        # Constant coordinates (the border pixels of MNIST) have std 0: leave them at 0.
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        return ClassificationData(
            self.name,
            (self.x_train - mean) / std,
            self.y_train,
            (self.x_test - mean) / std,
            self.y_test,
            self.n_classes,
            self.source,
        )


# ----------------------------------------------------------------------------- IDX files


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into a numpy array of its stored dtype."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type code {code:#x}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=dtypes[code], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {array.size} values")
    return array.reshape(shape).astype(array.dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when ``path`` ends in ``.gz``); for tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _find_idx(root: Path, name: str, stem: str) -> Path | None:
    for sub in _IDX_DIRS[name]:
        for candidate in (root / sub / stem, root / sub / (stem + ".gz")):
            if candidate.is_file():
                return candidate
    for candidate in (root / stem, root / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _missing_message(name: str, data_dir: Path | None, missing: Sequence[str], where: str) -> str:
    shown = data_dir if data_dir is not None else "<none given>"
    return (
        f"dataset {name!r} needs files that are not in the data directory {shown}.\n"
        f"Missing: {', '.join(missing)}.\n"
        f"Put them {where}, then pass --data-dir DIR. Nothing is downloaded; "
        "the embedded datasets (mnist1d, digits, crops) need no files."
    )


def load_idx_dataset(name: str, data_dir: str | Path | None) -> ClassificationData:
    """MNIST or Fashion-MNIST from IDX files, pixels scaled to [0, 1], shape (N, 1, 28, 28)."""
    if name not in _IDX_DIRS:
        raise ValueError(f"name must be one of {sorted(_IDX_DIRS)}, got name={name!r}")
    root = Path(data_dir) if data_dir is not None else None
    found = {k: _find_idx(root, name, s) if root else None for k, s in _IDX_FILES.items()}
    missing = [_IDX_FILES[k] + "[.gz]" for k, p in found.items() if p is None]
    if missing:
        where = f"in DATA_DIR/{_IDX_DIRS[name][0]}/ (torchvision's layout) or directly in DATA_DIR"
        raise DatasetNotFoundError(_missing_message(name, root, missing, where))
    arrays = {k: read_idx(p) for k, p in found.items() if p is not None}

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    return ClassificationData(
        name,
        images(arrays["train_images"]),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        images(arrays["test_images"]),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        10,
        f"IDX files in {found['train_images'].parent}",  # type: ignore[union-attr]
    )


# ----------------------------------------------------------------------------- CIFAR-10


def _find_cifar(root: Path) -> Path | None:
    for sub in _CIFAR_DIRS:
        if all((root / sub / f).is_file() for f in _CIFAR_FILES):
            return root / sub
    return None


def load_cifar10(data_dir: str | Path | None) -> ClassificationData:
    """CIFAR-10 from the python pickle batches, pixels in [0, 1], shape (N, 3, 32, 32)."""
    root = Path(data_dir) if data_dir is not None else None
    folder = _find_cifar(root) if root is not None else None
    if folder is None:
        present = root / _CIFAR_DIRS[0] if root is not None else None
        missing = [
            f for f in _CIFAR_FILES if present is None or not (present / f).is_file()
        ] or list(_CIFAR_FILES)
        where = "in DATA_DIR/cifar-10-batches-py/ (torchvision's layout) or directly in DATA_DIR"
        raise DatasetNotFoundError(_missing_message("cifar10", root, missing, where))

    def batch(fname: str) -> tuple[np.ndarray, np.ndarray]:
        with open(folder / fname, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = entry.get(b"data", entry.get("data"))
        labels = entry.get(b"labels", entry.get("labels"))
        return np.asarray(data, dtype=np.uint8), np.asarray(labels, dtype=np.int64)

    train = [batch(f) for f in _CIFAR_FILES[:5]]
    test_x, test_y = batch("test_batch")

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)

    return ClassificationData(
        "cifar10",
        images(np.concatenate([x for x, _ in train])),
        torch.from_numpy(np.concatenate([y for _, y in train])),
        images(test_x),
        torch.from_numpy(test_y),
        10,
        f"pickle batches in {folder}",
    )


# ----------------------------------------------------------------------------- embedded


@functools.lru_cache(maxsize=1)
def _load_mnist1d() -> ClassificationData:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - the exp extra provides it
        raise ImportError("dataset 'mnist1d' needs the mnist1d package: pip install mnist1d") from e
    # make_dataset reseeds numpy's global RNG; keep the caller's stream untouched.
    state = np.random.get_state()  # noqa: NPY002 - mnist1d uses the legacy global RNG
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)  # noqa: NPY002

    def signals(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32)).unsqueeze(1)

    return ClassificationData(
        "mnist1d",
        signals(data["x"]),
        torch.from_numpy(data["y"].astype(np.int64)),
        signals(data["x_test"]),
        torch.from_numpy(data["y_test"].astype(np.int64)),
        10,
        "embedded: mnist1d.data.make_dataset(get_dataset_args()) (4000 train / 1000 test)",
    )


@functools.lru_cache(maxsize=1)
def _load_digits() -> ClassificationData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    # A fixed shuffle, then 1437 train / 360 test (80/20).
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(y))
    return ClassificationData(
        "digits",
        x[:n_train],
        y[:n_train],
        x[n_train:],
        y[n_train:],
        10,
        "embedded: sklearn.datasets.load_digits (1437 train / 360 test)",
    )


def load_classification(name: str, data_dir: str | Path | None = None) -> ClassificationData:
    """Load a classification dataset by name (see the module docstring)."""
    if name == "mnist1d":
        return _load_mnist1d()
    if name == "digits":
        return _load_digits()
    if name in _IDX_DIRS:
        return load_idx_dataset(name, data_dir)
    if name == "cifar10":
        return load_cifar10(data_dir)
    choices = ["mnist1d", "digits", *_IDX_DIRS, "cifar10"]
    raise ValueError(f"dataset must be one of {choices}, got dataset={name!r}")


def load_supersampling_images(name: str, data_dir: str | Path | None = None) -> torch.Tensor:
    """Source images for the supersampling task, float32 in [0, 1], shape (N, 3, H, W).

    ``crops``: the two natural images bundled with scikit-learn (427x640); training crops are
    drawn from them at random. ``cifar10``: the 50,000 CIFAR-10 training images (32x32).
    """
    if name == "crops":
        from sklearn.datasets import load_sample_images

        images = np.stack(load_sample_images().images).astype(np.float32) / 255.0
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if name == "cifar10":
        return load_cifar10(data_dir).x_train
    raise ValueError(f"supersampling dataset must be 'crops' or 'cifar10', got dataset={name!r}")
