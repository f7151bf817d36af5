"""A device's local data: an .npz with x (float32, N x C x H x W) and y (integer labels), validated.

The data module writes shards; the device reads them with this, so the format has one reader.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..manifest import ManifestError


class ShardError(ManifestError):
    """A data shard that is missing, unreadable or not in the shard format."""


def open_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ShardError(f"{path}: file not found")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ShardError(f"{path}: not an .npz archive (a single .npy array?)")
        with z:
            return {k: z[k] for k in z.files}
    except ShardError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ShardError(f"{path}: unreadable .npz ({e})") from None


def check_xy(path: Path, d: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    missing = [k for k in ("x", "y") if k not in d]
    if missing:
        raise ShardError(f"{path}: missing array(s) {', '.join(missing)} (has {sorted(d)})")
    x, y = d["x"], d["y"]
    if x.dtype != np.float32 or x.ndim != 4:
        raise ShardError(f"{path}: x must be float32 4-D, got {x.dtype} {x.ndim}-D")
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise ShardError(f"{path}: y must be integer 1-D, got {y.dtype} {y.ndim}-D")
    if len(x) != len(y):
        raise ShardError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    if len(y) == 0:
        raise ShardError(f"{path}: empty data shard")
    return x, y.astype(np.int64, copy=False)


def read_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load one device shard -> (x float32 N,C,H,W; y int64 N), validated."""
    p = Path(path)
    return check_xy(p, open_npz(p))
