"""What a device installs is the built wheel: built from this tree, installed with --no-deps into a fresh venv that holds
only numpy, click and onnxruntime-training-cpu (no torch), it trains a stage that the server-side install exported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from progfl.exporter import export_model
from progfl.manifest import DeviceClass
from progfl.models import build_model

ROOT = Path(__file__).resolve().parents[1]
DEVICE_PACKAGES = ("numpy", "click", "onnxruntime-training-cpu")


def _pins() -> list[str]:
    """The device packages at the versions `make` installs (constraints.txt), so the venv matches what was tested."""
    pins = {line.split("==")[0]: line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    return [pins[p] for p in DEVICE_PACKAGES]


# the venv must see only itself: other tests' libraries (Ray) may leave PYTHONPATH in this process's environment
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run(*cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, env=CLEAN_ENV, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr}"
    return r


def test_built_wheel_trains_a_stage_in_a_torch_free_venv(tmp_path):
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", ROOT)
    wheel = next((tmp_path / "dist").glob("progfl-*.whl"))
    base = getattr(sys, "_base_executable", sys.executable)
    _run(base, "-m", "venv", tmp_path / "venv")
    py = tmp_path / "venv" / "bin" / "python"
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run(*pip, *_pins())
    _run(*pip, "--no-deps", wheel)
    leak = subprocess.run([py, "-c", "import torch"], capture_output=True, env=CLEAN_ENV, cwd=tmp_path)
    assert leak.returncode != 0, "torch leaked into the venv"

    art = tmp_path / "art"
    export_model(build_model("cnn", 10, (1, 8, 8), width=4), art, [DeviceClass("any", 4096.0)], kinds=("grow",),
                 batch_size=8, measure=False)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "shard.npz", x=rng.standard_normal((16, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 10, 16))
    r = _run(tmp_path / "venv" / "bin" / "progfl", "device", "train", "--artifacts", art, "--stage", "grow-1",
             "--data", tmp_path / "shard.npz", "--epochs", "1", "--out", tmp_path / "update.npz", cwd=tmp_path)
    metrics = json.loads(r.stdout)
    assert metrics["backend"] == "ort" and metrics["torch_imported"] == 0 and metrics["num_samples"] == 16
    with np.load(tmp_path / "update.npz") as z:
        assert z.files and all(np.isfinite(z[k]).all() for k in z.files)
    # the installed copy, not this source tree, did the work
    where = _run(py, "-c", "import progfl; print(progfl.__file__)", cwd=tmp_path).stdout
    assert str(tmp_path / "venv") in where
