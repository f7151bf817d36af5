"""One local round on a device: set the round's weights, run epochs of micro-batched steps, report the update.

Each logical batch of `task.batch_size` samples is cut into micro-batches of `task.micro_batch` (as the
manifest sized them for this device's memory); gradients of the micro-batches are summed by ORT and applied
as one step with the learning rate divided by their count, which equals one full-batch step.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from ..manifest import ManifestError, Stage, TrainTask, TrainUpdate
from .backend import StageBackend
from .cache import FeatureCache
from .memory import PhasePeak


def _chunks(idx: np.ndarray, size: int) -> list[np.ndarray]:
    return [idx[i:i + size] for i in range(0, len(idx), size)]


def frozen_outputs(backend: StageBackend, stage: Stage, x: np.ndarray, chunk: int,
                   cache: FeatureCache | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Prefix features (and teacher logits) for all local data. They do not change while a stage lasts, so a
    cache computes them once per stage and later rounds pay only for the trainable part."""

    def compute(fn, inp: np.ndarray) -> np.ndarray:
        return np.concatenate([fn(inp[c]) for c in _chunks(np.arange(len(inp)), chunk)])

    if cache is None or "prefix" not in stage.files:  # no prefix: the features are the data itself
        feats = compute(backend.features, x)
        return feats, compute(backend.teacher, feats) if "teacher" in stage.files else None
    prefix = backend.session_digest("prefix")
    feats = cache.get_or_compute("prefix", prefix, x, lambda: compute(backend.features, x))
    teacher = None
    if "teacher" in stage.files:  # its input is the prefix's output: both weights are in its key
        teacher = cache.get_or_compute("teacher", prefix + backend.session_digest("teacher"), x,
                                       lambda: compute(backend.teacher, np.asarray(feats)))
    return feats, teacher


def train_round(backend: StageBackend, stage: Stage, task: TrainTask, x: np.ndarray, y: np.ndarray,
                cache: FeatureCache | None = None) -> TrainUpdate:
    if len(x) == 0:
        raise ManifestError("empty data shard: nothing to train on")
    if task.micro_batch < 1 or task.accum_steps < 1 or task.epochs < 1 or not np.isfinite(task.lr):
        raise ManifestError(f"bad task: micro_batch={task.micro_batch} accum_steps={task.accum_steps} "
                            f"epochs={task.epochs} lr={task.lr}")
    t0 = time.perf_counter()
    with PhasePeak() as peak:
        backend.set_weights(task.weights)
        feats, teacher = frozen_outputs(backend, stage, x, task.micro_batch, cache)
        rng = np.random.default_rng(task.seed)
        losses, steps = [], 0
        batch = task.micro_batch * task.accum_steps
        for _ in range(task.epochs):
            for idx in _chunks(rng.permutation(len(x)), batch):
                micro = _chunks(idx, task.micro_batch)
                for m in micro:
                    inputs = {"features": np.ascontiguousarray(feats[m]), "inputs": x[m], "labels": y[m]}
                    if teacher is not None:
                        inputs["teacher"] = np.ascontiguousarray(teacher[m])
                    losses.append(backend.accumulate(inputs) * len(m))
                backend.step(task.lr, len(micro))
                steps += 1
        weights = backend.get_weights()
    seconds = time.perf_counter() - t0
    samples = len(x) * task.epochs
    metrics = {"loss": float(np.sum(losses) / samples), "seconds": seconds, "steps": float(steps),
               "samples_per_s": samples / seconds, "peak_mb": round(peak.peak_mb, 1),
               "peak_resettable": float(peak.resettable), "torch_imported": float("torch" in sys.modules)}
    if task.budget_mb is not None:
        metrics["budget_mb"] = float(task.budget_mb)
        metrics["over_budget"] = float(peak.peak_mb > task.budget_mb)
    return TrainUpdate(round=task.round, stage=stage.name, weights=weights, num_samples=len(x), metrics=metrics)
