"""Peak memory per stage and micro-batch (measured in a torch-free subprocess, and estimated), and what each
device class can run."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..manifest import DeviceClass, Manifest, MemoryPoint, Stage, size_stage

RUNTIME_BASELINE_MB = 60.0  # python + numpy + onnxruntime after import (~52 MB) + sessions (~8 MB), x86_64
_MB = 4 / 2**20  # float32 elements -> MB


def estimate(stage: Stage, batch: int) -> MemoryPoint:
    """Weights (trainable part + frozen sessions), gradients, two optimizer moments (ORT's AdamW kernel keeps both,
    also for SGD), stored activations (forward outputs + their gradients), the prefix's largest activation pair,
    the input batch, and the runtime itself."""
    f = stage.footprint
    parts = {
        "runtime": RUNTIME_BASELINE_MB,
        "weights": (f["params"] + f["frozen_session_params"]) * _MB,
        "gradients": f["trainable"] * _MB,
        "optimizer": 2 * f["trainable"] * _MB,
        "activations": 2 * f["activations_per_sample"] * batch * _MB,
        "prefix": 2 * f["prefix_peak_activation_per_sample"] * batch * _MB,
        "inputs": f["input_per_sample"] * batch * _MB,
    }
    return MemoryPoint(batch=batch, measured_mb=None, estimate_mb=round(sum(parts.values()), 1),
                       breakdown={k: round(v, 2) for k, v in parts.items()})


def fill_memory(manifest: Manifest, folder: Path, batches: list[int], measured: bool, progress=None) -> None:
    from ..device_runtime.probe import run_probe  # here, not at the top: EagerStage users get no ORT in their RSS

    for s in manifest.stages:
        s.memory = []
        for b in batches:
            point = estimate(s, b)
            if measured:
                point.measured_mb = run_probe(folder, s.name, b)["peak_mb"]
                if progress:
                    progress(f"  {s.name:<12} batch {b:>3}: {point.measured_mb:7.1f} MB measured, {point.estimate_mb:7.1f} MB estimated")
            s.memory.append(point)


def fill_sizing(manifest: Manifest) -> None:
    for s in manifest.stages:
        s.sizing = [size_stage(s, c.memory_mb, manifest.batch_size, manifest.safety_margin, c.name)
                    for c in manifest.device_classes]


def load_device_classes(path: str | os.PathLike | None) -> list[DeviceClass]:
    """A JSON list of {"name", "memory_mb"}; without a path, the sample shipped with progfl."""
    p = Path(path) if path else Path(__file__).parents[1] / "device_classes.json"
    try:
        raw = json.loads(p.read_text())
        classes = [DeviceClass(str(c["name"]), float(c["memory_mb"])) for c in raw]
    except FileNotFoundError:
        raise ValueError(f"{p}: no such device-class file") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{p}: not a JSON list of {{name, memory_mb}} ({e})") from None
    if not classes or any(c.memory_mb <= 0 for c in classes) or len({c.name for c in classes}) != len(classes):
        raise ValueError(f"{p}: device classes need unique names and positive memory_mb")
    return classes
