"""The device runtime: trains like torch, accumulates exactly, never imports torch, caches the frozen prefix,
and refuses bad input with one clear error and nothing half-written."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from progfl.device_runtime.cache import FeatureCache
from progfl.device_runtime.device import Device
from progfl.device_runtime.ort_backend import OrtStage
from progfl.device_runtime.shard import Shard, ShardError, read_shard
from progfl.device_runtime.trainer import train_round
from progfl.exporter import export_model
from progfl.exporter.eager import EagerStage
from progfl.manifest import DeviceClass, ManifestError, TrainTask
from progfl.models import build_model, parse_stage_name

CLASSES = [DeviceClass("big", 4096.0)]


def export(tmp_path_factory, name: str, norm: str):
    torch.manual_seed(0)
    model = build_model("cnn", 10, (1, 12, 12), norm=norm, width=8)
    folder = tmp_path_factory.mktemp(name) / "a"
    return model, folder, export_model(model, folder, CLASSES, kinds=("grow", "distill"), batch_size=16, measure=False,
                                       backends=("ort",))


@pytest.fixture(scope="module")
def bn(tmp_path_factory):
    return export(tmp_path_factory, "bn", "batch")


@pytest.fixture(scope="module")
def gn(tmp_path_factory):
    return export(tmp_path_factory, "gn", "group")


def data(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 12, 12)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


@pytest.fixture
def shard(tmp_path):
    """The 64-sample shard of data(), open and validated as a device opens it."""
    x, y = data()
    np.savez(tmp_path / "shard.npz", x=x, y=y)
    with Shard(tmp_path / "shard.npz") as s:
        s.validate([1, 12, 12], 10)
        yield s


def fresh(t: TrainTask) -> TrainTask:
    """A copy a round may consume (train_round empties the task's weights once the engine holds them)."""
    return dataclasses.replace(t, weights=dict(t.weights))


def task(manifest, folder, stage: str, micro: int, accum: int, lr: float = 0.05, epochs: int = 2) -> TrainTask:
    s = manifest.stage(stage)
    w = manifest.initial_weights(folder)
    return TrainTask(round=1, stage=s.name, manifest_sha256="", weights={p.name: w[p.name] for p in s.needed(manifest)},
                     lr=lr, epochs=epochs, batch_size=micro * accum, micro_batch=micro, accum_steps=accum, seed=7)


@pytest.mark.parametrize("stage", ["grow-1", "distill-2"])
def test_local_round_matches_torch(bn, stage, shard):
    model, folder, manifest = bn
    t = task(manifest, folder, stage, 16, 1)
    given = fresh(t)
    ort = train_round(OrtStage(folder, manifest, stage), manifest.stage(stage), given, shard)
    assert given.weights == {}, "the round hands its weights to the engine: no second copy while training"
    ref = train_round(EagerStage(copy.deepcopy(model), parse_stage_name(stage), dtype=torch.float64),
                      manifest.stage(stage), fresh(t), shard)
    assert ort.num_samples == 64 and ort.metrics["steps"] == 8
    assert abs(ort.metrics["loss"] - ref.metrics["loss"]) < 1e-4
    for name, value in ort.weights.items():
        np.testing.assert_allclose(value, ref.weights[name], atol=1e-4, rtol=1e-4, err_msg=name)
        assert not np.array_equal(value, t.weights[name]) or name.endswith("running_var"), f"{name} did not train"


def test_gradient_accumulation_equals_full_batch(gn, shard):
    """GroupNorm (no batch statistics): 4 micro-batches of 4 accumulate to exactly one batch of 16."""
    model, folder, manifest = gn
    stage = manifest.stage("grow-1")
    full = train_round(OrtStage(folder, manifest, "grow-1"), stage, task(manifest, folder, "grow-1", 16, 1), shard)
    micro = train_round(OrtStage(folder, manifest, "grow-1"), stage, task(manifest, folder, "grow-1", 4, 4), shard)
    assert micro.metrics["steps"] == full.metrics["steps"]
    moved = 0.0
    for name, value in full.weights.items():
        np.testing.assert_allclose(micro.weights[name], value, atol=1e-5, rtol=1e-5, err_msg=name)
        moved = max(moved, float(np.abs(value - task(manifest, folder, "grow-1", 16, 1).weights[name]).max()))
    assert moved > 1e-3


def test_feature_cache_same_update_and_reused(bn, shard, tmp_path):
    _, folder, manifest = bn
    stage = manifest.stage("distill-2")  # prefix and teacher are both cached
    t = task(manifest, folder, "distill-2", 8, 2)
    plain = train_round(OrtStage(folder, manifest, stage.name), stage, fresh(t), shard)
    cache = FeatureCache(tmp_path / "cache", keep=3)
    backend = OrtStage(folder, manifest, stage.name)
    first = train_round(backend, stage, fresh(t), shard, cache)
    second = train_round(backend, stage, fresh(t), shard, cache)
    assert (cache.misses, cache.hits) == (2, 2)  # prefix + teacher computed once, then reused
    for name in plain.weights:
        np.testing.assert_allclose(first.weights[name], plain.weights[name], atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(second.weights[name], first.weights[name])
    other = {**t.weights, **{n: v * 0.5 for n, v in t.weights.items() if n.startswith("blocks.0")}}
    train_round(backend, stage, TrainTask(**{**t.__dict__, "weights": other}), shard, cache)
    assert cache.misses == 4, "new prefix weights must not hit the old cache entry"
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3, "the cache keeps only its newest entries"
    x, _ = data(seed=1)
    np.savez(tmp_path / "other.npz", x=x, y=shard.y)
    with Shard(tmp_path / "other.npz") as new_data:
        new_data.validate([1, 12, 12], 10)
        train_round(backend, stage, fresh(t), new_data, cache)
    assert cache.misses == 6, "new data must not hit the old cache entry"


BLOCK_TORCH = ("import sys\n"
               "class NoTorch:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'torch' or name.startswith('torch.'):\n"
               "            raise ImportError('torch is not allowed on the device')\n"
               "sys.meta_path.insert(0, NoTorch())\n"
               "from progfl.cli import main\n"
               "main(sys.argv[1:])\n")


def test_device_trains_where_torch_cannot_be_imported(bn, tmp_path):
    _, folder, manifest = bn
    x, y = data()
    np.savez(tmp_path / "shard.npz", x=x, y=y)
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "device", "train", "--artifacts", str(folder),
                        "--stage", "grow-1", "--data", str(tmp_path / "shard.npz"), "--budget-mb", "2000",
                        "--out", str(tmp_path / "update.npz")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["num_samples"] == 64 and metrics["peak_mb"] > 0 and metrics["over_budget"] == 0
    with np.load(tmp_path / "update.npz") as z:
        assert set(z.files) == set(manifest.stage("grow-1").updated_names)


def cli_train(folder, shard, out, *extra):
    return subprocess.run([sys.executable, "-m", "progfl.cli", "device", "train", "--artifacts", str(folder),
                           "--stage", "grow-1", "--data", str(shard), "--out", str(out), *extra],
                          capture_output=True, text=True)


def test_bad_input_is_one_clear_error(bn, tmp_path):
    _, folder, manifest = bn
    x, y = data()
    np.savez(tmp_path / "shard.npz", x=x, y=y)
    np.savez(tmp_path / "empty.npz", x=x[:0], y=y[:0])
    np.savez(tmp_path / "shape.npz", x=x[:, :, :8, :8], y=y)
    bad_x = x.copy()
    bad_x[5, 0, 3, 3] = np.nan
    np.savez(tmp_path / "nan_pixels.npz", x=bad_x, y=y)
    np.savez(tmp_path / "labels.npz", x=x, y=y + 10)
    weights = manifest.initial_weights(folder)
    name = manifest.stage("grow-1").trainable_names[0]
    np.savez(tmp_path / "wrong.npz", **{**weights, name: np.zeros((3, 3), np.float32)})
    nan = dict(weights)
    nan[name] = np.full_like(nan[name], np.nan)
    np.savez(tmp_path / "nan.npz", **nan)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    path = broken / manifest.stage("grow-1").files["training"].path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cases = [
        ((folder, tmp_path / "empty.npz"), (), "empty data shard"),
        ((folder, tmp_path / "missing.npz"), (), "file not found"),
        ((folder, tmp_path / "shape.npz"), (), "samples of shape [1, 8, 8]"),
        ((folder, tmp_path / "nan_pixels.npz"), (), "sample 5 has NaN or Inf"),
        ((folder, tmp_path / "labels.npz"), (), "labels must be in 0..9, found 10..19"),
        ((folder, tmp_path / "shard.npz"), ("--weights", str(tmp_path / "wrong.npz")), f"{name} has shape [3, 3]"),
        ((folder, tmp_path / "shard.npz"), ("--weights", str(tmp_path / "nan.npz")), f"{name} contains NaN"),
        ((broken, tmp_path / "shard.npz"), (), "does not match its sha256"),
        ((folder, tmp_path / "shard.npz"), ("--budget-mb", "20"), "cannot take part"),
    ]
    for (art, shard), extra, message in cases:
        out = tmp_path / "update.npz"
        r = cli_train(art, shard, out, *extra)
        assert r.returncode == 2, (message, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not out.exists(), "an update was written despite the error"
    with pytest.raises(ManifestError, match="does not match its sha256"):
        OrtStage(broken, manifest, "grow-1")
    with pytest.raises(ManifestError, match="do not load"):  # a damaged file with its sha256 updated still fails
        manifest_copy = copy.deepcopy(manifest)
        from progfl.manifest import sha256_file

        manifest_copy.stage("grow-1").files["training"].sha256 = sha256_file(path)
        OrtStage(broken, manifest_copy, "grow-1")


def test_device_object_reuses_stage_and_checks_manifest(bn, shard):
    _, folder, manifest = bn
    dev = Device(folder, shard, budget_mb=1000)
    micro, accum = dev.plan("grow-1")
    t = task(manifest, folder, "grow-1", micro, accum, epochs=1)
    t.manifest_sha256 = dev.manifest_sha256
    dev.train(fresh(t))
    backend = dev._backend
    dev.train(fresh(t))
    assert dev._backend is backend, "the same stage must not be rebuilt every round"
    t.manifest_sha256 = "0" * 64
    with pytest.raises(ManifestError, match="other artifacts"):
        dev.train(fresh(t))


def test_shard_reads_slices_of_plain_and_compressed_archives(tmp_path):
    x, y = data(100)
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "packed.npz", x=x, y=y.astype(np.int32))
    idx = np.array([3, 4, 5, 99, 0, 17, 18])
    digests = []
    for name in ("plain.npz", "packed.npz"):
        with Shard(tmp_path / name, scratch=tmp_path / "scratch") as s:
            assert len(s) == 100 and s.sample_shape == (1, 12, 12) and s.y.dtype == np.int64
            np.testing.assert_array_equal(s.read(idx), x[idx])
            np.testing.assert_array_equal(np.concatenate([c.copy() for _, c in s.x.chunks(32)]), x)
            digests.append(s.validate([1, 12, 12], 10))
    assert digests[0] == digests[1], "the same data must give the same cache key in either archive form"
    np.testing.assert_array_equal(read_shard(tmp_path / "packed.npz")[0], x)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "plain.npz").read_bytes()[:-20_000])
    (tmp_path / "fortran.npz").write_bytes(b"")
    np.savez(tmp_path / "fortran.npz", x=np.asfortranarray(x), y=y)
    np.savez(tmp_path / "f64.npz", x=x.astype(np.float64), y=y)
    for name, message in [("cut.npz", "not an .npz archive"), ("fortran.npz", "Fortran order"),
                          ("f64.npz", "x must be C-order float32")]:
        with pytest.raises(ShardError, match=message):
            Shard(tmp_path / name)


