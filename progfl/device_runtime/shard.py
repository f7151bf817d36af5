"""A device's local data (its shard): opened once, validated, then read in micro-batches.

The format is an `.npz` archive, as `numpy.savez` writes it, with two arrays:
    x  float32, shape (N, C, H, W), C-order: the samples, already normalised the way the model was trained
       (progfl's datasets: pixels scaled to [0, 1], then per-channel mean/std of the training split)
    y  integer, shape (N,): class labels 0 .. num_classes-1
`numpy.savez` stores each array uncompressed, so x is read in slices straight from the archive and a round
never holds the shard in memory. A compressed archive (`numpy.savez_compressed`) is accepted too: its x is
inflated once, in chunks, into a scratch file, then read the same way. Labels stay resident (8 bytes a sample).

`read_shard` loads a whole shard at once, for the server side and for tools; devices use `Shard`.
"""

from __future__ import annotations

import hashlib
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..manifest import ManifestError
from .rows import RowReader, read_npy_header

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header: signature ... name length, extra length
_CHUNK_BYTES = 1 << 20  # validation, hashing and inflation work 1 MB of rows at a time


class ShardError(ManifestError):
    """A data shard that is missing, unreadable or not in the shard format."""


def _npy_header(fh: BinaryIO, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        return read_npy_header(fh)
    except ValueError as e:
        raise ShardError(f"{where}: not a .npy array ({e})") from None


def _stored_offset(fh: BinaryIO, info: zipfile.ZipInfo, where: str) -> int:
    """Byte offset of an uncompressed member's data in the archive (after its local header)."""
    fh.seek(info.header_offset)
    raw = fh.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size or raw[:4] != b"PK\x03\x04":
        raise ShardError(f"{where}: damaged zip entry")
    *_, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


class Shard:
    """One shard file, open for reading: `y` resident, `x` read by index (`read`) or in order (`chunks`).

    `scratch` is where a compressed archive's x is inflated (a temporary file, deleted on close); give the
    device's cache folder where /tmp is small or kept in RAM."""

    def __init__(self, path: str | Path, scratch: str | Path | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ShardError(f"{self.path}: file not found")
        self._files: list[BinaryIO] = []
        self.digest: str | None = None  # set by validate()
        try:
            self._open(scratch)
        except BaseException:
            self.close()
            raise

    def _open(self, scratch: str | Path | None) -> None:
        fh = open(self.path, "rb", buffering=0)
        self._files.append(fh)
        try:
            zf = zipfile.ZipFile(fh)
            infos = {i.filename: i for i in zf.infolist()}
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ShardError(f"{self.path}: not an .npz archive ({e})") from None
        missing = [k for k in ("x", "y") if f"{k}.npy" not in infos]
        if missing:
            have = sorted(n.removesuffix(".npy") for n in infos)
            raise ShardError(f"{self.path}: missing array(s) {', '.join(missing)} (has {have})")
        self.y = _labels(zf, self.path)
        self.x = self._x_rows(zf, infos["x.npy"], scratch)
        if self.x.n != len(self.y):
            raise ShardError(f"{self.path}: x has {self.x.n} samples but y has {len(self.y)}")

    def _x_rows(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, scratch: str | Path | None) -> RowReader:
        where = f"{self.path} (x)"
        if info.compress_type == zipfile.ZIP_STORED:
            fh = self._files[0]
            fh.seek(_stored_offset(fh, info, where))
            shape, fortran, dtype = _npy_header(fh, where)
            offset = fh.tell()
        else:  # savez_compressed: inflate x once into a scratch file, a chunk at a time
            if scratch is not None:
                Path(scratch).mkdir(parents=True, exist_ok=True)
            out = tempfile.TemporaryFile(dir=scratch)
            self._files.append(out)
            with zf.open(info) as src:
                shape, fortran, dtype = _npy_header(src, where)
                for block in iter(lambda: src.read(_CHUNK_BYTES), b""):
                    out.write(block)
            out.flush()
            fh, offset = out, 0
        if dtype != np.float32 or len(shape) != 4 or fortran:
            raise ShardError(f"{self.path}: x must be C-order float32 (N, C, H, W), got {dtype} {list(shape)}"
                             + (" in Fortran order" if fortran else ""))
        try:
            return RowReader(fh, offset, shape[0], shape[1:], dtype)
        except ValueError as e:
            raise ShardError(f"{where}: {e}") from None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.x.shape

    def validate(self, input_shape: list[int] | tuple[int, ...], num_classes: int) -> str:
        """Check the shard against the model (sample shape, labels in range, finite pixels), streaming x once;
        returns (and keeps as `digest`) a sha256 of the data, the key of features cached from it."""
        if tuple(self.sample_shape) != tuple(input_shape):
            raise ShardError(f"{self.path}: samples of shape {list(self.sample_shape)}, the model takes "
                             f"{list(input_shape)}")
        lo, hi = int(self.y.min()), int(self.y.max())
        if lo < 0 or hi >= num_classes:
            raise ShardError(f"{self.path}: labels must be in 0..{num_classes - 1}, found {lo}..{hi}")
        h = hashlib.sha256(f"{list(self.sample_shape)}:{len(self)}".encode())
        h.update(np.ascontiguousarray(self.y).tobytes())
        for start, rows in self.x.chunks(max(1, _CHUNK_BYTES // self.x.row_bytes)):
            if not np.isfinite(rows).all():
                bad = start + int(np.flatnonzero(~np.isfinite(rows).reshape(len(rows), -1).all(1))[0])
                raise ShardError(f"{self.path}: sample {bad} has NaN or Inf values")
            h.update(rows.tobytes())
        self.digest = h.hexdigest()
        return self.digest

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Samples `idx` (in the reader's reused buffer: copy to keep them past the next read)."""
        return self.x.read(idx)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> Shard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz (weights, a whole data set), with one clear error for an unreadable file."""
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


def read_labels(path: str | Path) -> np.ndarray:
    """A shard's labels alone (what a device reports of its data), without reading or inflating x."""
    p = Path(path)
    if not p.is_file():
        raise ShardError(f"{p}: file not found")
    try:
        with zipfile.ZipFile(p) as zf:
            return _labels(zf, p)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ShardError(f"{p}: not an .npz archive ({e})") from None


def _labels(zf: zipfile.ZipFile, path: Path) -> np.ndarray:
    """y of an open shard archive: non-empty, integer, 1-D; as int64."""
    try:
        with zf.open("y.npy") as f:
            y = np.lib.format.read_array(f, allow_pickle=False)
    except KeyError:
        raise ShardError(f"{path}: missing array y") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ShardError(f"{path}: unreadable y ({e})") from None
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise ShardError(f"{path}: y must be integer 1-D, got {y.dtype} {y.ndim}-D")
    if len(y) == 0:
        raise ShardError(f"{path}: empty data shard")
    return y.astype(np.int64, copy=False)


def read_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A whole shard in memory -> (x float32 N,C,H,W; y int64 N), validated as `Shard` does."""
    with Shard(path) as s:
        return s.x.read(np.arange(len(s))).copy(), s.y.copy()
