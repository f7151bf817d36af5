"""A device: its artifacts, its local data, its memory budget; trains whatever stage a task names.

The same object serves `progfl device train` and the Flower node's job processes (job.py), one round each;
a caller that keeps it keeps the current stage loaded between rounds (sessions are costly to build), and it drops
the stage when another is asked for, so at most one stage's sessions are resident. The shard stays on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..manifest import MANIFEST_NAME, Manifest, ManifestError, TrainTask, TrainUpdate, sha256_file, size_stage
from .backend import RuntimeOptions, StageBackend, open_stage, resolve_backend
from .cache import FeatureCache
from .shard import Shard
from .trainer import train_round


class Device:
    def __init__(self, artifacts: str | os.PathLike, shard: Shard, budget_mb: float | None = None,
                 options: RuntimeOptions | None = None, cache_dir: str | os.PathLike | None = None,
                 backend: str = "auto"):
        """`shard` is validated here against the model (shape, labels, finite values); `cache_dir` keeps the
        frozen prefix's features between rounds (without it they live in a scratch folder for one round);
        `backend`: ort, torch, executorch (experimental), or auto (ORT where its training API is installed, else
        torch)."""
        self.folder = Path(artifacts)
        self.manifest = Manifest.load(self.folder)
        self.backend_name = resolve_backend(backend, self.manifest)
        self.manifest_sha256 = sha256_file(self.folder / MANIFEST_NAME)  # tasks name the artifacts they were made for
        shard.validate(self.manifest.input_shape, self.manifest.num_classes)
        self.shard = shard
        self.budget_mb, self.options = budget_mb, options or RuntimeOptions()
        self.cache = FeatureCache(cache_dir) if cache_dir else None
        self._backend: StageBackend | None = None
        self._backend_stage = ""

    def plan(self, stage: str | int) -> tuple[int, int]:
        """(micro_batch, accum_steps) for this device's budget, or an error if the stage does not fit."""
        s = self.manifest.stage(stage)
        if self.budget_mb is None:
            return self.manifest.batch_size, 1
        z = size_stage(s, self.budget_mb, self.manifest.batch_size, self.manifest.safety_margin,
                       backend=self.backend_name)
        if not z.fits:
            raise ManifestError(f"stage {s.name} needs {z.peak_mb:g} MB at micro-batch 1 (+{self.manifest.safety_margin:.0%}"
                                f" margin); this device's budget is {self.budget_mb:g} MB: it cannot take part")
        return z.micro_batch, z.accum_steps

    def backend(self, stage: str) -> StageBackend:
        if self._backend is None or self._backend_stage != stage:
            self._backend = None  # free the old stage's sessions before building the new ones
            self._backend = open_stage(self.backend_name, self.folder, self.manifest, stage, self.options)
            self._backend_stage = stage
        return self._backend

    def train(self, task: TrainTask) -> TrainUpdate:
        if task.manifest_sha256 and task.manifest_sha256 != self.manifest_sha256:
            raise ManifestError("task was made for other artifacts (manifest sha256 differs): fetch them first")
        stage = self.manifest.stage(task.stage)
        return train_round(self.backend(stage.name), stage, task, self.shard, self.cache)
