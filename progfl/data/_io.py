"""Small file-reading helpers shared by the loaders.

Pickles from users (CIFAR) and from packages (Animal-MNIST) are read with an
allow-list unpickler: they only ever hold dicts, lists, bytes and numpy arrays,
so nothing else may be constructed (unpickling arbitrary globals runs code).
"""

from __future__ import annotations

import gzip
import importlib
import pickle
from pathlib import Path
from typing import Any

from .errors import DataError

_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol <= 2
    }
)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core."):
            # numpy 2 renamed numpy.core -> numpy._core; avoid its deprecation shim.
            try:
                return getattr(importlib.import_module("numpy._core" + module[10:]), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def load_pickle(path: Path, gz: bool = False) -> Any:
    """Read one (optionally gzipped) pickle; any failure becomes a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        opener = gzip.open if gz else open
        with opener(path, "rb") as f:
            return _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError,
            AttributeError, ImportError, IndexError, KeyError, MemoryError) as e:
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
