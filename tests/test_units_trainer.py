"""Unit tests of the device trainer (progfl/device_runtime/trainer.py) against a fake engine, in milliseconds.

The engine tests (test_local_round.py, test_device_runtime.py) check a round end to end through ONNX Runtime; these
check the trainer's own contract with any engine, each against an expectation computed here without the trainer:
every sample once per epoch, micro-batches whose loss shares sum to one per logical batch (so the step is the
logical batch's mean gradient whatever the split), the sample-weighted loss, the frozen outputs computed once a
round in small chunks (or taken from the feature cache), the metrics a device reports, and the checks that keep a
bad task or a diverged round from reaching the server.
(Written for issue 13's mutation testing: `make mutation`.)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from progfl.device_runtime import trainer
from progfl.device_runtime.backend import StageBackend
from progfl.device_runtime.cache import FeatureCache
from progfl.device_runtime.memory import PhaseLog
from progfl.device_runtime.shard import Shard
from progfl.device_runtime.trainer import (
    FROZEN_CHUNK,
    LocalData,
    TrainingError,
    _batches,
    check_finite,
    check_task,
    evaluate_shard,
    score,
    train_round,
)
from progfl.manifest import FileRef, ManifestError, ParamSpec, Stage, TensorSpec, TrainTask

SAMPLE = (1, 2, 2)  # one sample: 4 scalars
D = 4


def make_stage(files: tuple[str, ...] = (), raw_inputs: bool = False, name: str = "grow-1") -> Stage:
    """A stage whose only trainer-visible traits are its files (prefix? teacher?) and its graph inputs."""
    inputs = [TensorSpec("features", [-1, D])] + ([TensorSpec("inputs", [-1, *SAMPLE])] if raw_inputs else [])
    return Stage(index=1, name=name, kind="grow", block=1, loss="ce", loss_config={}, optimizer={}, inputs=inputs,
                 feature=TensorSpec("features", [-1, D]), params=[ParamSpec("w", [D])], session_params={},
                 bn_updates={}, bn_variance={}, files={f: FileRef(f"{f}.onnx", "0" * 64, 1) for f in files},
                 footprint={})


def write_shard(path: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An uncompressed shard of n samples; returns its (x, y)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *SAMPLE)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int64)
    np.savez(path, x=x, y=y)
    return x, y


class Clock:
    """A fake perf_counter the fake engine advances: step k takes durations[k] seconds, nothing else takes time."""

    def __init__(self, durations: list[float] | None = None) -> None:
        self.now, self.durations, self.k = 100.0, list(durations or []), 0

    def __call__(self) -> float:
        return self.now

    def step(self) -> None:
        if self.k < len(self.durations):
            self.now += self.durations[self.k]
        self.k += 1


class FakeEngine(StageBackend):
    """A linear model with a closed-form update: per-sample loss y_i + 0.5, gradient of the micro-batch = its mean
    feature row, scaled by loss_scale and summed until step(lr) applies w -= lr * g. The prefix doubles x, the
    teacher sums its input's rows. Every call is logged."""

    def __init__(self, clock: Clock | None = None, digests: dict[str, str] | None = None,
                 fail_at: str | None = None) -> None:
        self.w = np.zeros(D)
        self.g = np.zeros(D)
        self.log: list[str] = []
        self.feature_chunks: list[int] = []
        self.teacher_chunks: list[int] = []
        self.fed: list[dict[str, np.ndarray]] = []  # copies of what each accumulate() got
        self.lrs: list[float] = []
        self.set: list[dict[str, np.ndarray]] = []
        self.clock = clock
        self.digests = digests or {"prefix": "p0", "teacher": "t0"}
        self.fail_at = fail_at
        self.seen_scratch: list[list[str]] = []
        self.scratch: Path | None = None

    def set_weights(self, arrays: dict[str, np.ndarray]) -> None:
        self.log.append("set_weights")
        self.set.append({k: np.array(v) for k, v in arrays.items()})
        self.w = np.asarray(arrays.get("w", np.zeros(D)), np.float64).copy()

    def features(self, x: np.ndarray) -> np.ndarray:
        self.log.append("features")
        if self.fail_at == "features":
            raise RuntimeError("prefix failed")
        self.feature_chunks.append(len(x))
        return (2.0 * x).reshape(len(x), D).astype(np.float32)

    def session_digest(self, kind: str) -> str:
        return self.digests[kind]  # KeyError for a file the stage lacks, as the real engines

    def teacher(self, features: np.ndarray) -> np.ndarray:
        self.log.append("teacher")
        self.teacher_chunks.append(len(features))
        f = np.asarray(features, np.float32).reshape(len(features), -1)
        return np.stack([f.sum(1), -f.sum(1)], 1).astype(np.float32)

    def accumulate(self, inputs: dict[str, np.ndarray]) -> float:
        self.log.append("accumulate")
        if self.fail_at == "accumulate":
            raise RuntimeError("step failed")
        if self.scratch is not None:
            self.seen_scratch.append(sorted(p.name for p in self.scratch.iterdir()))
        self.fed.append({k: np.array(v, copy=True) for k, v in inputs.items()})
        f = np.asarray(inputs["features"], np.float64).reshape(len(inputs["labels"]), -1)
        self.g += float(inputs["loss_scale"]) * f.mean(0)
        return float(np.mean(inputs["labels"] + 0.5))

    def step(self, lr: float) -> None:
        self.log.append("step")
        self.lrs.append(lr)
        self.w -= lr * self.g
        self.g[:] = 0.0
        if self.clock is not None:
            self.clock.step()

    def get_weights(self) -> dict[str, np.ndarray]:
        self.log.append("get_weights")
        return {"w": self.w.astype(np.float32)}

    def predict(self, x: np.ndarray) -> np.ndarray:
        flat = np.asarray(x, np.float64).reshape(len(x), -1)
        return np.stack([flat[:, 0], flat[:, 1], flat[:, 2] + flat[:, 3]], 1).astype(np.float32)

    def release_frozen(self) -> None:
        self.log.append("release_frozen")


