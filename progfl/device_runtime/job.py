"""One device job (a round's training, or an evaluation) in a fresh process.

Why: on a board the device's transport (a Flower SuperNode and its ClientApp: flwr, grpc, protobuf) shares the
memory with the training. Run in the ClientApp's own process, the training's measured peak would include all of
it, and a sizing by the training's peaks alone would overrun the board. So the node reports what its transport
holds (its baseline) once, the server sizes with budget minus baseline, and each job runs here: a new Python that
imports numpy, the manifest and the device runtime only (never flwr; torch only for the torch backend), so its
peak is its own.

Protocol: the parent writes <folder>/job.json and <folder>/weights.npz, runs
`python -m progfl.device_runtime.job <folder>`, and reads <folder>/result.json (+ update.npz after training).
A job that fails writes <folder>/error.txt (one line) and exits 2. On Linux the child dies with its parent.
"""

from __future__ import annotations

import ctypes
import io
import json
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..manifest import ManifestError, TrainTask, TrainUpdate, write_atomic
from .shard import open_npz


class JobError(ManifestError):
    """A device job that failed or died: its one-line reason."""


@dataclass
class Job:
    """Where a device keeps its things, and what to run."""

    kind: str  # "train" | "evaluate"
    artifacts: str
    data: str  # the shard: training data, or the held-out shard for evaluate
    backend: str = "auto"
    threads: int = 0
    budget_mb: float | None = None
    cache: str | None = None  # frozen-prefix feature cache folder
    stage: str = ""
    task: dict[str, Any] | None = None  # TrainTask without its weights (train only)


def run_job(job: Job, weights: dict[str, np.ndarray], timeout: float | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Run a job in a fresh process: (result, updated arrays); JobError with the child's reason if it failed."""
    if job.cache:  # the job's files go beside the device's cache: on a board /tmp may be RAM
        Path(job.cache).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="progfl-job-", dir=job.cache) as tmp:
        folder = Path(tmp)
        write_atomic(folder / "job.json", json.dumps(asdict(job)).encode())
        write_atomic(folder / "weights.npz", lambda fh: np.savez(fh, **weights))
        try:
            proc = subprocess.run([sys.executable, "-m", "progfl.device_runtime.job", str(folder)], timeout=timeout,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, preexec_fn=_die_with_parent)
        except subprocess.TimeoutExpired:
            raise JobError(f"device job {job.kind} timed out after {timeout:g} s") from None
        if (folder / "error.txt").exists():
            raise JobError((folder / "error.txt").read_text().strip())
        if proc.returncode != 0 or not (folder / "result.json").exists():
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            tail = (proc.stderr.strip().splitlines() or [""])[-1]
            raise JobError(f"device job {job.kind} died ({how}){': ' + tail if tail else ''}")
        result = json.loads((folder / "result.json").read_text())
        arrays = open_npz(folder / "update.npz") if (folder / "update.npz").exists() else {}
        return result, arrays


def train(job: Job, task: TrainTask, timeout: float | None = None) -> TrainUpdate:
    """A round's training in a fresh process."""
    scalars = {k: v for k, v in asdict(task).items() if k != "weights"}
    result, arrays = run_job(Job(**{**asdict(job), "kind": "train", "stage": task.stage, "task": scalars}),
                             task.weights, timeout)
    return TrainUpdate(round=int(result["round"]), stage=str(result["stage"]), weights=arrays,
                       num_samples=int(result["num_samples"]), metrics={k: float(v) for k, v in result["metrics"].items()})


def evaluate(job: Job, stage: str, weights: dict[str, np.ndarray], timeout: float | None = None) -> dict[str, float]:
    """Accuracy, loss and sample count of a stage's model with these weights on the job's (held-out) shard."""
    result, _ = run_job(Job(**{**asdict(job), "kind": "evaluate", "stage": stage}), weights, timeout)
    return {k: float(v) for k, v in result.items()}


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG), so a killed ClientApp
    leaves no training behind; Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _child(folder: Path) -> None:
    from .backend import RuntimeOptions
    from .device import Device
    from .shard import Shard
    from .trainer import evaluate_shard

    job = Job(**json.loads((folder / "job.json").read_text()))
    weights = open_npz(folder / "weights.npz")
    with Shard(job.data, scratch=job.cache) as shard:
        device = Device(job.artifacts, shard, job.budget_mb, RuntimeOptions(threads=job.threads), job.cache,
                        job.backend)
        if job.kind == "train":
            update = device.train(TrainTask(**job.task, weights=weights))
            buf = io.BytesIO()
            np.savez(buf, **update.weights)
            write_atomic(folder / "update.npz", buf.getvalue())
            result = {"round": update.round, "stage": update.stage, "num_samples": update.num_samples,
                      "metrics": update.metrics}
        elif job.kind == "evaluate":
            result = evaluate_shard(device.backend(job.stage), shard, weights)
        else:
            raise JobError(f"unknown job kind {job.kind!r}")
    write_atomic(folder / "result.json", json.dumps(result, allow_nan=False).encode())


def main(argv: list[str]) -> int:
    folder = Path(argv[1])
    try:
        _child(folder)
    except (ManifestError, OSError, ValueError) as e:
        write_atomic(folder / "error.txt", f"{type(e).__name__}: {e}".splitlines()[0].encode())
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
