"""One local round on a device: set the round's weights, run epochs of micro-batched steps, report the update.

Memory does not grow with the shard: samples are read from the shard file a micro-batch at a time, the frozen
prefix runs once over the shard in order with its features (and a distillation stage's teacher logits) written
to disk, and every step reads its rows back into reused buffers (see rows.py and cache.py).

Each logical batch of `task.batch_size` samples is cut into micro-batches of `task.micro_batch` (as the
manifest sized them for this device's memory); each micro-batch's loss is weighted by its share of the batch
(the graph's loss_scale input), the backend sums the gradients and applies them as one step at the task's learning
rate: the logical batch's mean gradient, whatever the split (BatchNorm still normalises each micro-batch by its own
statistics).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np

from ..manifest import ManifestError, Stage, TrainTask, TrainUpdate
from .backend import StageBackend, with_loss_scale
from .cache import FeatureCache
from .memory import PhasePeak, mark
from .rows import RowReader
from .shard import Shard


FROZEN_CHUNK = 8  # most samples the frozen prefix and teacher run on at once (see LocalData)


class LocalData:
    """What the training graph is fed, a micro-batch at a time: features, raw inputs, labels, teacher logits.

    The frozen outputs are computed once per round, in chunks of at most FROZEN_CHUNK samples whatever the training
    micro-batch: their inference session's memory grows with the chunk and, at chunks of 32, set a stage's peak
    (ResNet-18 width 64 grow-2: 168 MB against 140 MB for training; measured with `progfl export --breakdown`).

    Frozen outputs come from `cache` (persistent across rounds, for a validated shard) or else from a scratch
    folder that lives for the round. `scratch` is where that folder goes (default: the system's temporary
    folder; on a board whose /tmp is in RAM, give a folder on disk)."""

    def __init__(self, backend: StageBackend, stage: Stage, shard: Shard, chunk: int,
                 cache: FeatureCache | None = None, scratch: str | None = None):
        self.shard = shard
        persistent = cache is not None and shard.digest is not None  # an unvalidated shard has no key
        self._tmp = None if persistent else tempfile.TemporaryDirectory(prefix="progfl-features-", dir=scratch)
        cache = cache if persistent else FeatureCache(self._tmp.name)
        data = shard.digest or "this round"

        def digest(kind: str) -> str:  # a persistent entry is keyed by the frozen weights; a scratch one needs none
            return backend.session_digest(kind) if persistent and kind in stage.files else ""

        self.features: RowReader | None = None
        self.teacher: RowReader | None = None
        try:
            if "prefix" in stage.files:  # the frozen blocks in front: run once over the shard, in order
                self.features = cache.get_or_compute(
                    "prefix", digest("prefix"), data, len(shard),
                    lambda: (backend.features(x) for _, x in shard.x.chunks(chunk)))
            if "teacher" in stage.files:  # its input is the features: both sessions' weights are in its key
                source = self.features or shard.x
                self.teacher = cache.get_or_compute(
                    "teacher", digest("prefix") + digest("teacher"), data, len(shard),
                    lambda: (backend.teacher(f) for _, f in source.chunks(chunk)))
        except BaseException:
            self.close()
            raise
        self.raw_inputs = any(t.name == "inputs" for t in stage.inputs)  # NeuLite's input term needs x too

    def inputs(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's inputs for samples idx (views of reused buffers, valid until the next call)."""
        out: dict[str, np.ndarray] = {"labels": self.shard.y[idx]}
        if self.features is None or self.raw_inputs:
            out["inputs"] = self.shard.read(idx)
        out["features"] = self.features.read(idx) if self.features is not None else out["inputs"]
        if self.teacher is not None:
            out["teacher"] = self.teacher.read(idx)
        return out

    def close(self) -> None:
        for rows in (self.features, self.teacher):
            if rows is not None:
                rows.close()
        if self._tmp is not None:
            self._tmp.cleanup()


def _batches(rng: np.random.Generator, n: int, batch: int, micro: int) -> Iterator[list[np.ndarray]]:
    """One epoch: a shuffled order cut into logical batches, each cut into micro-batches."""
    order = rng.permutation(n)
    for i in range(0, n, batch):
        idx = order[i:i + batch]
        yield [idx[j:j + micro] for j in range(0, len(idx), micro)]