def task(n_batch: int, micro: int, epochs: int = 1, lr: float = 0.1, seed: int = 0,
         budget: float | None = None) -> TrainTask:
    return TrainTask(round=3, stage="grow-1", manifest_sha256="", weights={"w": np.ones(D, np.float32)}, lr=lr,
                     epochs=epochs, batch_size=n_batch, micro_batch=micro, accum_steps=math.ceil(n_batch / max(micro, 1)),
                     seed=seed, budget_mb=budget)


@pytest.fixture
def shard10(tmp_path: Path):
    """10 samples, opened (not validated: no digest)."""
    x, y = write_shard(tmp_path / "s.npz", 10)
    with Shard(tmp_path / "s.npz") as s:
        yield s, x, y


# ---- the loop ----


def test_batches_cover_each_sample_once_in_logical_batches_of_micro_batches() -> None:
    """An epoch is a permutation cut into batches of `batch` (the last may be short), each cut into `micro`."""
    for n, batch, micro in [(10, 4, 3), (10, 10, 4), (7, 3, 1), (6, 6, 6), (5, 8, 2)]:
        epoch = list(_batches(np.random.default_rng(1), n, batch, micro))
        assert len(epoch) == math.ceil(n / batch)
        flat = [int(i) for micros in epoch for m in micros for i in m]
        assert sorted(flat) == list(range(n))
        for b, micros in enumerate(epoch):
            size = min(batch, n - b * batch)
            assert [len(m) for m in micros] == [min(micro, size - j) for j in range(0, size, micro)]
    a = [np.concatenate(m) for m in _batches(np.random.default_rng(5), 20, 20, 20)]
    b = [np.concatenate(m) for m in _batches(np.random.default_rng(5), 20, 20, 20)]
    c = [np.concatenate(m) for m in _batches(np.random.default_rng(6), 20, 20, 20)]
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])  # the order is the rng's: a shuffle


@pytest.mark.parametrize("micro", [1, 3, 4, 10])
def test_one_batch_epoch_moves_w_by_lr_times_the_mean_gradient_whatever_the_split(shard10: Any, micro: int) -> None:
    """One logical batch of all 10 samples: w1 = w0 - lr * mean_i f(x_i) exactly, for any micro-batch size
    (loss shares len(m)/n sum to one); the loss is the plain sample mean of y + 0.5."""
    shard, x, y = shard10
    eng = FakeEngine()
    up = train_round(eng, make_stage(), task(10, micro, lr=0.25), shard)
    expect = np.ones(D) - 0.25 * x.reshape(10, D).astype(np.float64).mean(0)
    np.testing.assert_allclose(up.weights["w"], expect, rtol=1e-6)
    assert up.metrics["loss"] == pytest.approx(float(np.mean(y + 0.5)), rel=1e-12)
    assert eng.lrs == [0.25] and up.metrics["steps"] == 1.0
    sizes = [len(f["labels"]) for f in eng.fed]
    assert sizes == [min(micro, 10 - j) for j in range(0, 10, micro)]
    assert sum(float(f["loss_scale"]) for f in eng.fed) == pytest.approx(1.0)
    for f in eng.fed:
        assert float(f["loss_scale"]) == pytest.approx(len(f["labels"]) / 10)


