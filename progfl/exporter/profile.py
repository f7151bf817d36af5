"""A board's measured peaks into the manifest: `progfl device profile` runs on the board, `progfl apply-profile`
on the server makes a device class use those peaks instead of the exporter machine's.

Why: the exporter measures on x86; a board's runtime, allocator and libraries differ (an aarch64 torch wheel is not the
x86 one), so a class sized from the x86 table can be refused work it could do or handed work it cannot.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..device_runtime.probe import PROFILE_VERSION
from ..manifest import BACKENDS, DeviceClass, Manifest, ManifestError, MemoryPoint, read_json
from .explain import explain
from .sizing import estimate, fill_sizing


def read_profile(path: str | os.PathLike) -> dict[str, Any]:
    """A profile file, checked field by field (it crosses from a device)."""
    p = Path(path)
    d = read_json(p, "no such profile")
    if not isinstance(d, dict) or d.get("progfl_profile") != PROFILE_VERSION:
        raise ValueError(f"{p}: not a progfl profile (version {PROFILE_VERSION}): "
                         "write it with `progfl device profile --out`")
    if d.get("backend") not in BACKENDS or not isinstance(d.get("files_digest"), str):
        raise ValueError(f"{p}: profile names no known backend or no files digest")
    rows = d.get("results")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{p}: profile has no results")
    for r in rows:
        ok = (isinstance(r, dict) and isinstance(r.get("stage"), str) and isinstance(r.get("batch"), int)
              and r["batch"] >= 1 and isinstance(r.get("peak_mb"), (int, float)) and math.isfinite(r["peak_mb"])
              and r["peak_mb"] > 0)
        if not ok:
            raise ValueError(f"{p}: bad result row {r!r}: needs stage, batch >= 1, finite peak_mb > 0")
    return d


def apply_profile(manifest: Manifest, profile: dict[str, Any], class_name: str, memory_mb: float | None = None) -> None:
    """Size device class `class_name` (created when memory_mb is given and it does not exist) by the profile's peaks:
    its points join every stage's memory table under source=class_name (replacing that class's earlier ones), the class
    takes the profile's backend, and every class's sizing is recomputed."""
    backend = profile["backend"]
    if backend not in manifest.backends:
        raise ManifestError(f"the profile measured the {backend} backend, which these artifacts were not exported for")
    if profile["files_digest"] != manifest.files_digest(backend):
        raise ManifestError("the profile was measured on other artifacts (files digest differs): profile these ones")
    rows = {(r["stage"], r["batch"]): float(r["peak_mb"]) for r in profile["results"]}
    names = {s.name for s in manifest.stages if s.has_backend(backend)}
    unknown = sorted({st for st, _ in rows} - names)
    if unknown:
        raise ManifestError(f"the profile names stages these artifacts do not have: {', '.join(unknown)}")
    few = sorted(n for n in names if sum(st == n for st, _ in rows) < 2)
    if few:
        raise ManifestError(f"the profile has fewer than two micro-batch sizes for {', '.join(few)}: profile every "
                            "stage at two or more (peak is a line in the micro-batch)")
    if memory_mb is not None and not (memory_mb > 0 and math.isfinite(memory_mb)):
        raise ValueError(f"memory must be a positive number of MB, got {memory_mb}")
    try:
        cls = manifest.device_class(class_name)
    except ManifestError:
        if memory_mb is None:
            raise ManifestError(f"no device class {class_name!r}: give --memory-mb to add it") from None
        cls = DeviceClass(class_name, memory_mb)
        manifest.device_classes.append(cls)
    if memory_mb is not None:
        cls.memory_mb = memory_mb
    cls.backend, cls.profile = backend, class_name
    for s in manifest.stages:
        s.memory = [m for m in s.memory if m.source != class_name]
        for (stage, batch), peak in sorted(rows.items()):
            if stage == s.name:
                point = estimate(s, batch, backend)
                s.memory.append(MemoryPoint(batch, peak, point.estimate_mb, point.breakdown, backend, class_name))
    fill_sizing(manifest)


def apply_profile_file(artifacts: str | os.PathLike, profile_path: str | os.PathLike, class_name: str,
                       memory_mb: float | None = None) -> str:
    """apply_profile on an export folder: manifest.json rewritten atomically; returns the new sizing table."""
    manifest = Manifest.load(artifacts)
    apply_profile(manifest, read_profile(profile_path), class_name, memory_mb)
    manifest.validate()
    manifest.save(artifacts)
    return explain(manifest)
