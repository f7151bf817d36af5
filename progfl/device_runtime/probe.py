"""Measure one stage's peak memory and step time in this process, running a real local round with one backend.

`python -m progfl.device_runtime.probe ARTIFACTS STAGE BATCH [--steps N] [--threads T] [--backend B]` prints one
JSON line. The exporter runs it in a fresh subprocess per stage, backend and micro-batch so each peak is the stage's
own (an ORT probe never imports torch); `progfl device profile` runs it on the target board.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..manifest import Manifest, Stage, TrainTask
from .backend import RuntimeOptions, open_stage, resolve_backend
from .memory import PhaseLog, mark
from .shard import Shard
from .trainer import train_round


def synthetic_weights(manifest: Manifest, stage: Stage, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays of the right shapes with sane values (variances positive), for measuring without a trained model."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in stage.needed(manifest):
        if p.name.endswith("running_var"):
            out[p.name] = np.ones(p.shape, np.float32)
        elif p.name.endswith("running_mean"):
            out[p.name] = np.zeros(p.shape, np.float32)
        else:
            out[p.name] = rng.standard_normal(p.shape, np.float32) * np.float32(0.05)  # float32 throughout, as received
    return out


def write_synthetic_shard(path: Path, manifest: Manifest, n: int, seed: int = 0) -> None:
    """A shard of n random samples in the shard format, written a chunk at a time (nothing big stays resident)."""
    rng = np.random.default_rng(seed)
    shape = (n, *manifest.input_shape)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
            for start in range(0, n, 256):
                fh.write(rng.standard_normal((min(256, n - start), *shape[1:])).astype(np.float32).tobytes())
        with zf.open("y.npy", "w") as fh:
            np.lib.format.write_array(fh, rng.integers(0, manifest.num_classes, n).astype(np.int64))


def measure_stage(folder: str, stage: str, batch: int, steps: int = 3,
                  options: RuntimeOptions | None = None, backend: str = "ort") -> dict:
    """One local round of `steps` + 1 steps at this micro-batch, run exactly as a device runs it (engine imported and
    loaded, weights received, shard read from a file, frozen prefix cached on disk), on synthetic data. Its peak, from
    the engine's import to the update read, is the stage's peak at this micro-batch; `phases` says where it went."""
    manifest = Manifest.load(folder)
    s = manifest.stage(stage)
    backend = resolve_backend(backend, manifest)
    with tempfile.TemporaryDirectory(prefix="progfl-probe-") as tmp:
        path = Path(tmp) / "shard.npz"
        write_synthetic_shard(path, manifest, batch * (steps + 1))
        with Shard(path) as shard, PhaseLog() as log:
            shard.validate(manifest.input_shape, manifest.num_classes)
            mark("python, numpy, progfl, shard opened")
            engine = open_stage(backend, folder, manifest, s.name, options)
            task = TrainTask(round=0, stage=s.name, manifest_sha256="", weights=synthetic_weights(manifest, s),
                             lr=0.01, epochs=1, batch_size=batch, micro_batch=batch, accum_steps=1)
            mark("weights received")
            update = train_round(engine, s, task, shard, scratch=tmp)
    m = update.metrics
    return {"stage": s.name, "backend": backend, "batch": batch, "peak_mb": max(p.peak_mb for p in log.phases),
            "baseline_mb": log.phases[0].rss_mb, "step_ms": round(m["step_ms"], 2), "peak_resettable": log.resettable,
            "torch_imported": "torch" in sys.modules, "phases": [asdict(p) for p in log.phases]}


PROFILE_VERSION = 1  # the format of `progfl device profile --out` (read by exporter/profile.py on the server)


def make_profile(manifest: Manifest, backend: str, rows: list[dict], host: dict) -> dict:
    """A board's profile: what was measured (rows of measure_stage), on what (host), for which artifacts."""
    return {"progfl_profile": PROFILE_VERSION, "model": manifest.model, "backend": backend,
            "files_digest": manifest.files_digest(backend), **host, "results": rows}


def run_probe(folder: str | os.PathLike, stage: str, batch: int, steps: int = 2, threads: int = 0,
              backend: str = "ort") -> dict:
    """measure_stage in a fresh interpreter, so the peak (VmHWM) is this stage's alone. PROGFL_PROBE_PYTHON, when set,
    is the command that starts that interpreter: under user-mode emulation (qemu-aarch64 without binfmt_misc, as in
    `make arm-check`) a child cannot exec the guest's python by itself."""
    python = shlex.split(os.environ.get("PROGFL_PROBE_PYTHON", "")) or [sys.executable]
    cmd = [*python, "-m", "progfl.device_runtime.probe", str(folder), stage, str(batch),
           "--steps", str(steps), "--threads", str(threads), "--backend", backend]
    root = str(Path(__file__).parents[2])  # progfl importable from a source checkout too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe failed for stage {stage} at batch {batch}: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m progfl.device_runtime.probe")
    ap.add_argument("artifacts")
    ap.add_argument("stage")
    ap.add_argument("batch", type=int)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-low-memory", action="store_true")
    ap.add_argument("--backend", default="ort")
    a = ap.parse_args(argv)
    opts = RuntimeOptions(threads=a.threads, low_memory=not a.no_low_memory)
    print(json.dumps(measure_stage(a.artifacts, a.stage, a.batch, a.steps, opts, a.backend)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