def test_steps_per_epoch_shares_per_batch_and_sample_weighted_loss(shard10: Any) -> None:
    """Batches of 4 over 10 samples (4, 4, 2), micro 3, two epochs: 6 steps, each batch's shares sum to one, every
    sample fed once per epoch with its own label, and the loss is the mean over all 20 sample-visits."""
    shard, x, y = shard10
    eng = FakeEngine()
    up = train_round(eng, make_stage(), task(4, 3, epochs=2, lr=0.5), shard)
    assert up.metrics["steps"] == 6.0 and eng.lrs == [0.5] * 6
    assert eng.log.count("step") == 6
    # shares, rebuilt from the fed inputs in order and split at the steps
    shares = iter(float(f["loss_scale"]) for f in eng.fed)
    sums, cur = [], 0.0
    for entry in eng.log:
        if entry == "accumulate":
            cur += next(shares)
        elif entry == "step":
            sums.append(cur)
            cur = 0.0
    assert sums == pytest.approx([1.0] * 6)
    assert up.metrics["loss"] == pytest.approx(float(np.mean(y + 0.5)), rel=1e-12)
    seen = np.concatenate([f["labels"] for f in eng.fed])
    assert len(seen) == 20 and np.array_equal(np.sort(seen[:10]), np.sort(y)) and np.array_equal(np.sort(seen[10:]), np.sort(y))
    rows = np.concatenate([f["features"].reshape(len(f["labels"]), -1) for f in eng.fed])
    xs = x.reshape(10, D)
    assert all(any(np.array_equal(r, xr) for xr in xs) for r in rows)  # no prefix: the features are the inputs
    assert up.num_samples == 10 and up.round == 3 and up.stage == "grow-1"


def test_the_seed_fixes_the_order(shard10: Any) -> None:
    """Same task seed, same sample order (and update); another seed, another order."""
    shard, _, _ = shard10

    def order(seed: int) -> np.ndarray:
        eng = FakeEngine()
        train_round(eng, make_stage(), task(10, 10, seed=seed), shard)
        return eng.fed[0]["labels"], eng.fed[0]["features"]

    a, b, c = order(4), order(4), order(5)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])


def test_the_task_weights_are_handed_over_and_released(shard10: Any) -> None:
    """The engine gets the task's arrays; the task's dict is emptied (no second copy while training); the frozen
    sessions are released after the frozen outputs and before the first step; the update is read last."""
    shard, _, _ = shard10
    eng = FakeEngine()
    t = task(10, 5)
    t.weights = {"w": np.full(D, 3.0, np.float32)}
    up = train_round(eng, make_stage(files=("prefix",)), t, shard)
    assert t.weights == {}
    assert np.array_equal(eng.set[0]["w"], np.full(D, 3.0, np.float32))
    log = eng.log
    assert log[0] == "set_weights" and log.count("release_frozen") == 1
    assert log.index("release_frozen") > max(i for i, e in enumerate(log) if e == "features")
    assert log.index("release_frozen") < log.index("accumulate")
    assert log[-1] == "get_weights" and up.weights["w"].dtype == np.float32


