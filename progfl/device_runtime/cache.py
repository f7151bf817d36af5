"""Frozen-prefix feature cache: prefix outputs of the local data, on disk, memory-mapped.

Keyed by the prefix file's sha256, its weights and the data, so a new stage, new prefix weights or new data
never hit a stale entry. Memory-mapping lets later rounds read features without holding them all in RAM.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..manifest import write_atomic


class FeatureCache:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    @staticmethod
    def key(kind: str, session_digest: str, data: np.ndarray) -> str:
        h = hashlib.sha256(f"{kind}:{session_digest}:{data.dtype}:{data.shape}".encode())
        h.update(np.ascontiguousarray(data).tobytes())
        return h.hexdigest()[:32]

    def get_or_compute(self, kind: str, session_digest: str, data: np.ndarray,
                       compute: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.folder / f"{kind}-{self.key(kind, session_digest, data)}.npy"
        if path.exists():
            try:
                out = np.load(path, mmap_mode="r")
                if len(out) == len(data):
                    self.hits += 1
                    return out
            except (ValueError, OSError):
                pass  # a damaged entry is recomputed below
        self.misses += 1
        value = np.ascontiguousarray(compute(), dtype=np.float32)
        write_atomic(path, lambda fh: np.save(fh, value))
        return np.load(path, mmap_mode="r")
