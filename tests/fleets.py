"""Test fleets derived from an export's measured peaks, never copied from one measurement: a budget keeps its place
among the stages' needs when the runtime's baseline moves."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from progfl.manifest import Manifest
from progfl.server.fleet import required_mb


def budgets_above(artifacts: str | Path, above: Iterable[float], need: Callable[..., float] = min,
                  kinds: tuple[str, ...] | None = ("grow",)) -> list[float]:
    """MB budgets `above` the need of the export's stages of `kinds` (all: None) taken by `need` (min: the cheapest,
    max: the dearest, which every stage then fits)."""
    m = Manifest.load(artifacts)
    base = need(required_mb(m, s.name) for s in m.stages if kinds is None or s.kind in kinds)
    return [round(base + d, 1) for d in above]