class TrainingError(ManifestError):
    """A round that produced no update to send: training diverged (non-finite loss or weights)."""


def check_finite(weights: dict[str, np.ndarray], loss: float) -> None:
    """Refuse to report a diverged round: a NaN or Inf update would only be dropped by the server (or, unchecked,
    poison the global model), and the device is the first to know."""
    bad = {n: int(a.size - np.count_nonzero(np.isfinite(a))) for n, a in weights.items()}
    bad = {n: k for n, k in bad.items() if k}
    if bad or not np.isfinite(loss):
        where = (f"{sum(bad.values())} non-finite values in {len(bad)} arrays (first: {next(iter(bad))})" if bad
                 else "finite weights")
        raise TrainingError(f"training diverged: loss {loss:g}, {where}; no update is sent (lower the learning "
                            f"rate or the local epochs)")


def check_task(task: TrainTask) -> None:
    if not 1 <= task.micro_batch <= task.batch_size or task.accum_steps < 1 or task.epochs < 1 \
            or not np.isfinite(task.lr):
        raise ManifestError(f"bad task: batch_size={task.batch_size} micro_batch={task.micro_batch} "
                            f"accum_steps={task.accum_steps} epochs={task.epochs} lr={task.lr}")


def train_round(backend: StageBackend, stage: Stage, task: TrainTask, shard: Shard,
                cache: FeatureCache | None = None, scratch: str | None = None) -> TrainUpdate:
    """One local round. It consumes task.weights: the dict is emptied once the engine holds them."""
    check_task(task)
    t0 = time.perf_counter()
    with PhasePeak() as peak:
        backend.set_weights(task.weights)
        task.weights.clear()  # the engine holds them now: no second copy of the model while training
        mark("weights set")
        data = LocalData(backend, stage, shard, min(task.micro_batch, FROZEN_CHUNK), cache, scratch)
        mark("frozen outputs cached")
        backend.release_frozen()
        mark("frozen sessions released")
        try:
            rng = np.random.default_rng(task.seed)
            losses, step_s = [], []
            for _ in range(task.epochs):
                for micro in _batches(rng, len(shard), task.batch_size, task.micro_batch):
                    s0 = time.perf_counter()
                    n = sum(len(m) for m in micro)
                    for m in micro:
                        losses.append(backend.accumulate(with_loss_scale(data.inputs(m), len(m) / n)) * len(m))
                        if len(losses) == 1:
                            mark("first forward+backward")
                    backend.step(task.lr)
                    if not step_s:
                        mark("first optimizer step")
                    step_s.append(time.perf_counter() - s0)
        finally:
            data.close()
        mark("other steps")
        weights = backend.get_weights()
        mark("update read")
    seconds = time.perf_counter() - t0
    samples = len(shard) * task.epochs
    loss = float(np.sum(losses) / samples)
    check_finite(weights, loss)
    metrics = {"loss": loss, "seconds": seconds, "steps": float(len(step_s)),
               "step_ms": 1000 * float(np.median(step_s[1:] or step_s)),  # the first step warms up
               "samples_per_s": samples / seconds, "peak_mb": round(peak.peak_mb, 1),
               "peak_resettable": float(peak.resettable), "torch_imported": float("torch" in sys.modules)}
    if task.budget_mb is not None:
        metrics["budget_mb"] = float(task.budget_mb)
        metrics["over_budget"] = float(peak.peak_mb > task.budget_mb)
    return TrainUpdate(round=task.round, stage=stage.name, weights=weights, num_samples=len(shard), metrics=metrics)


def evaluate_shard(backend: StageBackend, shard: Shard, weights: dict[str, np.ndarray], chunk: int = 256) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the stage's model with these weights on a (held-out) shard."""
    backend.set_weights(weights)
    correct, loss = 0, 0.0
    for start, x in shard.x.chunks(chunk):
        c, l_ = score(backend.predict(x), shard.y[start:start + len(x)])
        correct, loss = correct + c, loss + l_
    return {"accuracy": correct / len(shard), "loss": loss / len(shard), "samples": float(len(shard))}


def score(logits: np.ndarray, y: np.ndarray) -> tuple[int, float]:
    """(correct predictions, summed cross-entropy) of a batch of logits, in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    loss = -float((z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).sum())
    return int((z.argmax(axis=1) == y).sum()), loss
