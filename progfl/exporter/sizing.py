"""Peak memory per stage, backend and micro-batch (measured in a fresh process that runs only that backend, and
estimated), and what each device class can run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..manifest import BACKENDS, DeviceClass, Manifest, MemoryPoint, Stage, size_stage

# The process after import, x86_64: python + numpy + onnxruntime (~52 MB) + sessions (~8 MB); python + numpy + torch
# (218-223 MB measured, toolchain notes), which ExecuTorch's bindings import too.
RUNTIME_BASELINE_MB = {"ort": 60.0, "torch": 220.0, "executorch": 220.0}
_MB = 4 / 2**20  # float32 elements -> MB


def _moments(stage: Stage, backend: str) -> int:
    """Weight-sized optimizer buffers: ORT's AdamW kernel keeps two, also for SGD; torch's and ExecuTorch's SGD one
    momentum buffer."""
    if backend != "ort" and stage.optimizer["name"] == "sgd":
        return 1 if stage.optimizer["momentum"] else 0
    return 2


def estimate(stage: Stage, batch: int, backend: str = "ort") -> MemoryPoint:
    """Weights (trainable part + frozen sessions), gradients, optimizer moments, stored activations (forward outputs
    + their gradients), the prefix's largest activation pair, the input batch, and the runtime itself."""
    f = stage.footprint
    parts = {
        "runtime": RUNTIME_BASELINE_MB[backend],
        "weights": (f["params"] + f["frozen_session_params"]) * _MB,
        "gradients": f["trainable"] * _MB,
        "optimizer": _moments(stage, backend) * f["trainable"] * _MB,
        "activations": 2 * f["activations_per_sample"] * batch * _MB,
        "prefix": 2 * f["prefix_peak_activation_per_sample"] * batch * _MB,
        "inputs": f["input_per_sample"] * batch * _MB,
    }
    return MemoryPoint(batch=batch, measured_mb=None, estimate_mb=round(sum(parts.values()), 1),
                       breakdown={k: round(v, 2) for k, v in parts.items()}, backend=backend)


def fill_memory(manifest: Manifest, folder: Path, batches: list[int], measured: bool, progress=None,
                backends: tuple[str, ...] = ("ort",)) -> None:
    """Every stage x backend x micro-batch: estimated, and measured in a fresh process running only that backend (the
    torch backend's peaks are torch's own: a torch-backend device is sized by them)."""
    from ..device_runtime.probe import run_probe  # here, not at the top: EagerStage users get no ORT in their RSS

    for s in manifest.stages:
        s.memory = []
        for backend in (b for b in backends if s.has_backend(b)):  # executorch: the stages it can train
            for b in batches:
                point = estimate(s, b, backend)
                if measured:
                    point.measured_mb = run_probe(folder, s.name, b, backend=backend)["peak_mb"]
                    if progress:
                        progress(f"  {s.name:<12} {backend:<5} batch {b:>3}: {point.measured_mb:7.1f} MB measured, "
                                 f"{point.estimate_mb:7.1f} MB estimated")
                s.memory.append(point)


def fill_sizing(manifest: Manifest) -> None:
    """Each device class sized by its backend's peaks, from its board's profile when one was applied."""
    for s in manifest.stages:
        s.sizing = [size_stage(s, c.memory_mb, manifest.batch_size, manifest.safety_margin, c.name, c.backend,
                               c.profile or "export") for c in manifest.device_classes]


def load_device_classes(path: str | os.PathLike | None) -> list[DeviceClass]:
    """A JSON list of {"name", "memory_mb", optional "backend" (ort | torch)}; without a path, the sample shipped with
    progfl."""
    p = Path(path) if path else Path(__file__).parents[1] / "device_classes.json"
    try:
        raw = json.loads(p.read_text())
        classes = [DeviceClass(str(c["name"]), float(c["memory_mb"]), str(c.get("backend", "ort"))) for c in raw]
    except FileNotFoundError:
        raise ValueError(f"{p}: no such device-class file") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{p}: not a JSON list of {{name, memory_mb, backend}} ({e})") from None
    if not classes or any(c.memory_mb <= 0 or not math.isfinite(c.memory_mb) for c in classes) \
            or len({c.name for c in classes}) != len(classes):
        raise ValueError(f"{p}: device classes need unique names and positive memory_mb")
    bad = [c.name for c in classes if c.backend not in BACKENDS]
    if bad:
        raise ValueError(f"{p}: device class(es) {', '.join(bad)} name an unknown backend: use {', '.join(BACKENDS)}")
    return classes