# A width-8 CNN on 3x32x32: 4,096 samples are 48 MB of pixels and 32 MB of block-0 features, so a round that held
# either in memory would peak tens of MB above the 64-sample round.
@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("cnn", 10, (3, 32, 32), width=8)
    folder = tmp_path_factory.mktemp("rgb") / "a"
    return folder, export_model(model, folder, CLASSES, kinds=("grow",), batch_size=32, measure_batches=[8, 32],
                                backends=("ort",))


def test_peak_memory_does_not_grow_with_the_shard(rgb, tmp_path):
    """Same stage, 64 and 4,096 samples, 2 epochs, with the feature cache: peaks within 10 MB of each other and
    under the budget the manifest sized (a budget that holds exactly micro-batch 32 plus the safety margin)."""
    folder, manifest = rgb
    stage = manifest.stage("grow-1")
    from progfl.manifest import predicted_peak_mb

    budget = predicted_peak_mb(stage, 32) / (1 - manifest.safety_margin) + 1.0
    rng = np.random.default_rng(0)
    peaks = {}
    for n in (64, 4096):
        x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        np.savez(tmp_path / f"s{n}.npz", x=x, y=rng.integers(0, 10, n))
        del x
        r = subprocess.run([sys.executable, "-m", "progfl.cli", "device", "train", "--artifacts", str(folder),
                            "--stage", "grow-1", "--data", str(tmp_path / f"s{n}.npz"), "--budget-mb", f"{budget:.1f}",
                            "--epochs", "2", "--cache", str(tmp_path / f"cache{n}"), "--threads", "1"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        m = json.loads(r.stdout)
        assert m["micro_batch"] == 32 and m["num_samples"] == n
        peaks[n] = m["peak_mb"]
        assert m["peak_mb"] <= budget and not m["over_budget"], (n, m["peak_mb"], budget)
    assert abs(peaks[4096] - peaks[64]) <= 10.0, peaks
