"""Server-side accuracy of the global model as a stage sees it, on a held-out test set (ONNX Runtime, no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..device_runtime.backend import RuntimeOptions
from ..device_runtime.ort_backend import InferenceFile, session_options
from ..device_runtime.trainer import score
from ..manifest import Manifest


class Evaluator:
    def __init__(self, folder: str | Path, manifest: Manifest, x: np.ndarray, y: np.ndarray, batch: int = 256,
                 options: RuntimeOptions | None = None):
        self.folder, self.manifest = Path(folder), manifest
        self.x, self.y, self.batch = x, y, batch
        self._so = session_options(options or RuntimeOptions())
        self._files: dict[str, InferenceFile] = {}

    def evaluate(self, stage: str, arrays: dict[str, np.ndarray]) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of stage's inference model with these global arrays (cut to the stage's
        sub-model for a width stage: its first channels)."""
        s = self.manifest.stage(stage)
        if s.name not in self._files:
            self._files = {s.name: InferenceFile(self.folder / s.files["inference"].path,
                                                 s.session_params["inference"], self._so)}  # one resident
        f = self._files[s.name]
        f.bind(s.take(arrays, self.manifest))
        correct, loss = 0, 0.0
        for i in range(0, len(self.x), self.batch):
            c, l_ = score(f.run({"inputs": self.x[i:i + self.batch]}), self.y[i:i + self.batch])
            correct, loss = correct + c, loss + l_
        return correct / len(self.y), loss / len(self.y)
