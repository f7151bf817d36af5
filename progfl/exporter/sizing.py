"""Peak memory per stage, backend and micro-batch (measured in a fresh process that runs only that backend, and
estimated), and what each device class can run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ..device_runtime.buffer_sgd import BufferSGD
from ..device_runtime.trainer import FROZEN_CHUNK
from ..manifest import BACKENDS, DeviceClass, Manifest, MemoryPoint, Stage, size_stage

# The process after import, x86_64: python + numpy + progfl + onnxruntime with a shard open, 55 MB (measured by the
# probe's first phases, `progfl export --breakdown`); python + numpy + torch (218-223 MB measured, toolchain notes),
# which ExecuTorch's bindings import too.
RUNTIME_BASELINE_MB = {"ort": 55.0, "torch": 220.0, "executorch": 220.0}
# ORT's checkpoint state and training session beyond the weights and gradient buffers they hold: measured 11.0-13.5 MB
# on every grow stage and full of ResNet-18 width 64 (breakdown: "checkpoint loaded" + "training session created"
# minus weights and gradients).
ORT_SESSIONS_MB = 12.0
_MB = 4 / 2**20  # float32 elements -> MB


def _moments(stage: Stage, backend: str) -> int:
    """Weight-sized optimizer buffers: AdamW keeps two; SGD's momentum lives in ORT's gradient buffers
    (device_runtime/buffer_sgd.py) and in one buffer per tensor on torch and ExecuTorch."""
    if stage.optimizer["name"] == "sgd":
        return 0 if backend == "ort" or not stage.optimizer["momentum"] else 1
    return 2


def _tabled(table: dict[str, float], batch: int) -> float:
    """A peak tabled by batch (JSON keys): linear between the neighbouring batches, the last slope beyond."""
    b = sorted(int(k) for k in table)
    v = [table[str(k)] for k in b]
    if batch > b[-1] and len(b) > 1:
        return v[-1] + (v[-1] - v[-2]) * (batch - b[-1]) / (b[-1] - b[-2])
    return float(np.interp(batch, b, v))


def estimate(stage: Stage, batch: int, backend: str = "ort") -> MemoryPoint:
    """The stage's peak at a micro-batch, from what the device process holds, phase by phase.

    ORT: what stays for the whole round (runtime, the training graph's weights, gradient buffers, optimizer moments,
    the sessions' own memory) plus the largest of three phases that follow one another: the round's weights received;
    the frozen prefix's and teacher's weights and their sessions' intermediates at the trainer's chunk (their memory
    goes back before training: OrtStage.release_frozen); training: its intermediate tensors (liveness.py, ORT's own
    execution order), the micro-batch's rows, and at the end the update read out.
    torch and ExecuTorch: weights, gradients, moments, stored activations (forward outputs and their gradients), the
    prefix's largest activation pair and the input batch: a coarser model that the torch rows of a profile replace."""
    f = stage.footprint
    if backend != "ort":
        parts = {
            "runtime": RUNTIME_BASELINE_MB[backend],
            "weights": (f["params"] + f["frozen_session_params"]) * _MB,
            "gradients": f["trainable"] * _MB,
            "optimizer": _moments(stage, backend) * f["trainable"] * _MB,
            "activations": 2 * f["activations_per_sample"] * batch * _MB,
            "prefix": 2 * f["prefix_peak_activation_per_sample"] * batch * _MB,
            "inputs": f["input_per_sample"] * batch * _MB,
        }
    else:
        parts = {"runtime": RUNTIME_BASELINE_MB["ort"], "weights": f["params"] * _MB, "gradients": f["trainable"] * _MB,
                 "optimizer": (_moments(stage, backend) * f["trainable"]
                               + (BufferSGD.CHUNK if stage.optimizer["name"] == "sgd" else 0)) * _MB,
                 "sessions": ORT_SESSIONS_MB}
        rows = (math.prod(stage.feature.shape[1:]) + f["input_per_sample"]) * batch * _MB
        phases = {
            "received weights": {"received weights": (f["params"] + f["frozen_session_params"]) * _MB},
            "frozen outputs": {"frozen weights": f["frozen_session_params"] * _MB,
                               "frozen intermediates": _tabled(f["frozen_intermediates_mb"], min(batch, FROZEN_CHUNK))},
            "training": {"intermediates": _tabled(f["train_intermediates_mb"], batch), "rows": rows,
                         "update": f["updated"] * _MB},
        }
        parts |= max(phases.values(), key=lambda p: sum(p.values()))
    return MemoryPoint(batch=batch, measured_mb=None, estimate_mb=round(sum(parts.values()), 1),
                       breakdown={k: round(v, 2) for k, v in parts.items()}, backend=backend)


def floor_mb(stage: Stage, batch: int, backend: str = "ort") -> dict[str, float]:
    """The analytic floor of a stage (issue 11's yardstick): the runtime, the weights it trains through, their
    gradients, ONE momentum buffer per trainable weight, the frozen prefix's weights, and the training graph's
    intermediate tensors. Below it only by not keeping a momentum buffer at all, as the ORT backend does."""
    f = stage.footprint
    acts = (_tabled(f["train_intermediates_mb"], batch) if backend == "ort"
            else 2 * f["activations_per_sample"] * batch * _MB)
    return {"runtime": RUNTIME_BASELINE_MB[backend], "weights": f["params"] * _MB, "gradients": f["trainable"] * _MB,
            "momentum": f["trainable"] * _MB, "frozen prefix": f["frozen_session_params"] * _MB,
            "intermediates": acts}


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
                    probe = run_probe(folder, s.name, b, backend=backend)
                    point.measured_mb, point.phases = probe["peak_mb"], probe["phases"]
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
