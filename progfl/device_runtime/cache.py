"""Frozen-prefix feature cache: what the frozen blocks make of the local data, on disk, read a micro-batch at a time.

An entry is keyed by the frozen file's sha256, the weights bound to it and the data's digest, so a new stage, new
prefix weights or new data never hit a stale entry. Entries are `.npy` files read with plain file reads into a
reused buffer (see rows.py: a memory map would put every touched page into the process's RSS). The newest
`keep` entries stay; older ones are deleted, so the folder does not grow with the number of stages trained.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .rows import RowReader, open_rows, write_rows


class FeatureCache:
    def __init__(self, folder: str | os.PathLike, keep: int = 4):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.hits = self.misses = 0

    def path(self, kind: str, session_digest: str, data_digest: str) -> Path:
        key = hashlib.sha256(f"{kind}:{session_digest}:{data_digest}".encode()).hexdigest()[:32]
        return self.folder / f"{kind}-{key}.npy"

    def get_or_compute(self, kind: str, session_digest: str, data_digest: str, n: int,
                       compute: Callable[[], Iterable[np.ndarray]]) -> RowReader:
        """The entry's rows, open for reading; `compute` yields its n rows in order, chunk by chunk, on a miss."""
        path = self.path(kind, session_digest, data_digest)
        if path.exists():
            try:
                rows = open_rows(path)
                if rows.n == n:
                    self.hits += 1
                    os.utime(path)  # most recently used
                    return rows
                rows.close()
            except (ValueError, OSError):
                pass  # a damaged entry is recomputed below
        self.misses += 1
        write_rows(path, n, compute())
        self._evict()
        return open_rows(path)

    def _evict(self) -> None:
        entries = sorted(self.folder.glob("*.npy"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[self.keep:]:
            old.unlink(missing_ok=True)
