"""Per-device shard files: what the server hands to each device.

Devices only ever need ``x``/``y`` arrays, so shards are plain ``.npz`` files
(numpy only, no pickle). A shard folder appears atomically (written beside
``out_dir`` then renamed), so a crash never leaves a half-written set that a
later run would mistake for a complete one.

Two ways to write them: ``write_shards`` writes every device's file now;
``write_partition`` + ``DeviceShards`` keep the training set and the partition
once and write a device's file the first time it is asked for, so a fleet of
10,000 devices of which a few hundred ever train costs the disk and the server
only those few hundred files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..device_runtime.shard import ShardError, read_shard  # one reader, device side
from ..manifest import write_atomic
from ._common import Dataset
from .errors import DataError

__all__ = ["DeviceShards", "read_dataset", "read_shard", "write_dataset", "write_partition", "write_shards"]

INDEX_FILE = "index.json"
SAMPLES_FILE = "samples.npy"  # the training set's x, read by rows (memory-mapped) when a shard is written
LABELS_FILE = "labels.npy"
PARTITION_FILE = "partition.npz"  # every device's sample indices, concatenated, and where each device's start
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the zip timestamp of a lazily written shard: its bytes must not depend on when


def _shard_name(i: int) -> str:
    return f"device_{i:04d}.npz"


def _check_parts(parts: list[np.ndarray], n: int, allow_empty: bool) -> None:
    for i, p in enumerate(parts):
        p = np.asarray(p)
        if p.ndim != 1 or (len(p) == 0 and not allow_empty):
            raise DataError(f"part {i}: empty or not a 1-D index array")
        if len(p) and (p.dtype.kind not in "iu" or p.min() < 0 or p.max() >= n):
            raise DataError(f"part {i}: indices must be integers in [0, {n})")


def _empty_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: output folder exists and is not empty")


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty, checked before
    os.rename(tmp, out)


def _index(dataset: Dataset, counts: list[int], hists: list[list[int]], **extra: object) -> dict[str, object]:
    """index.json: the data set, and each device's sample count and label histogram (what the server selects by)."""
    return {"dataset": dataset.name, "num_classes": dataset.num_classes, "num_devices": len(counts),
            "input_shape": list(dataset.x.shape[1:]), "mean": dataset.mean.tolist(), "std": dataset.std.tolist(),
            **extra, "counts": counts, "label_histograms": hists}


def write_shards(dataset: Dataset, parts: list[np.ndarray], out_dir: str | Path) -> list[Path]:
    """Write ``device_0000.npz``... (x float32, y int64) and ``index.json``.

    Refuses a non-empty existing ``out_dir`` and empty parts. Returns the shard
    paths in device order (inside the final ``out_dir``).
    """
    out = Path(out_dir)
    _empty_target(out)
    _check_parts(parts, len(dataset), allow_empty=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hists: list[list[int]] = []
        for i, p in enumerate(parts):
            y = dataset.y[p].astype(np.int64)
            np.savez(tmp / _shard_name(i), x=dataset.x[p].astype(np.float32, copy=False), y=y)
            hists.append(np.bincount(y, minlength=dataset.num_classes).tolist())
        index = _index(dataset, [int(len(p)) for p in parts], hists, files=[_shard_name(i) for i in range(len(parts))])
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / _shard_name(i) for i in range(len(parts))]


def write_partition(dataset: Dataset, parts: list[np.ndarray], out_dir: str | Path) -> None:
    """Write what ``DeviceShards`` needs to write any device's shard later: the training set once (``samples.npy``,
    ``labels.npy``), the partition (``partition.npz``) and ``index.json`` with each device's sample count and label
    histogram (the small per-device record the server selects by). No shard is written here.

    Empty parts are allowed (devices left without samples, which never train); all of them empty is not. The
    folder appears atomically, like write_shards'."""
    out = Path(out_dir)
    _empty_target(out)
    _check_parts(parts, len(dataset), allow_empty=True)
    counts = np.array([len(p) for p in parts], np.int64)
    if not counts.any():
        raise DataError("every part is empty: no device holds data")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        order = np.concatenate([np.asarray(p, np.int64) for p in parts])
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        y = dataset.y.astype(np.int64)
        hists = np.zeros((len(parts), dataset.num_classes), np.int64)
        owner = np.repeat(np.arange(len(parts)), counts)
        np.add.at(hists, (owner, y[order]), 1)
        np.save(tmp / SAMPLES_FILE, dataset.x.astype(np.float32, copy=False))
        np.save(tmp / LABELS_FILE, y)
        np.savez(tmp / PARTITION_FILE, order=order, offsets=offsets)
        index = _index(dataset, counts.tolist(), hists.tolist(), lazy=True)  # device_XXXX.npz appear when selected
        (tmp / INDEX_FILE).write_text(json.dumps(index, separators=(",", ":")))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _savez_fixed(fh: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
    """numpy.savez's archive (uncompressed .npy members) with a fixed timestamp: the same arrays give the same bytes,
    whenever and however often they are written."""
    with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=_EPOCH)
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)


@dataclass
class DeviceShards:
    """The shards of one run's devices, written lazily from ``write_partition``'s folder.

    Holds only the per-device counts and label histograms (what selection needs); the partition and the samples stay
    on disk until a shard is written. ``path(i)`` writes device i's shard the first time (atomically, with the same
    bytes whichever round or process writes it) so a run killed at any point and resumed trains on the same data.
    A folder from ``write_shards`` (every shard already there) opens too."""

    folder: Path
    counts: np.ndarray  # samples per device
    label_histograms: np.ndarray  # (devices, classes)

    @classmethod
    def open(cls, folder: str | Path) -> DeviceShards:
        folder = Path(folder)
        try:
            index = json.loads((folder / INDEX_FILE).read_text())
            counts = np.asarray(index["counts"], np.int64)
            hists = np.asarray(index["label_histograms"], np.int64).reshape(len(counts), -1)
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{folder / INDEX_FILE}: unreadable shard index ({e})") from None
        for stale in folder.glob(".device_*.npz.*"):  # a write_atomic temp left by a server that was killed
            stale.unlink(missing_ok=True)
        return cls(folder, counts, hists)

    def __len__(self) -> int:
        return len(self.counts)

    def path(self, i: int) -> Path:
        """Device i's shard file, written now if it is not there yet."""
        path = self.folder / _shard_name(i)
        if path.exists():
            return path
        if not 0 <= i < len(self.counts) or self.counts[i] == 0:
            raise DataError(f"device {i} holds no samples: it has no shard")
        with np.load(self.folder / PARTITION_FILE, allow_pickle=False) as z:
            offsets = z["offsets"]
            rows = z["order"][offsets[i]:offsets[i + 1]]
        x = np.load(self.folder / SAMPLES_FILE, mmap_mode="r")[rows]  # reads only these rows
        y = np.load(self.folder / LABELS_FILE, mmap_mode="r")[rows]
        write_atomic(path, lambda fh: _savez_fixed(fh, {"x": np.ascontiguousarray(x, np.float32),
                                                        "y": np.asarray(y, np.int64)}))
        return path


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
