"""Measure one stage's peak memory and step time in this (torch-free) process.

`python -m progfl.device_runtime.probe ARTIFACTS STAGE BATCH [--steps N] [--threads T]` prints one JSON
line. The exporter runs it in a fresh subprocess per stage and micro-batch so each peak is the stage's own;
`progfl device profile` runs it on the target board.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..manifest import Manifest, Stage
from .backend import RuntimeOptions
from .memory import PhasePeak, rss_mb
from .ort_backend import OrtStage


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
            out[p.name] = (rng.standard_normal(p.shape) * 0.05).astype(np.float32)
    return out


def synthetic_batch(manifest: Manifest, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((batch, *manifest.input_shape)).astype(np.float32)
    return x, rng.integers(0, manifest.num_classes, batch).astype(np.int64)


def measure_stage(folder: str, stage: str, batch: int, steps: int = 3,
                  options: RuntimeOptions | None = None) -> dict:
    """Load the stage, run the prefix and `steps` training steps at this micro-batch; peak over all of it."""
    manifest = Manifest.load(folder)
    s = manifest.stage(stage)
    rng = np.random.default_rng(0)
    baseline = rss_mb()
    with PhasePeak() as peak:
        backend = OrtStage(folder, manifest, s.name, options)
        backend.set_weights(synthetic_weights(manifest, s))
        times = []
        for i in range(steps + 1):  # the first step warms up (allocations, kernels) and is not timed
            x, y = synthetic_batch(manifest, batch, rng)
            t0 = time.perf_counter()
            feats = backend.features(x)
            inputs = {"features": feats, "inputs": x, "labels": y}
            if "teacher" in s.files:
                inputs["teacher"] = backend.teacher(feats)
            backend.accumulate(inputs)
            backend.step(0.01, 1)
            if i:
                times.append(time.perf_counter() - t0)
    return {"stage": s.name, "batch": batch, "peak_mb": round(peak.peak_mb, 1), "baseline_mb": round(baseline, 1),
            "step_ms": round(1000 * float(np.median(times)), 2), "peak_resettable": peak.resettable,
            "torch_imported": "torch" in sys.modules}


def run_probe(folder: str | os.PathLike, stage: str, batch: int, steps: int = 2, threads: int = 0) -> dict:
    """measure_stage in a fresh interpreter, so the peak (VmHWM) is this stage's alone."""
    cmd = [sys.executable, "-m", "progfl.device_runtime.probe", str(folder), stage, str(batch),
           "--steps", str(steps), "--threads", str(threads)]
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
    a = ap.parse_args(argv)
    opts = RuntimeOptions(threads=a.threads, low_memory=not a.no_low_memory)
    print(json.dumps(measure_stage(a.artifacts, a.stage, a.batch, a.steps, opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
