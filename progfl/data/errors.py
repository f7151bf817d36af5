"""The one error type of progfl.data.

Every loader, partitioner and shard reader reports bad input as ``DataError``
with a one-line message naming the file (or argument) and what is wrong, so a
CLI can print it as-is instead of a KeyError traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad or missing data: a one-line, user-facing message."""
