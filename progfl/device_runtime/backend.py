"""What a device needs from a training engine, and which engine a device uses.

Three backends implement StageBackend: ONNX Runtime training (ort_backend.py: torch-free, the default wherever
onnxruntime-training installs) and, in progfl/device_torch (they need torch, which this folder never imports),
PyTorch (for ARM boards, where no ORT training build exists) and, experimental, ExecuTorch (only when asked for, for
the stages it trains correctly).
Each is imported only when chosen, so a device never loads the engine it does not use.
"""

from __future__ import annotations

import hashlib
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..manifest import BACKENDS, EXECUTORCH_PIN, Manifest, ManifestError
from .memory import mark

BACKEND_CHOICES = ("auto", *BACKENDS)
AUTO = ("ort", "torch")  # what `auto` may pick, in order; executorch is experimental: only when asked for
INSTALL = {"ort": "pip install onnxruntime-training-cpu==1.19.2 (x86_64, macOS, Windows; no Linux aarch64 build)",
           "torch": "pip install torch (a Raspberry Pi 4 needs torch==2.9.1: see the README's ARM section)",
           "executorch": f"pip install executorch=={EXECUTORCH_PIN} (experimental)"}


@dataclass
class RuntimeOptions:
    """Session settings. low_memory: one shared CPU arena that grows by exactly what is asked
    (kSameAsRequested), measured to keep ORT's peak low without the slowdown of disabling the arena."""

    threads: int = 0  # 0: ONNX Runtime's default (one per core)
    spin: bool = False  # busy-wait between ops: measured neutral when idle, 2x slower under background load
    low_memory: bool = True
    graph_optimization: str = "all"  # all | extended | basic | disabled


class StageBackend(ABC):
    """One stage loaded for training: weights in, steps, weights out."""

    @abstractmethod
    def set_weights(self, arrays: dict[str, np.ndarray]) -> None: ...

    @abstractmethod
    def features(self, x: np.ndarray) -> np.ndarray:
        """The frozen prefix's output for a batch (the input itself for the first block)."""

    @abstractmethod
    def session_digest(self, kind: str) -> str:
        """Identity of a frozen computation (file + its weights): the feature cache's key."""

    @abstractmethod
    def teacher(self, features: np.ndarray) -> np.ndarray | None:
        """Distillation target logits for a batch of features (None unless the stage distils)."""

    @abstractmethod
    def accumulate(self, inputs: dict[str, np.ndarray]) -> float:
        """Forward + backward on one micro-batch, gradients summed; returns the data loss. inputs["loss_scale"] is the
        micro-batch's share of its logical batch (see with_loss_scale)."""

    @abstractmethod
    def step(self, lr: float) -> None:
        """Apply the summed (share-weighted) gradients of a logical batch as one update at learning rate lr."""

    @abstractmethod
    def get_weights(self) -> dict[str, np.ndarray]:
        """The arrays this stage updates (trained parameters and BatchNorm statistics)."""

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits of the model as this stage sees it (eval mode), for local evaluation."""

    def release_frozen(self) -> None:
        """Free what only features() and teacher() need (their sessions and weights): the trainer calls it once the
        round's frozen outputs are cached, so they do not sit beside the training state. Until the next set_weights,
        features() and teacher() are then unavailable. Backends without such memory to free keep the default."""


def with_loss_scale(inputs: dict[str, np.ndarray], share: float) -> dict[str, np.ndarray]:
    """The inputs plus loss_scale = this micro-batch's share of its logical batch."""
    return {**inputs, "loss_scale": np.asarray(share, np.float32)}


def ordered_inputs(names: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The training graph's inputs in its order; without loss_scale the micro-batch is the whole batch (share 1)."""
    return [inputs[n] if n != "loss_scale" or n in inputs else np.asarray(1.0, np.float32) for n in names]


def weights_digest(arrays: dict[str, np.ndarray], names: list[str]) -> str:
    """Identity of the weights a frozen computation reads (part of the feature cache's key)."""
    h = hashlib.sha256()
    for n in names:
        h.update(np.ascontiguousarray(arrays[n]).tobytes())
    return h.hexdigest()


def installed(backend: str) -> bool:
    """Whether a backend's engine is installed (found, not imported). ORT counts only with its training API: plain
    onnxruntime has the same top-level package and no training."""
    name = "onnxruntime" if backend == "ort" else backend
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:  # an import hook that forbids it
        return False
    if spec is None or backend != "ort":
        return spec is not None
    return any((Path(p) / "training" / "api").is_dir() for p in spec.submodule_search_locations or [])


def first_installed(candidates: tuple[str, ...] | list[str] = AUTO) -> str | None:
    """The first of `candidates` whose engine is installed: what `auto` means."""
    return next((b for b in candidates if installed(b)), None)


def resolve_backend(name: str, manifest: Manifest) -> str:
    """auto: ORT where its training API is installed, else torch; an explicit backend must be installed and exported.
    Errors name what to install or how to export."""
    if name not in BACKEND_CHOICES:
        raise ManifestError(f"unknown backend {name!r}: use {', '.join(BACKEND_CHOICES)}")
    exported = [b for b in AUTO if b in manifest.backends]
    if name == "auto":
        found = first_installed(exported)  # ort first
        if found:
            return found
        raise ManifestError("no training backend installed that these artifacts were exported for: "
                            + "; or ".join(INSTALL[b] for b in exported))
    if not installed(name):
        raise ManifestError(f"backend {name} is not installed on this device: {INSTALL[name]}")
    if name not in manifest.backends:
        with_torch = "ort,torch,executorch" if name == "executorch" else f"ort,{name}"
        raise ManifestError(f"these artifacts have no {name} files: export them with --backends {with_torch}")
    return name


def open_stage(backend: str, folder: str | Path, manifest: Manifest, stage: str | int,
               options: RuntimeOptions | None = None, verify: bool = True) -> StageBackend:
    """One stage loaded for training by a resolved backend (see resolve_backend)."""
    if backend == "torch":
        from ..device_torch.torch_backend import TorchStage as Engine
    elif backend == "executorch":
        from ..device_torch.executorch_backend import ExecuTorchStage as Engine
    else:
        from .ort_backend import OrtStage as Engine
    mark(f"{backend} imported")
    return Engine(folder, manifest, stage, options, verify)
