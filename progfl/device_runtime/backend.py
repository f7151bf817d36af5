"""What a device needs from a training engine; the ONNX Runtime backend is the complete one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


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
        """Forward + backward on one micro-batch, gradients summed; returns the data loss."""

    @abstractmethod
    def step(self, lr: float, accum_steps: int) -> None:
        """Apply the summed gradients of `accum_steps` micro-batches as one update at learning rate lr."""

    @abstractmethod
    def get_weights(self) -> dict[str, np.ndarray]:
        """The arrays this stage updates (trained parameters and BatchNorm statistics)."""

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits of the model as this stage sees it (eval mode), for local evaluation."""
