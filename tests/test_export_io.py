"""The export as a user meets it: manifest integrity, atomic writes, memory measurement, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from progfl.exporter import export_model
from progfl.manifest import DeviceClass, Manifest, ManifestError, predicted_peak_mb, write_atomic
from progfl.models import build_model

CLASSES = [DeviceClass("small", 400.0), DeviceClass("big", 4096.0)]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A tiny CNN exported with real memory measurements (torch-free subprocesses)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("m") / "artifacts"
    manifest = export_model(build_model("cnn", 10, (1, 28, 28), width=4), folder, CLASSES, kinds=("grow", "full"),
                            batch_size=16, measure_batches=[2, 16], backends=("ort",))
    return folder, manifest


def test_memory_measured_and_sized(measured):
    folder, manifest = measured
    for s in manifest.stages:
        points = {m.batch: m for m in s.memory}
        assert set(points) == {2, 16}
        assert all(40 < m.measured_mb < 1000 for m in points.values()), s.memory
        assert points[16].measured_mb >= points[2].measured_mb - 1.0  # more samples, not less memory
        for z in s.sizing:
            assert z.fits and z.micro_batch * z.accum_steps >= manifest.batch_size
            assert predicted_peak_mb(s, z.micro_batch) <= z.budget_mb * (1 - manifest.safety_margin)


def test_probe_is_torch_free(measured):
    folder, manifest = measured
    out = subprocess.run([sys.executable, "-m", "progfl.device_runtime.probe", str(folder), "grow-1", "4"],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["torch_imported"] is False
    assert report["peak_mb"] >= report["baseline_mb"] > 0


def test_manifest_validates_and_detects_corruption(measured, tmp_path):
    folder, manifest = measured
    Manifest.load(folder).verify_files(folder)
    # a truncated artifact fails its sha256
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)
    training = copy / manifest.stages[0].files["training"].path
    training.write_bytes(training.read_bytes()[:100])
    with pytest.raises(ManifestError, match="sha256"):
        Manifest.load(copy).verify_files(copy)
    # schema problems are one clear error
    d = json.loads((folder / "manifest.json").read_text())
    for broken in ({**d, "schema_version": 99}, {k: v for k, v in d.items() if k != "stages"}):
        (copy / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ManifestError):
            Manifest.load(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(copy)
    d["stages"][0]["params"][0]["shape"] = [1, 2, 3]
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="not in the global model"):
        Manifest.load(copy)


def test_write_atomic_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_text("old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import progfl.exporter.export as ex

    def fail(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(ex, "fill_sizing", fail)
    with pytest.raises(RuntimeError):
        export_model(build_model("cnn", 10, (1, 28, 28), width=4), tmp_path / "out", CLASSES, kinds=("grow",),
                     batch_size=8, measure=False, backends=("ort",))
    assert list(tmp_path.iterdir()) == []


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "progfl.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet99"], "unknown model 'resnet99'"),
    (["--input-shape", "28,28"], "--input-shape (C,H,W) must be 3 comma-separated positive integers, got '28,28'"),
    (["--input-shape", "3,32"], "--input-shape (C,H,W) must be 3"),
    (["--input-shape", "1,0,28"], "must be 3 comma-separated positive integers, got '1,0,28'"),
    (["--input-shape", "3,x,32"], "--input-shape"),
    (["--opset", "16"], "opset 16"),
    (["--opset", "22"], "opset 22"),
    (["--stages", "grow,shrink"], "unknown stage kind"),
])
def test_cli_rejects_bad_input(tmp_path, args, message):
    out = tmp_path / "out"
    r = cli("export", "--model", "cnn", "--input-shape", "1,28,28", "--width", "4", "--no-measure", "--out", str(out), *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 or "Usage" in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_budget_below_smallest_stage(tmp_path):
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps([{"name": "watch", "memory_mb": 30}]))
    r = cli("export", "--model", "cnn", "--input-shape", "1,28,28", "--width", "4", "--stages", "grow", "--batch", "8",
            "--measure-batches", "1,8", "--backends", "ort", "--devices", str(devices), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "device class watch (30 MB, ort) is below the smallest stage" in r.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["devices.json"]


def test_cli_output_folder_problems(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    r = cli("export", "--model", "cnn", "--out", str(full))
    assert r.returncode == 2 and "not empty" in r.stderr
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = cli("export", "--model", "cnn", "--out", str(blocker / "out"))
    assert r.returncode == 2 and "parent folder does not exist" in r.stderr
    # /proc takes no new folders, even for root (who passes every permission check)
    r = cli("export", "--model", "cnn", "--out", "/proc/progfl-out")
    assert r.returncode == 2 and "not writable" in r.stderr and "Traceback" not in r.stderr


def test_cli_explain_and_help(measured):
    folder, manifest = measured
    r = cli("explain", str(folder))
    assert r.returncode == 0
    for s in manifest.stages:
        assert s.name in r.stdout
    assert "small" in r.stdout and "big" in r.stdout
    for cmd in (["--help"], ["export", "--help"], ["explain", "--help"]):
        assert cli(*cmd).returncode == 0


def test_initial_weights_match_model(tmp_path):
    torch.manual_seed(3)
    model = build_model("cnn", 10, (1, 28, 28), width=4)
    manifest = export_model(model, tmp_path / "a", CLASSES, kinds=("grow",), batch_size=8, measure=False,
                            backends=("ort",))
    arrays = manifest.initial_weights(tmp_path / "a")
    for name, t in model.state_dict().items():
        if name in arrays:
            assert np.array_equal(arrays[name], t.numpy())
    assert len(arrays) == len(manifest.global_params)
