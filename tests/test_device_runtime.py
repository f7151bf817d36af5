"""The device runtime: trains like torch, accumulates exactly, never imports torch, caches the frozen prefix,
and refuses bad input with one clear error and nothing half-written."""

from __future__ import annotations

import copy
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
    return model, folder, export_model(model, folder, CLASSES, kinds=("grow", "distill"), batch_size=16, measure=False)


@pytest.fixture(scope="module")
def bn(tmp_path_factory):
    return export(tmp_path_factory, "bn", "batch")


@pytest.fixture(scope="module")
def gn(tmp_path_factory):
    return export(tmp_path_factory, "gn", "group")


def data(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 12, 12)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


def task(manifest, folder, stage: str, micro: int, accum: int, lr: float = 0.05, epochs: int = 2) -> TrainTask:
    s = manifest.stage(stage)
    w = manifest.initial_weights(folder)
    return TrainTask(round=1, stage=s.name, manifest_sha256="", weights={p.name: w[p.name] for p in s.needed(manifest)},
                     lr=lr, epochs=epochs, batch_size=micro * accum, micro_batch=micro, accum_steps=accum, seed=7)


@pytest.mark.parametrize("stage", ["grow-1", "distill-2"])
def test_local_round_matches_torch(bn, stage):
    model, folder, manifest = bn
    x, y = data()
    t = task(manifest, folder, stage, 16, 1)
    ort = train_round(OrtStage(folder, manifest, stage), manifest.stage(stage), t, x, y)
    ref = train_round(EagerStage(copy.deepcopy(model), parse_stage_name(stage), dtype=torch.float64),
                      manifest.stage(stage), t, x, y)
    assert ort.num_samples == 64 and ort.metrics["steps"] == 8
    assert abs(ort.metrics["loss"] - ref.metrics["loss"]) < 1e-4
    for name, value in ort.weights.items():
        np.testing.assert_allclose(value, ref.weights[name], atol=1e-4, rtol=1e-4, err_msg=name)
        assert not np.array_equal(value, t.weights[name]) or name.endswith("running_var"), f"{name} did not train"


def test_gradient_accumulation_equals_full_batch(gn):
    """GroupNorm (no batch statistics): 4 micro-batches of 4 accumulate to exactly one batch of 16."""
    model, folder, manifest = gn
    x, y = data()
    stage = manifest.stage("grow-1")
    full = train_round(OrtStage(folder, manifest, "grow-1"), stage, task(manifest, folder, "grow-1", 16, 1), x, y)
    micro = train_round(OrtStage(folder, manifest, "grow-1"), stage, task(manifest, folder, "grow-1", 4, 4), x, y)
    assert micro.metrics["steps"] == full.metrics["steps"]
    moved = 0.0
    for name, value in full.weights.items():
        np.testing.assert_allclose(micro.weights[name], value, atol=1e-5, rtol=1e-5, err_msg=name)
        moved = max(moved, float(np.abs(value - task(manifest, folder, "grow-1", 16, 1).weights[name]).max()))
    assert moved > 1e-3


def test_feature_cache_same_update_and_reused(bn, tmp_path):
    _, folder, manifest = bn
    x, y = data()
    stage = manifest.stage("distill-2")  # prefix and teacher are both cached
    t = task(manifest, folder, "distill-2", 8, 2)
    plain = train_round(OrtStage(folder, manifest, stage.name), stage, t, x, y)
    cache = FeatureCache(tmp_path / "cache")
    backend = OrtStage(folder, manifest, stage.name)
    first = train_round(backend, stage, t, x, y, cache)
    second = train_round(backend, stage, t, x, y, cache)
    assert (cache.misses, cache.hits) == (2, 2)  # prefix + teacher computed once, then reused
    for name in plain.weights:
        np.testing.assert_allclose(first.weights[name], plain.weights[name], atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(second.weights[name], first.weights[name])
    other = {**t.weights, **{n: v * 0.5 for n, v in t.weights.items() if n.startswith("blocks.0")}}
    train_round(backend, stage, TrainTask(**{**t.__dict__, "weights": other}), x, y, cache)
    assert cache.misses == 4, "new prefix weights must not hit the old cache entry"


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


def test_device_object_reuses_stage_and_checks_manifest(bn):
    _, folder, manifest = bn
    x, y = data()
    dev = Device(folder, x, y, budget_mb=1000)
    micro, accum = dev.plan("grow-1")
    t = task(manifest, folder, "grow-1", micro, accum, epochs=1)
    t.manifest_sha256 = dev.manifest_sha256
    dev.train(t)
    backend = dev._backend
    dev.train(t)
    assert dev._backend is backend, "the same stage must not be rebuilt every round"
    t.manifest_sha256 = "0" * 64
    with pytest.raises(ManifestError, match="other artifacts"):
        dev.train(t)
