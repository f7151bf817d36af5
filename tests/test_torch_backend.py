"""The torch backend (TorchScript files, for ARM boards): the same update as the ORT backend for every stage kind, the
same micro-batching, its own measured peaks in the manifest, a board's profile fed back into sizing, and clear errors
when a backend is missing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from progfl.device_runtime.backend import open_stage
from progfl.device_runtime.probe import make_profile, synthetic_weights
from progfl.device_runtime.shard import Shard
from progfl.device_runtime.trainer import train_round
from progfl.exporter import export_model
from progfl.exporter.profile import apply_profile
from progfl.manifest import DeviceClass, Manifest, ManifestError, TrainTask
from progfl.models import build_model

KINDS = ("grow", "distill", "neulite", "full")


def _export(tmp_path_factory, norm: str, kinds=KINDS, **kw):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(f"torch-{norm}") / "a"
    model = build_model("cnn", 10, (1, 12, 12), norm=norm, width=8)
    return folder, export_model(model, folder, [DeviceClass("big", 4096.0)], kinds=kinds, batch_size=16, **kw)


@pytest.fixture(scope="module")
def bn(tmp_path_factory):
    return _export(tmp_path_factory, "batch", measure=False)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """40 samples: with batch 16 and micro-batch 6 the logical batches are 16, 16, 8 and the micro-batches 6, 6, 4 and
    6, 2 (unequal sizes and a changing count, what the loss_scale input exists for)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("shard") / "shard.npz"
    np.savez(path, x=rng.standard_normal((40, 1, 12, 12)).astype(np.float32), y=rng.integers(0, 10, 40))
    with Shard(path) as s:
        s.validate([1, 12, 12], 10)
        yield s


