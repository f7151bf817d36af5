"""CIFAR-10/100 from the python pickles users download from the Toronto site.

Nothing is downloaded here (devices and CI run offline): the user points at
``cifar-10-batches-py`` / ``cifar-100-python`` or at the folder containing it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._common import Dataset, normalized_pair
from ._io import load_pickle
from .errors import DataError


def _resolve(path: str | Path, folder: str, probe: str) -> Path:
    """Accept the extracted folder itself or its parent."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: path does not exist")
    if (p / folder).is_dir():
        p = p / folder
    if not (p / probe).exists():
        raise DataError(f"{p}: no {probe} here (expected {folder}/ or its parent)")
    return p


def _read_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickle -> (uint8 N,3,32,32, int64 N), validating keys and shapes."""
    d = load_pickle(path)
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, got {type(d).__name__}")
    for key in (b"data", label_key):
        if key not in d:
            raise DataError(f"{path}: missing key {key!r}")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[label_key])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(f"{path}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: {label_key!r} must hold {len(data)} integer labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _load(name: str, files: list[Path], test: Path, label_key: bytes,
          num_classes: int) -> tuple[Dataset, Dataset]:
    parts = [_read_batch(f, label_key, num_classes) for f in files]
    xte, yte = _read_batch(test, label_key, num_classes)
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    to01 = lambda a: a.astype(np.float32) / np.float32(255.0)  # noqa: E731
    return normalized_pair(name, num_classes, (to01(xtr), ytr), (to01(xte), yte))


def cifar10(path: str | Path) -> tuple[Dataset, Dataset]:
    """CIFAR-10: ``data_batch_1..5`` for training, ``test_batch`` for testing."""
    root = _resolve(path, "cifar-10-batches-py", "test_batch")
    files = [root / f"data_batch_{i}" for i in range(1, 6)]
    return _load("cifar10", files, root / "test_batch", b"labels", 10)


def cifar100(path: str | Path) -> tuple[Dataset, Dataset]:
    """CIFAR-100 with the 100 fine labels: ``train`` and ``test`` pickles."""
    root = _resolve(path, "cifar-100-python", "test")
    return _load("cifar100", [root / "train"], root / "test", b"fine_labels", 100)
