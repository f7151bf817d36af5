"""Rows of an on-disk array read by index into a reused buffer: the one way a device touches its data.

A round must not hold its whole shard (a 5,000-sample CIFAR shard is 61 MB of float32) or its cached
features in memory. A memory map is no answer: every page a round touches counts in the process's RSS until
the kernel reclaims it, and a shuffled epoch touches them all. Reading rows with plain file reads into one
micro-batch buffer keeps what is resident at one micro-batch, whatever the number of rows; the bytes on their
way live in the kernel's page cache, which does not count against the process.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..manifest import write_atomic


class RowReader:
    """`n` rows of `shape` and `dtype` stored C-contiguously in an open binary file from byte `offset` on.
    ValueError if the file is too short to hold them."""

    def __init__(self, fh: BinaryIO, offset: int, n: int, shape: tuple[int, ...], dtype: np.dtype):
        self.fh, self.offset, self.n = fh, offset, n
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._buffer = np.empty((0, *self.shape), self.dtype)
        have, need = fh.seek(0, 2) - offset, n * self.row_bytes
        if have < need:
            raise ValueError(f"truncated: {have} of {need} bytes")

    def buffer(self, rows: int) -> np.ndarray:
        """A buffer of at least `rows` rows, reused between calls (grown, never shrunk)."""
        if len(self._buffer) < rows:
            self._buffer = np.empty((rows, *self.shape), self.dtype)
        return self._buffer[:rows]

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` in that order, in the reused buffer (valid until the next read). Runs of consecutive indices
        are read with one call each."""
        idx = np.asarray(idx, np.int64)
        rows = self.buffer(len(idx))
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"row index out of range [0, {self.n})")
        view = rows.reshape(len(idx), -1).view(np.uint8)
        start = 0
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        for stop in [*breaks.tolist(), len(idx)]:
            self._read_into(int(idx[start]), view[start:stop])
            start = stop
        return rows

    def close(self) -> None:
        self.fh.close()

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) over the whole array in order, `size` rows at a time, in the reused buffer."""
        for start in range(0, self.n, size):
            stop = min(self.n, start + size)
            yield start, self.read(np.arange(start, stop))

    def _read_into(self, first: int, dest: np.ndarray) -> None:
        self.fh.seek(self.offset + first * self.row_bytes)
        mv, got = memoryview(dest).cast("B"), 0
        while got < len(mv):
            n = self.fh.readinto(mv[got:])
            if not n:
                raise OSError(f"short read at row {first}: {got} of {len(mv)} bytes (file truncated?)")
            got += n


def read_npy_header(fh: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy array that starts at the file's position; ValueError if none."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    raise ValueError(f".npy format version {version} is not supported")


def write_rows(path: str | Path, n: int, chunks: Iterable[np.ndarray]) -> None:
    """A float32 .npy of `n` rows written from `chunks` as they come (atomically): never all rows in memory."""

    def write(fh: BinaryIO) -> None:
        it = iter(chunks)
        first = np.ascontiguousarray(next(it), np.float32)
        header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
                  "shape": (n, *first.shape[1:])}
        np.lib.format.write_array_header_1_0(fh, header)
        count = 0
        for chunk in itertools.chain([first], it):
            chunk = np.ascontiguousarray(chunk, np.float32)
            fh.write(memoryview(chunk).cast("B"))
            count += len(chunk)
        if count != n:
            raise ValueError(f"{path}: wrote {count} rows, expected {n}")

    write_atomic(path, write)


def open_rows(path: str | Path) -> RowReader:
    """A .npy written by `write_rows`, open for reading by row; ValueError/OSError if damaged or truncated."""
    fh = open(path, "rb", buffering=0)
    try:
        shape, fortran, dtype = read_npy_header(fh)
        if fortran or not shape:
            raise ValueError(f"{path}: not a C-order array of rows")
        return RowReader(fh, fh.tell(), shape[0], shape[1:], dtype)
    except BaseException:
        fh.close()
        raise
