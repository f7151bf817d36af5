"""FEMNIST in the LEAF json format, keeping writer ids.

The writer id is what makes FEMNIST interesting for federated learning (each
writer is a natural client), so it is returned as ``Dataset.groups``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ._common import Dataset, normalized_pair
from .errors import DataError

NUM_CLASSES = 62


def _read_json(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One LEAF file -> {writer: (x float32 (n, 784), y int64 (n,))}."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable json ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("user_data"), dict):
        raise DataError(f"{path}: missing 'user_data' object (not a LEAF file)")
    users = doc.get("users", list(doc["user_data"]))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for u in users:
        rec = doc["user_data"].get(u)
        if not isinstance(rec, dict) or "x" not in rec or "y" not in rec:
            raise DataError(f"{path}: user {u!r} has no 'x'/'y' data")
        try:
            n = len(rec["x"])
            x = np.asarray(rec["x"], np.float32).reshape(n, -1) if n else np.zeros((0, 784), np.float32)
            y = np.asarray(rec["y"], np.int64).reshape(-1)
        except (ValueError, TypeError):
            raise DataError(f"{path}: user {u!r} has ragged or non-numeric data") from None
        if x.shape[1:] != (784,) and len(x):
            raise DataError(f"{path}: user {u!r} images have {x.shape[1]} values, expected 784")
        if len(x) != len(y):
            raise DataError(f"{path}: user {u!r} has {len(x)} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise DataError(f"{path}: user {u!r} labels outside [0, {NUM_CLASSES})")
        out[str(u)] = (x.reshape(-1, 784), y)
    return out


def _read_dir(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DataError(f"{folder}: no .json files")
    merged: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for f in files:
        for u, xy in _read_json(f).items():
            merged.setdefault(u, []).append(xy)
    return {u: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v]))
            for u, v in merged.items()}


def _split_writers(data: dict[str, tuple[np.ndarray, np.ndarray]], test_fraction: float,
                   seed: int) -> tuple[dict, dict]:
    """Hold out a fraction of every writer's samples (LEAF's 'sample' split)."""
    rng = np.random.default_rng(seed)
    tr, te = {}, {}
    for u in sorted(data):
        x, y = data[u]
        perm = rng.permutation(len(y))
        k = int(round(len(y) * test_fraction)) if len(y) > 1 else 0
        te[u] = (x[perm[:k]], y[perm[:k]])
        tr[u] = (x[perm[k:]], y[perm[k:]])
    return tr, te


def _stack(data: dict, ids: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    users = sorted(data)
    x = np.concatenate([data[u][0] for u in users] or [np.zeros((0, 784), np.float32)])
    y = np.concatenate([data[u][1] for u in users] or [np.zeros(0, np.int64)])
    g = np.concatenate([np.full(len(data[u][1]), ids[u], np.int64) for u in users]
                       or [np.zeros(0, np.int64)])
    return x.reshape(-1, 1, 28, 28).astype(np.float32), y, g


def femnist(path: str | Path, seed: int = 0, test_fraction: float = 0.1) -> tuple[Dataset, Dataset]:
    """LEAF FEMNIST from ``path/train/*.json`` + ``path/test/*.json``.

    A plain folder of json files is also accepted; then each writer's samples
    are split with ``seed``/``test_fraction``. Writer ids (``groups``) index
    ``group_names`` (sorted writer names) and are shared by both splits.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: FEMNIST folder does not exist")
    if (root / "train").is_dir() and (root / "test").is_dir():
        tr, te = _read_dir(root / "train"), _read_dir(root / "test")
    else:
        tr, te = _split_writers(_read_dir(root), test_fraction, seed)
    names = sorted(set(tr) | set(te))
    ids = {u: i for i, u in enumerate(names)}
    xtr, ytr, gtr = _stack(tr, ids)
    xte, yte, gte = _stack(te, ids)
    if max(xtr.max(initial=0.0), xte.max(initial=0.0)) > 1.0:  # some exports keep 0..255
        xtr /= np.float32(255.0)
        xte /= np.float32(255.0)
    return normalized_pair("femnist", NUM_CLASSES, (xtr, ytr), (xte, yte),
                           groups=(gtr, gte), group_names=names)