def test_metrics_time_and_budget(shard10: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """seconds is the round's wall time, samples_per_s = samples / seconds, step_ms the median step after the first
    (which warms up), the budget is echoed and over_budget says whether the measured peak exceeded it."""
    shard, _, _ = shard10
    clock = Clock([9.0, 1.0, 2.0, 4.0, 0.5])  # five steps: batches of 2
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=clock))
    up = train_round(FakeEngine(clock), make_stage(), task(2, 2, budget=1e9), shard)
    m = up.metrics
    assert m["steps"] == 5.0
    assert m["seconds"] == pytest.approx(16.5)
    assert m["samples_per_s"] == pytest.approx(10 / 16.5)
    assert m["step_ms"] == pytest.approx(1000 * 1.5)  # median of 1, 2, 4, 0.5
    assert m["budget_mb"] == 1e9 and m["over_budget"] == 0.0
    assert m["peak_mb"] > 0 and m["peak_mb"] == round(m["peak_mb"], 1)
    assert m["peak_resettable"] in (0.0, 1.0)
    assert set(m) == {"loss", "seconds", "steps", "step_ms", "samples_per_s", "peak_mb", "peak_resettable",
                      "torch_imported", "budget_mb", "over_budget"}


def test_a_single_step_round_reports_that_step_and_no_budget_keys(shard10: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With one step there is nothing after the warm-up step: step_ms is that step. No budget: no budget keys;
    epochs multiply the samples of samples_per_s."""
    shard, _, _ = shard10
    clock = Clock([0.25, 0.25])
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=clock))
    up = train_round(FakeEngine(clock), make_stage(), task(10, 10), shard)
    assert up.metrics["step_ms"] == pytest.approx(250.0)
    assert "budget_mb" not in up.metrics and "over_budget" not in up.metrics
    clock2 = Clock([0.5, 0.5])
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=clock2))
    up2 = train_round(FakeEngine(clock2), make_stage(), task(10, 10, epochs=2), shard)
    assert up2.metrics["samples_per_s"] == pytest.approx(20 / 1.0) and up2.num_samples == 10


def test_over_budget_and_torch_flag(shard10: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget below the process's measured peak is reported as exceeded; torch_imported follows sys.modules."""
    shard, _, _ = shard10
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch", SimpleNamespace()))
    up = train_round(FakeEngine(), make_stage(), task(10, 10, budget=0.001), shard)
    assert up.metrics["over_budget"] == 1.0 and up.metrics["budget_mb"] == 0.001
    assert up.metrics["torch_imported"] == 1.0
    monkeypatch.delitem(sys.modules, "torch")
    up = train_round(FakeEngine(), make_stage(), task(10, 10), shard)
    assert up.metrics["torch_imported"] == 0.0


@pytest.mark.parametrize("batch,micro", [(4, 2), (5, 5)])
def test_the_round_marks_its_phases_for_the_probe(shard10: Any, batch: int, micro: int) -> None:
    """`progfl device profile` reports where a round's memory goes by these phases, in this order, once each
    (the first forward+backward ends at the first micro-batch, before the first step even when a step has one)."""
    shard, _, _ = shard10
    with PhaseLog() as log:
        train_round(FakeEngine(), make_stage(), task(batch, micro, epochs=2), shard)
    assert [p.name for p in log.phases] == ["weights set", "frozen outputs cached", "frozen sessions released",
                                            "first forward+backward", "first optimizer step", "other steps",
                                            "update read"]


class FixedPeak:
    """Stands in for PhasePeak: the round's measured peak is `mb`."""

    mb = 0.0
    resettable = False

    def __enter__(self) -> "FixedPeak":
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mb = FixedPeak.mb


@pytest.mark.parametrize("peak,budget,over", [(123.456, 123.456, 0.0), (123.456, 123.4, 1.0), (80.04, 500.0, 0.0)])
def test_peak_is_reported_to_0_1_mb_and_over_budget_is_strict(shard10: Any, monkeypatch: pytest.MonkeyPatch,
                                                              peak: float, budget: float, over: float) -> None:
    """The measured peak, rounded to 0.1 MB; over budget only when the peak exceeds the budget (equal is within)."""
    shard, _, _ = shard10
    monkeypatch.setattr(trainer, "PhasePeak", FixedPeak)
    monkeypatch.setattr(FixedPeak, "mb", peak)
    m = train_round(FakeEngine(), make_stage(), task(10, 5, budget=budget), shard).metrics
    assert m["peak_mb"] == round(peak, 1) and m["over_budget"] == over and m["peak_resettable"] == 0.0


# ---- the frozen outputs ----


@pytest.mark.parametrize("micro,chunk", [(3, 3), (10, FROZEN_CHUNK), (8, 8)])
def test_prefix_runs_once_in_small_chunks_and_feeds_the_features(shard10: Any, micro: int, chunk: int) -> None:
    """The frozen prefix runs over the shard once a round, in order, in chunks of min(micro, 8); each micro-batch
    gets the prefix's output of its own samples, and no raw inputs unless the graph takes them."""
    shard, x, y = shard10
    eng = FakeEngine()
    train_round(eng, make_stage(files=("prefix",)), task(10, micro, epochs=2), shard)
    assert eng.log.count("features") == math.ceil(10 / chunk)
    assert eng.feature_chunks == [min(chunk, 10 - j) for j in range(0, 10, chunk)]
    for f in eng.fed:
        assert "inputs" not in f and "teacher" not in f
        lab = f["labels"]
        feats = f["features"].reshape(len(lab), D)
        for row, label in zip(feats, lab):  # each row is 2 x of a sample with that label
            i = [k for k in range(10) if np.array_equal(row, (2 * x[k]).reshape(D))]
            assert len(i) == 1 and y[i[0]] == label


def test_raw_inputs_beside_the_features_when_the_graph_takes_them(shard10: Any) -> None:
    """NeuLite's graph takes x too: each micro-batch gets the raw samples matching its features."""
    shard, x, _ = shard10
    eng = FakeEngine()
    train_round(eng, make_stage(files=("prefix",), raw_inputs=True), task(10, 4), shard)
    for f in eng.fed:
        np.testing.assert_array_equal(f["features"].reshape(len(f["labels"]), D),
                                      2 * f["inputs"].reshape(len(f["labels"]), D))


@pytest.mark.parametrize("prefix", [True, False])
def test_teacher_logits_come_from_the_features(shard10: Any, prefix: bool) -> None:
    """A distillation stage's teacher runs on the prefix's features (on x when there is no prefix), once a round,
    and each micro-batch gets the teacher's logits of its own samples."""
    shard, x, _ = shard10
    eng = FakeEngine()
    files = ("prefix", "teacher") if prefix else ("teacher",)
    train_round(eng, make_stage(files=files), task(10, 5, epochs=2), shard)
    assert eng.log.count("teacher") == 2 and eng.teacher_chunks == [5, 5]
    xs = x.reshape(10, D).astype(np.float64)
    for f in eng.fed:
        feats = f["features"].reshape(len(f["labels"]), D).astype(np.float64)
        for row in feats:  # the features are 2x (prefix) or x (none) of exactly one sample
            assert sum(np.allclose(row, (2 if prefix else 1) * xr) for xr in xs) == 1
        np.testing.assert_allclose(f["teacher"][:, 0], feats.sum(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f["teacher"][:, 1], -feats.sum(1), rtol=1e-5, atol=1e-6)


def test_validated_shard_uses_the_persistent_cache_keyed_by_the_frozen_weights(tmp_path: Path) -> None:
    """Same frozen weights and data: the next round reads the cache (the prefix and teacher do not run). New prefix
    weights recompute both (the teacher's input changed); new teacher weights recompute the teacher only."""
    write_shard(tmp_path / "s.npz", 10)
    cache = FeatureCache(tmp_path / "cache")
    stage = make_stage(files=("prefix", "teacher"))
    with Shard(tmp_path / "s.npz") as shard:
        shard.validate(list(SAMPLE), 3)
        runs = []
        for digests in ({"prefix": "a", "teacher": "t"}, {"prefix": "a", "teacher": "t"},
                        {"prefix": "b", "teacher": "t"}, {"prefix": "b", "teacher": "u"}):
            eng = FakeEngine(digests=digests)
            train_round(eng, stage, task(10, 10), shard, cache=cache)
            runs.append((eng.log.count("features"), eng.log.count("teacher")))
    assert runs == [(2, 2), (0, 0), (2, 2), (0, 2)]
    assert cache.hits == 3 and cache.misses == 5


def test_a_new_shard_misses_the_cache_even_with_the_same_frozen_weights(tmp_path: Path) -> None:
    """The data's digest is part of the key: another shard of the same size gets its own features and logits."""
    cache = FeatureCache(tmp_path / "cache")
    stage = make_stage(files=("prefix", "teacher"))
    for seed in (1, 2):
        x, _ = write_shard(tmp_path / f"s{seed}.npz", 10, seed=seed)
        with Shard(tmp_path / f"s{seed}.npz") as shard:
            shard.validate(list(SAMPLE), 3)
            eng = FakeEngine()
            train_round(eng, stage, task(10, 10), shard, cache=cache)
        assert (eng.log.count("features"), eng.log.count("teacher")) == (2, 2)
        fed = eng.fed[0]["features"].reshape(10, D)
        assert all(any(np.allclose(r, 2 * xr) for xr in x.reshape(10, D)) for r in fed)


@pytest.mark.parametrize("validated", [True, False])
def test_only_the_stages_own_frozen_files_are_digested(tmp_path: Path, validated: bool) -> None:
    """A teacher without a prefix: the engine is never asked for a prefix digest (it has no such file)."""
    write_shard(tmp_path / "s.npz", 10)
    with Shard(tmp_path / "s.npz") as shard:
        if validated:
            shard.validate(list(SAMPLE), 3)
        for _ in range(2):
            eng = FakeEngine(digests={"teacher": "t"})
            train_round(eng, make_stage(files=("teacher",)), task(10, 5), shard, cache=FeatureCache(tmp_path / "c"))
            assert len(eng.fed) == 2


@pytest.mark.parametrize("with_cache", [True, False])
def test_a_validated_shard_uses_scratch_only_without_a_cache(tmp_path: Path, with_cache: bool) -> None:
    """With a data digest and a cache the frozen outputs persist there and no scratch file is made; a digest alone
    does not make them persistent: with no cache they live in scratch for the round, removed after it."""
    write_shard(tmp_path / "s.npz", 10)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cache = FeatureCache(tmp_path / "c") if with_cache else None
    with Shard(tmp_path / "s.npz") as shard:
        shard.validate(list(SAMPLE), 3)
        eng = FakeEngine()
        eng.scratch = scratch
        train_round(eng, make_stage(files=("prefix",)), task(10, 10), shard, cache=cache, scratch=str(scratch))
    assert len(eng.seen_scratch[0]) == (0 if with_cache else 1) and list(scratch.iterdir()) == []


def test_unvalidated_shard_never_touches_the_cache_and_scratch_is_cleaned(tmp_path: Path) -> None:
    """Without a data digest there is no cache key: the frozen outputs go to a scratch folder (under `scratch`) that
    lives for the round only, and are recomputed the next round."""
    write_shard(tmp_path / "s.npz", 10)
    cache = FeatureCache(tmp_path / "cache")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with Shard(tmp_path / "s.npz") as shard:
        for _ in range(2):
            eng = FakeEngine()
            eng.scratch = scratch
            train_round(eng, make_stage(files=("prefix",)), task(10, 10), shard, cache=cache, scratch=str(scratch))
            assert eng.log.count("features") == 2
            assert len(eng.seen_scratch[0]) == 1 and eng.seen_scratch[0][0].startswith("progfl-features-")
            assert list(scratch.iterdir()) == []
    assert list((tmp_path / "cache").iterdir()) == [] and cache.hits == cache.misses == 0


@pytest.mark.parametrize("where", ["features", "accumulate"])
def test_a_failing_round_still_removes_its_scratch_folder(tmp_path: Path, where: str) -> None:
    """An engine error in the frozen pass or in a step propagates, and the round's scratch files are gone."""
    write_shard(tmp_path / "s.npz", 10)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with Shard(tmp_path / "s.npz") as shard:
        with pytest.raises(RuntimeError, match="failed"):
            train_round(FakeEngine(fail_at=where), make_stage(files=("prefix",)), task(10, 5), shard,
                        scratch=str(scratch))
    assert list(scratch.iterdir()) == []


def test_local_data_without_frozen_files_feeds_the_raw_samples(shard10: Any) -> None:
    """No prefix: features and inputs are the samples themselves, read by index."""
    shard, x, y = shard10
    data = LocalData(FakeEngine(), make_stage(), shard, 4)
    try:
        idx = np.array([7, 2, 9])
        got = data.inputs(idx)
        assert set(got) == {"labels", "inputs", "features"}
        np.testing.assert_array_equal(got["inputs"], x[idx])
        np.testing.assert_array_equal(got["features"], x[idx])
        np.testing.assert_array_equal(got["labels"], y[idx])
        assert data.features is None and data.teacher is None
    finally:
        data.close()


# ---- checks ----


@pytest.mark.parametrize("kw", [dict(micro=0), dict(micro=11, n_batch=10), dict(epochs=0), dict(lr=float("nan")),
                                dict(lr=float("inf")), dict(accum=0)])
def test_a_bad_task_is_refused_before_training(kw: dict[str, Any]) -> None:
    """micro-batch outside 1..batch, no accumulation step, no epoch or a non-finite rate: one clear error."""
    t = task(kw.get("n_batch", 10), kw.get("micro", 5), epochs=kw.get("epochs", 1), lr=kw.get("lr", 0.1))
    if "accum" in kw:
        t.accum_steps = kw["accum"]
    with pytest.raises(ManifestError, match="bad task"):
        check_task(t)


@pytest.mark.parametrize("n_batch,micro", [(10, 1), (10, 10), (1, 1)])
def test_edge_tasks_are_accepted(n_batch: int, micro: int) -> None:
    t = task(n_batch, micro, epochs=1, lr=0.0)
    t.accum_steps = 1
    check_task(t)


def test_a_bad_task_fails_before_the_engine_is_touched(shard10: Any) -> None:
    shard, _, _ = shard10
    eng = FakeEngine()
    with pytest.raises(ManifestError, match="bad task"):
        train_round(eng, make_stage(), task(10, 20), shard)
    assert eng.log == []


def test_check_finite_counts_the_bad_values() -> None:
    """The error says how many values are bad, in how many arrays, and names the first."""
    ok = {"a": np.ones(3, np.float32), "b": np.zeros((2, 2), np.float32)}
    check_finite(ok, 0.5)
    bad = {"a": np.array([1.0, np.nan, np.inf], np.float32), "b": np.ones(2, np.float32),
           "c": np.array([-np.inf], np.float32)}
    with pytest.raises(TrainingError, match=r"3 non-finite values in 2 arrays \(first: a\)"):
        check_finite(bad, 0.5)
    with pytest.raises(TrainingError, match="finite weights") as err:
        check_finite(ok, float("nan"))
    assert "loss nan" in str(err.value)
    with pytest.raises(TrainingError, match="loss inf"):
        check_finite(ok, float("inf"))
    assert issubclass(TrainingError, ManifestError)


def test_a_diverged_round_sends_nothing(shard10: Any) -> None:
    """A NaN in the trained weights ends the round with TrainingError instead of an update."""
    shard, _, _ = shard10

    class Diverging(FakeEngine):
        def get_weights(self) -> dict[str, np.ndarray]:
            return {"w": np.full(D, np.nan, np.float32)}

    with pytest.raises(TrainingError, match="diverged"):
        train_round(Diverging(), make_stage(), task(10, 5), shard)


# ---- evaluation ----


def reference_ce(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample cross-entropy, log-sum-exp by numpy's logaddexp (independent of score())."""
    z = logits.astype(np.float64)
    return np.logaddexp.reduce(z, axis=1) - z[np.arange(len(y)), y]


def test_score_counts_and_sums_cross_entropy() -> None:
    z = np.array([[0.0, 0.0], [1.0, 2.0], [1000.0, 0.0], [3.0, -1.0]], np.float32)
    y = np.array([0, 1, 1, 0])
    correct, loss = score(z, y)
    assert correct == 3  # the tie goes to class 0; row 3 is wrong
    assert loss == pytest.approx(float(reference_ce(z, y).sum()), rel=1e-12)
    assert math.isfinite(loss) and loss == pytest.approx(math.log(2) + math.log1p(math.exp(-1)) + 1000
                                                         + math.log1p(math.exp(-4)), rel=1e-9)


def test_score_leaves_the_logits_alone() -> None:
    z = np.array([[5.0, 1.0]], np.float64)
    score(z, np.array([0]))
    assert z.tolist() == [[5.0, 1.0]]


@pytest.mark.parametrize("chunk", [3, 10, 256])
def test_evaluate_shard_is_accuracy_and_mean_cross_entropy(shard10: Any, chunk: int) -> None:
    """The weights are set, then accuracy and mean CE over every sample, whatever the chunk."""
    shard, x, y = shard10
    eng = FakeEngine()
    out = evaluate_shard(eng, shard, {"w": np.full(D, 7.0, np.float32)}, chunk=chunk)
    logits = eng.predict(x)
    assert eng.set[0]["w"].tolist() == [7.0] * D
    assert out["accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == y)))
    assert out["loss"] == pytest.approx(float(reference_ce(logits, y).mean()), rel=1e-9)
    assert out["samples"] == 10.0
