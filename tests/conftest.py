"""Fixtures several test modules share."""

from __future__ import annotations

import numpy as np
import pytest

from progfl.device_runtime.shard import Shard


@pytest.fixture
def shard_1x12x12(tmp_path):
    """48 random 1x12x12 samples of 10 classes, open and validated as a device opens its shard."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "shard.npz", x=rng.standard_normal((48, 1, 12, 12)).astype(np.float32),
             y=rng.integers(0, 10, 48).astype(np.int64))
    with Shard(tmp_path / "shard.npz") as s:
        s.validate([1, 12, 12], 10)
        yield s
