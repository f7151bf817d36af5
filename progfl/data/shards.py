"""Per-device shard files: what the server hands to each device.

Devices only ever need ``x``/``y`` arrays, so shards are plain ``.npz`` files
(numpy only, no pickle). A shard folder appears atomically (written beside
``out_dir`` then renamed), so a crash never leaves a half-written set that a
later run would mistake for a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..device_runtime.shard import ShardError, read_shard  # one reader, device side
from ..manifest import write_atomic
from ._common import Dataset
from .errors import DataError

__all__ = ["read_dataset", "read_shard", "write_dataset", "write_shards"]

INDEX_FILE = "index.json"


def _shard_name(i: int) -> str:
    return f"device_{i:04d}.npz"


def write_shards(dataset: Dataset, parts: list[np.ndarray], out_dir: str | Path) -> list[Path]:
    """Write ``device_0000.npz``... (x float32, y int64) and ``index.json``.

    Refuses a non-empty existing ``out_dir`` and empty parts. Returns the shard
    paths in device order (inside the final ``out_dir``).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: output folder exists and is not empty")
    n = len(dataset)
    for i, p in enumerate(parts):
        p = np.asarray(p)
        if p.ndim != 1 or len(p) == 0:
            raise DataError(f"part {i}: empty or not a 1-D index array")
        if p.dtype.kind not in "iu" or p.min() < 0 or p.max() >= n:
            raise DataError(f"part {i}: indices must be integers in [0, {n})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hists: list[list[int]] = []
        for i, p in enumerate(parts):
            y = dataset.y[p].astype(np.int64)
            np.savez(tmp / _shard_name(i), x=dataset.x[p].astype(np.float32, copy=False), y=y)
            hists.append(np.bincount(y, minlength=dataset.num_classes).tolist())
        index = {
            "dataset": dataset.name,
            "num_classes": dataset.num_classes,
            "num_devices": len(parts),
            "input_shape": list(dataset.x.shape[1:]),
            "mean": dataset.mean.tolist(),
            "std": dataset.std.tolist(),
            "files": [_shard_name(i) for i in range(len(parts))],
            "counts": [int(len(p)) for p in parts],
            "label_histograms": hists,
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / _shard_name(i) for i in range(len(parts))]


def write_dataset(ds: Dataset, path: str | Path) -> Path:
    """Save a whole Dataset (e.g. the held-out test set) as one .npz, atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x": ds.x, "y": ds.y, "mean": ds.mean, "std": ds.std,
              "num_classes": np.int64(ds.num_classes), "name": np.str_(ds.name)}
    if ds.groups is not None:
        arrays["groups"] = ds.groups
    if ds.group_names is not None:
        arrays["group_names"] = np.asarray(ds.group_names, dtype=np.str_)
    write_atomic(p, lambda fh: np.savez(fh, **arrays))
    return p


def read_dataset(path: str | Path) -> Dataset:
    """Load a Dataset written by ``write_dataset``; errors are DataError."""
    p = Path(path)
    try:
        x, y = read_shard(p)
    except ShardError as e:
        raise DataError(str(e)) from None
    with np.load(p, allow_pickle=False) as z:  # members load on access: only the small ones below
        d = {k: z[k] for k in ("mean", "std", "num_classes", "name", "groups", "group_names") if k in z.files}
    for k in ("mean", "std", "num_classes", "name"):
        if k not in d:
            raise DataError(f"{p}: missing array {k!r} (not written by write_dataset?)")
    names = d["group_names"].tolist() if "group_names" in d else None
    return Dataset(x, y, int(d["num_classes"]), str(d["name"]), d["mean"], d["std"],
                   d.get("groups"), names)