def _round(backend: str, folder, manifest, stage: str, shard, micro: int, lr: float = 0.05):
    s = manifest.stage(stage)
    task = TrainTask(round=1, stage=s.name, manifest_sha256="", weights=synthetic_weights(manifest, s), lr=lr,
                     epochs=2, batch_size=16, micro_batch=micro, accum_steps=-(-16 // micro), seed=3)
    given = TrainTask(**{**task.__dict__, "weights": dict(task.weights)})  # train_round empties the one it is given
    return task, train_round(open_stage(backend, folder, manifest, s.name), s, given, shard)


@pytest.mark.parametrize("stage", ["grow-0", "grow-2", "distill-1", "neulite-1", "neulite-2", "full"])
def test_torch_backend_gives_the_ort_update(bn, shard, stage):
    folder, manifest = bn
    task, ort = _round("ort", folder, manifest, stage, shard, micro=6)
    _, tch = _round("torch", folder, manifest, stage, shard, micro=6)
    assert tch.weights.keys() == ort.weights.keys() == set(manifest.stage(stage).updated_names)
    assert tch.metrics["torch_imported"] == 1 and tch.metrics["steps"] == ort.metrics["steps"] == 6
    assert abs(tch.metrics["loss"] - ort.metrics["loss"]) < 1e-4
    for name, value in ort.weights.items():
        np.testing.assert_allclose(tch.weights[name], value, atol=1e-4, rtol=1e-4, err_msg=name)
        assert not np.array_equal(value, task.weights[name]), f"{name} did not move"


def test_group_norm_parity_and_eval_graphs(tmp_path_factory, shard):
    folder, manifest = _export(tmp_path_factory, "group", kinds=("grow",), measure=False)
    _, ort = _round("ort", folder, manifest, "grow-1", shard, micro=16)
    _, tch = _round("torch", folder, manifest, "grow-1", shard, micro=16)
    for name, value in ort.weights.items():
        np.testing.assert_allclose(tch.weights[name], value, atol=1e-4, rtol=1e-4, err_msg=name)
    s = manifest.stage("grow-1")
    x = shard.read(np.arange(8)).copy()
    engines = [open_stage(b, folder, manifest, s.name) for b in ("ort", "torch")]
    for e in engines:
        e.set_weights(synthetic_weights(manifest, s))
    (fo, ft), (po, pt) = [e.features(x) for e in engines], [e.predict(x) for e in engines]
    np.testing.assert_allclose(ft, fo, atol=1e-5)
    np.testing.assert_allclose(pt, po, atol=1e-5)
    assert engines[0].session_digest("prefix") != engines[1].session_digest("prefix")  # caches never mix backends


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_micro_batches_of_any_split_equal_the_full_batch(tmp_path_factory, shard, backend):
    """GroupNorm (no batch statistics): micro-batches of 6 (6+6+4, then 6+2 for the short last batch) sum to the
    logical batch's gradient, with momentum carried across steps of different micro-batch counts."""
    folder, manifest = _export(tmp_path_factory, "group", kinds=("grow",), measure=False)
    task, full = _round(backend, folder, manifest, "grow-1", shard, micro=16)
    _, micro = _round(backend, folder, manifest, "grow-1", shard, micro=6)
    for name, value in full.weights.items():
        np.testing.assert_allclose(micro.weights[name], value, atol=2e-6, rtol=1e-5, err_msg=name)
        assert not np.allclose(value, task.weights[name], atol=1e-4), f"{name} barely moved"


def test_torch_peaks_are_measured_and_size_torch_classes(tmp_path_factory):
    folder, manifest = _export(tmp_path_factory, "batch", kinds=("full",), measure_batches=[2, 8])
    points = {(m.backend, m.batch): m for m in manifest.stage("full").memory}
    assert set(points) == {("ort", 2), ("ort", 8), ("torch", 2), ("torch", 8)}
    assert points["torch", 8].measured_mb > points["ort", 8].measured_mb + 100  # torch's runtime alone is ~220 MB
    # a class that fits ORT's peak but not torch's takes part only when it trains with ORT
    budget = (points["ort", 8].measured_mb + 20) / (1 - manifest.safety_margin)
    for backend, fits in (("ort", True), ("torch", False)):
        manifest.device_classes = [DeviceClass("b", budget, backend)]
        from progfl.exporter.sizing import fill_sizing

        fill_sizing(manifest)
        assert manifest.stage("full").sizing_for("b").fits is fits


def test_board_profile_sizes_its_class(tmp_path_factory, tmp_path):
    """`device profile --out` on the board, `apply-profile` on the server: the class's sizing follows the board."""
    folder, manifest = _export(tmp_path_factory, "batch", kinds=("full",), measure=False)
    cli = [sys.executable, "-m", "progfl.cli"]
    r = subprocess.run([*cli, "device", "profile", "--artifacts", str(folder), "--backend", "torch",
                        "--batches", "2,8", "--steps", "1", "--out", str(tmp_path / "board.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    profile = json.loads((tmp_path / "board.json").read_text())
    assert profile["backend"] == "torch" and {row["batch"] for row in profile["results"]} == {2, 8}
    r = subprocess.run([*cli, "apply-profile", str(folder), str(tmp_path / "board.json"), "--device-class", "pi",
                        "--memory-mb", "2048"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = Manifest.load(folder)
    pi = m.device_class("pi")
    assert (pi.backend, pi.profile) == ("torch", "pi") and m.stage("full").sizing_for("pi").fits
    board = {row["batch"]: row["peak_mb"] for row in profile["results"]}
    assert {p.batch: p.measured_mb for p in m.stage("full").memory if p.source == "pi"} == board

    # a board that measured much more: the same class no longer takes a full batch
    heavy = make_profile(m, "torch", [{"stage": "full", "batch": b, "peak_mb": 1200.0 + 100 * b} for b in (2, 8)], {})
    apply_profile(m, heavy, "pi")
    z = m.stage("full").sizing_for("pi")
    assert z.fits and z.micro_batch < 16 and z.peak_mb == pytest.approx(1200 + 100 * z.micro_batch, abs=0.1)
    assert [p.measured_mb for p in m.stage("full").memory if p.source == "pi"] == [1400.0, 2000.0]  # replaced

    other = dict(heavy, files_digest="0" * 64)
    with pytest.raises(ManifestError, match="other artifacts"):
        apply_profile(m, other, "pi")
    with pytest.raises(ManifestError, match="give --memory-mb"):
        apply_profile(m, heavy, "jetson")
    (tmp_path / "bad.json").write_text(json.dumps(dict(heavy, results=[{"stage": "full", "batch": 0, "peak_mb": 1}])))
    r = subprocess.run([*cli, "apply-profile", str(folder), str(tmp_path / "bad.json"), "--device-class", "pi"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad result row" in r.stderr


BLOCK = ("import sys\n"
         "class Block:\n"
         "    def find_spec(self, name, path=None, target=None):\n"
         "        if name.split('.')[0] == sys.argv[1]:\n"
         "            raise ImportError(name + ' is not installed')\n"
         "sys.meta_path.insert(0, Block())\n"
         "from progfl.cli import main\n"
         "main(sys.argv[2:])\n")


def test_backend_errors_are_one_line(tmp_path_factory, tmp_path):
    folder, manifest = _export(tmp_path_factory, "batch", kinds=("grow",), measure=False, backends=("ort",))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", x=rng.standard_normal((8, 1, 12, 12)).astype(np.float32), y=rng.integers(0, 10, 8))
    train = ["device", "train", "--artifacts", str(folder), "--stage", "grow-0", "--data", str(tmp_path / "s.npz"),
             "--epochs", "1"]

    def run(blocked: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", BLOCK, blocked, *train, *extra], capture_output=True, text=True)

    r = run("none", "--backend", "torch")
    assert r.returncode == 2 and "no torch files" in r.stderr and "--backends ort,torch" in r.stderr
    r = run("torch", "--backend", "torch")
    assert r.returncode == 2 and "backend torch is not installed on this device: pip install torch" in r.stderr
    r = run("onnxruntime", "--backend", "ort")
    assert r.returncode == 2 and "backend ort is not installed" in r.stderr and "onnxruntime-training-cpu" in r.stderr
    r = run("onnxruntime")  # auto: ORT missing, torch present but not exported
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no training backend installed" in r.stderr
    r = run("none", "--backend", "tensorflow")
    assert r.returncode == 2 and "tensorflow" in r.stderr
    r = run("none")  # auto picks ORT, and never imports torch for it
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["backend"] == "ort" and json.loads(r.stdout)["torch_imported"] == 0


def test_flower_sends_a_device_only_its_backends_files(bn):
    from progfl.device_runtime.flower import stage_files

    folder, manifest = bn
    names = {b: set(stage_files(folder, manifest, "grow-1", b)) for b in ("ort", "torch")}
    assert all("manifest.json" in n for n in names.values())
    assert {p.rsplit("/", 1)[-1] for p in names["torch"]} == {"manifest.json", "torch_train.pt", "torch_prefix.pt",
                                                              "torch_inference.pt"}
    assert not any(p.endswith(".pt") for p in names["ort"]) and any(p.endswith("training_model.onnx") for p in names["ort"])
