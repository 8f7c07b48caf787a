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
  ``test_batch``) or the same files directly in ``DATA_DIR``, read with an unpickler that builds
  only what the format holds (a crafted file is refused, never run).

Every loader returns float32 tensors on the CPU; the experiments move them to the device once.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steadystep.experiments._deps import require

__all__ = [
    "EMBEDDED",
    "REAL",
    "SIZES",
    "ClassificationData",
    "DatasetNotFoundError",
    "UnsafePickleError",
    "load_cifar10",
    "load_classification",
    "load_idx_dataset",
    "load_supersampling_images",
    "read_idx",
    "write_idx",
]

EMBEDDED = ("mnist1d", "digits", "crops")
REAL = ("mnist", "fashion-mnist", "cifar10")
# (training examples, test examples, shape of one input) of each classification dataset, known
# without loading it (for the compute estimate in steadystep.experiments.estimate)
SIZES: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "mnist1d": (4000, 1000, (1, 40)),
    "digits": (1437, 360, (1, 8, 8)),
    "mnist": (60000, 10000, (1, 28, 28)),
    "fashion-mnist": (60000, 10000, (1, 28, 28)),
    "cifar10": (50000, 10000, (3, 32, 32)),
}

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

    def to(self, device: torch.device) -> ClassificationData:
        """The same examples on ``device`` (the loaders return them on the CPU)."""
        return replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
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

    train = [_read_cifar_batch(folder / f) for f in _CIFAR_FILES[:5]]
    test_x, test_y = _read_cifar_batch(folder / "test_batch")

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


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A dataset file that is not what its format holds (refused, never executed)."""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10's python batches that builds nothing else.

    ``pickle.load`` calls whatever a file names, so a crafted file in ``--data-dir`` would run
    code. A batch is a dict of bytes keys, lists of ints and bytes, and a uint8 numpy array;
    pickled, that names only numpy's array rebuilders (``_reconstruct`` with ``ndarray`` and
    ``dtype`` up to protocol 4, ``_frombuffer`` from protocol 5) and, in files that Python 3
    wrote with protocol 2, ``_codecs.encode`` for bytes. Those are the only globals resolved,
    each to a guarded stand-in: dtypes that hold Python objects are refused and the codec is
    latin-1 only. Anything else is an ``UnpicklingError`` naming the file and the global.
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str) -> Any:
        allowed = _CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 python batch holds "
                "only dicts, lists, bytes, ints and uint8 numpy arrays (a crafted or foreign "
                "file; replace it with the original from the CIFAR-10 tarball)"
            )
        return allowed()


def _numpy_function(name: str, modules: tuple[str, ...]) -> Any:
    """numpy's ``name`` from the first of ``modules`` that has it (``numpy._core`` in numpy 2,
    ``numpy.core`` before)."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"this numpy has no {name} in {modules}")  # pragma: no cover


def _plain_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(
            f"refusing a numpy dtype that holds Python objects ({dtype}): a CIFAR-10 batch "
            "holds uint8 arrays"
        )
    return dtype


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding={encoding!r}")
    return text.encode("latin1")


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    frombuffer = _numpy_function("_frombuffer", ("numpy._core.numeric", "numpy.core.numeric"))
    return frombuffer(buffer, _plain_dtype(dtype), shape, order)


_RECONSTRUCT = ("numpy._core.multiarray", "numpy.core.multiarray")
_CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    **{
        (m, "_reconstruct"): lambda: _numpy_function("_reconstruct", _RECONSTRUCT)
        for m in _RECONSTRUCT
    },
    **{
        (m, "_frombuffer"): lambda: _frombuffer
        for m in ("numpy._core.numeric", "numpy.core.numeric")
    },
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _plain_dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data, labels)`` of one python batch: uint8 ``(N, 3072)`` and int64 ``(N,)`` in
    [0, 10), read with :class:`_CifarUnpickler`; anything else is a ValueError (or an
    ``UnpicklingError``) naming the file."""
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f).load()
    except OSError:
        raise
    except Exception as e:  # whatever the bytes made the unpickler raise: not a CIFAR batch
        raise UnsafePickleError(f"{path}: {e}") from e
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: a CIFAR-10 batch is a dict, found {type(entry).__name__}")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: a CIFAR-10 batch has b'data' and b'labels', found {list(entry)}")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), found {found}")
    if data.shape[1] != 3072:
        raise ValueError(f"{path}: b'data' must have 3072 columns (3x32x32), found {data.shape}")
    if not (isinstance(labels, list) and all(type(y) is int for y in labels)):
        raise ValueError(f"{path}: b'labels' must be a list of ints")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images and {len(labels)} labels")
    y = np.asarray(labels, dtype=np.int64)
    if y.size and not (0 <= y.min() and y.max() < 10):
        raise ValueError(f"{path}: CIFAR-10 has labels in [0, 10), found {y.min()}..{y.max()}")
    return data, y


# ----------------------------------------------------------------------------- embedded


@functools.lru_cache(maxsize=1)
def _load_mnist1d() -> ClassificationData:
    mnist1d = require("mnist1d.data", "the embedded dataset mnist1d")
    get_dataset_args, make_dataset = mnist1d.get_dataset_args, mnist1d.make_dataset
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
    digits = require("sklearn.datasets", "the embedded dataset digits").load_digits()
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
        sklearn_datasets = require("sklearn.datasets", "the embedded dataset crops")
        images = np.stack(sklearn_datasets.load_sample_images().images).astype(np.float32) / 255.0
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if name == "cifar10":
        return load_cifar10(data_dir).x_train
    raise ValueError(f"supersampling dataset must be 'crops' or 'cifar10', got dataset={name!r}")
