"""The ``Dataset`` record and the helpers every loader shares.

Kept apart from the loaders so that the CIFAR/FEMNIST readers and the bundled
loaders can all build datasets the same way (same scaling, same normalization,
same validation) without import cycles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import DataError


@dataclass
class Dataset:
    """Images ready for training: what devices and the server both consume.

    ``x`` is float32 (N, C, H, W): pixels scaled to [0, 1], then normalized per
    channel with ``mean``/``std`` (computed on the training split and reused for
    the test split, so both live in the same input space). ``groups`` holds a
    natural owner id per sample (FEMNIST writer) or None.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    std: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    groups: np.ndarray | None = None
    group_names: list[str] | None = None

    def __post_init__(self) -> None:
        x, y = self.x, self.y
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4:
            raise DataError(f"{self.name}: x must be a float32 (N, C, H, W) array")
        if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
            raise DataError(f"{self.name}: y must be an int64 1-D array")
        if len(x) != len(y):
            raise DataError(f"{self.name}: x has {len(x)} samples but y has {len(y)}")
        if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
            raise DataError(f"{self.name}: labels outside [0, {self.num_classes})")
        c = x.shape[1]
        if self.mean.size == 0:  # not normalized: identity transform
            self.mean, self.std = np.zeros(c, np.float32), np.ones(c, np.float32)
        self.mean = np.asarray(self.mean, np.float32).reshape(-1)
        self.std = np.asarray(self.std, np.float32).reshape(-1)
        if self.mean.shape != (c,) or self.std.shape != (c,):
            raise DataError(f"{self.name}: mean/std must have one value per channel ({c})")
        if self.groups is not None:
            self.groups = np.asarray(self.groups, np.int64)
            if self.groups.shape != y.shape:
                raise DataError(f"{self.name}: groups must have one id per sample")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Dataset:
        """The samples at ``idx``, keeping normalization and group ids."""
        idx = np.asarray(idx, np.int64)
        g = None if self.groups is None else self.groups[idx]
        return Dataset(self.x[idx], self.y[idx], self.num_classes, self.name,
                       self.mean, self.std, g, self.group_names)

    def label_histogram(self) -> np.ndarray:
        """Samples per class (length ``num_classes``)."""
        return np.bincount(self.y, minlength=self.num_classes)


def normalized_pair(
    name: str,
    num_classes: int,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    groups: tuple[np.ndarray, np.ndarray] | None = None,
    group_names: list[str] | None = None,
) -> tuple[Dataset, Dataset]:
    """Normalize [0, 1] float32 images with train-split channel stats.

    Works in place on the given arrays to avoid doubling memory for CIFAR.
    """
    xtr, xte = train[0], test[0]
    if len(xtr) == 0:
        raise DataError(f"{name}: training split is empty")
    mean = xtr.mean(axis=(0, 2, 3), dtype=np.float64)
    std = xtr.std(axis=(0, 2, 3), dtype=np.float64)
    std = np.where(std > 1e-8, std, 1.0)
    shape = (1, -1, 1, 1)
    for x in (xtr, xte):
        x -= mean.astype(np.float32).reshape(shape)
        x /= std.astype(np.float32).reshape(shape)
    gtr, gte = groups if groups is not None else (None, None)
    mk = lambda x, y, g: Dataset(x, np.asarray(y, np.int64), num_classes, name,  # noqa: E731
                                 mean.astype(np.float32), std.astype(np.float32), g, group_names)
    return mk(xtr, train[1], gtr), mk(xte, test[1], gte)


def stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic held-out split keeping class proportions (sorted indices)."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[: int(round(len(idx) * test_fraction))])
    te = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    mask = np.ones(len(y), bool)
    mask[te] = False
    return np.flatnonzero(mask).astype(np.int64), te.astype(np.int64)
