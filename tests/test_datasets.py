"""Dataset loaders: IDX and CIFAR pickle files written here, the missing-file message, and the
embedded datasets."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from steadystep.experiments import datasets


def _write_mnist(root, sub, gz, n_train=5, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / sub if sub else root
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    for stem, a in arrays.items():
        datasets.write_idx(folder / (stem + (".gz" if gz else "")), a)
    return arrays


def test_read_idx_round_trip_plain_and_gz(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        datasets.write_idx(tmp_path / name, a)
        b = datasets.read_idx(tmp_path / name)
        assert b.dtype == np.uint8 and b.shape == (2, 3, 4)
        assert np.array_equal(a, b)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "bad")
    # Header promises 10 values, file holds 2.
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00\x01")
    with pytest.raises(ValueError, match="holds 2 values"):
        datasets.read_idx(tmp_path / "short")


@pytest.mark.parametrize(
    ("name", "sub", "gz"),
    [
        ("mnist", "MNIST/raw", True),  # torchvision's layout, gzipped
        ("mnist", "MNIST/raw", False),
        ("fashion-mnist", "FashionMNIST/raw", False),
        ("fashion-mnist", "", True),  # files directly in DATA_DIR
    ],
)
def test_idx_dataset_layouts(tmp_path, name, sub, gz):
    arrays = _write_mnist(tmp_path, sub, gz)
    data = datasets.load_classification(name, tmp_path)
    assert data.x_train.shape == (5, 1, 28, 28) and data.x_test.shape == (3, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255)
    assert torch.equal(data.x_train[:, 0], expected)
    assert data.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert data.n_classes == 10 and data.name == name


def _write_cifar(folder, n=4, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for fname in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / fname, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        batches[fname] = (data, labels)
    return batches


def test_cifar10_pickle_batches(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    data = datasets.load_classification("cifar10", tmp_path)
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    first = torch.from_numpy(batches["data_batch_1"][0][0].reshape(3, 32, 32) / 255).float()
    assert torch.equal(data.x_train[0], first)
    assert data.y_test.tolist() == batches["test_batch"][1]
    # The same files directly in DATA_DIR are found too.
    assert datasets.load_cifar10(tmp_path / "cifar-10-batches-py").x_train.shape[0] == 20


def test_missing_files_name_the_files_and_the_place(tmp_path):
    _write_mnist(tmp_path, "MNIST/raw", gz=True)
    (tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(datasets.DatasetNotFoundError) as e:
        datasets.load_classification("mnist", tmp_path)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg and "train-images" not in msg
    assert "MNIST/raw" in msg and "--data-dir" in msg and str(tmp_path) in msg
    with pytest.raises(datasets.DatasetNotFoundError, match=r"data_batch_1.*test_batch"):
        datasets.load_classification("cifar10", tmp_path)
    with pytest.raises(datasets.DatasetNotFoundError, match="<none given>"):
        datasets.load_classification("fashion-mnist", None)
    with pytest.raises(ValueError, match="dataset must be one of"):
        datasets.load_classification("imagenet", tmp_path)


def test_mnist1d_is_generated_not_downloaded_and_keeps_numpy_state(monkeypatch):
    import mnist1d.data

    def no_download(*a, **k):
        raise AssertionError("the downloader must never be called")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    datasets._load_mnist1d.cache_clear()
    np.random.seed(123)  # noqa: NPY002 - checks that the loader restores the legacy global state
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    data = datasets.load_classification("mnist1d")
    assert np.array_equal(np.random.get_state()[1], before)  # noqa: NPY002
    assert data.x_train.shape == (4000, 1, 40) and data.x_test.shape == (1000, 1, 40)
    assert set(data.y_train.unique().tolist()) == set(range(10))
    assert torch.isfinite(data.x_train).all()


def test_digits_and_crops():
    digits = datasets.load_classification("digits")
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert 0.0 <= float(digits.x_train.min()) and float(digits.x_train.max()) <= 1.0
    crops = datasets.load_supersampling_images("crops")
    assert crops.shape == (2, 3, 427, 640) and crops.dtype == torch.float32
    assert 0.0 <= float(crops.min()) and float(crops.max()) <= 1.0


def test_standardized_per_coordinate():
    x = torch.randn(50, 1, 6) * 3 + 2
    x[:, 0, 0] = 5.0  # a constant coordinate stays finite
    data = datasets.ClassificationData(
        "t",
        x,
        torch.zeros(50, dtype=torch.long),
        x[:10],
        torch.zeros(10, dtype=torch.long),
        10,
        "t",
    )
    s = data.standardized("coordinate")
    assert torch.isfinite(s.x_train).all()
    assert torch.allclose(s.x_train[:, 0, 1:].mean(0), torch.zeros(5), atol=1e-5)
    assert torch.allclose(s.x_train[:, 0, 1:].std(0), torch.ones(5), atol=1e-5)
    with pytest.raises(ValueError, match="per must be"):
        data.standardized("pixel")


def test_gzip_detection_uses_the_suffix(tmp_path):
    # A gzipped file without .gz is not silently misread.
    a = np.zeros((2, 2), dtype=np.uint8)
    with gzip.open(tmp_path / "x-idx2-ubyte", "wb") as f:
        f.write(bytes([0, 0, 8, 2]) + (2).to_bytes(4, "big") * 2 + a.tobytes())
    with pytest.raises(ValueError):
        datasets.read_idx(tmp_path / "x-idx2-ubyte")


def _cifar_batch(n: int, seed: int) -> dict[bytes, object]:
    """A batch in the real format: the dict of the CIFAR-10 python tarball (bytes keys, uint8
    data of shape (n, 3072), a list of int labels, bytes file names)."""
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"training batch 1 of 5",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_restricted_unpickler_reads_the_real_format(tmp_path, protocol):
    """Protocol 2, as the tarball's files (numpy arrays through _reconstruct, bytes through
    _codecs.encode when pickled by Python 3), and the newest protocol (_frombuffer)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for i, fname in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        batches[fname] = _cifar_batch(3, seed=i)
        with open(folder / fname, "wb") as f:
            pickle.dump(batches[fname], f, protocol=protocol)
    data = datasets.load_cifar10(tmp_path)
    assert data.x_train.shape == (15, 3, 32, 32)
    assert data.y_test.tolist() == batches["test_batch"][b"labels"]
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)
    assert torch.equal(data.x_train[0], torch.from_numpy(first / 255).float())


class _Exploit:
    """Unpickling this runs a shell command: what a crafted file in --data-dir would do."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "payload",
    [
        lambda marker: _Exploit(marker),
        lambda marker: {b"data": _Exploit(marker), b"labels": [0]},
        lambda marker: {b"data": np.array([_Exploit(marker)], dtype=object), b"labels": [0]},
    ],
    ids=["object", "inside_the_dict", "object_array"],
)
def test_cifar10_refuses_a_malicious_pickle_and_runs_nothing(tmp_path, payload):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump(payload(marker), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_3.*refus"):
        datasets.load_cifar10(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ([1, 2, 3], "a dict"),
        ({b"labels": [0]}, "b'data'"),
        ({b"data": np.zeros((1, 3072), np.float32), b"labels": [0]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images and 1 labels"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [11]}, r"labels in \[0, 10\)"),
    ],
)
def test_cifar10_refuses_a_batch_of_another_shape(tmp_path, entry, match):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(entry, f, protocol=2)
    with pytest.raises(ValueError, match=match):
        datasets.load_cifar10(tmp_path)
