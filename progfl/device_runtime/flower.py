"""A Flower ClientApp around the device runtime (numpy, flwr, progfl.manifest, progfl.device_runtime). Training
and evaluation run in a fresh process each (job.py), so this process never loads an engine (ONNX Runtime, torch)
and its memory is the node's transport baseline, reported with its capabilities.

Node config (`flower-supernode --node-config`):
    memory-mb      the device's memory budget (MB = MiB): the SuperNode, this ClientApp and the training share it
    data-path      the device's .npz shard (x float32 N,C,H,W; y int labels; see device_runtime/shard.py)
    eval-data-path optional: a held-out shard of the same format, for federated evaluation
    baseline-mb    optional: what the transport holds (default: measured, memory.transport_mb)
    artifacts-dir  a local cache folder; each export lives in <artifacts-dir>/<manifest sha256>/
    backend        optional: ort, torch, or auto (default: ONNX Runtime training where installed, else torch)
    threads        optional: ONNX Runtime intra-op threads (0: one per core)
    feature-cache  optional: folder for the frozen-prefix feature cache (default <artifacts-dir>/features: later
                   rounds of a stage then skip the prefix, 1.6-1.9x faster rounds measured; "off" disables it)
    device-id      optional: the id the server uses for this device (default: by node id)
In Flower's simulation engine every virtual node has only partition-id/num-partitions: then the run config key
`sim-fleet` names a JSON file mapping partition-id -> the keys above (written by progfl.server.flower_sim).

Messages (see progfl.server.flower for the server side):
    query "capabilities" -> memory, transport baseline, samples, label histogram, held-out samples, progfl version,
             stages held in the cache (asked every round: a node whose free memory changed is sized again)
    train -> arrays (the stage's global arrays), config (the TrainTask scalars), optional files (uint8 arrays
             keyed by relative path) + files-meta (path -> sha256) the first time this node meets a stage;
             reply: arrays (the update), metrics (TrainUpdate.metrics + num-samples, peak memory included)
    evaluate -> arrays (the stage's global arrays), config (stage, manifest_sha256); reply: accuracy, loss and
             num-examples on the node's held-out shard
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .. import __version__
from ..manifest import MANIFEST_NAME, Manifest, ManifestError, TrainTask, TrainUpdate, sha256_file, size_stage, write_atomic
from . import job
from .backend import BACKEND_CHOICES, first_installed
from .job import Job
from .memory import transport_mb
from .shard import read_labels

# ---- records <-> progfl messages (used by both sides) ----
TASK_INTS = ("round", "epochs", "batch_size", "micro_batch", "accum_steps", "seed")


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def task_to_content(task: TrainTask) -> RecordDict:
    cfg: dict[str, Any] = {k: int(getattr(task, k)) for k in TASK_INTS}
    cfg.update(stage=task.stage, manifest_sha256=task.manifest_sha256, lr=float(task.lr))
    if task.budget_mb is not None:
        cfg["budget_mb"] = float(task.budget_mb)
    return RecordDict({"arrays": arrays_to_record(task.weights), "config": ConfigRecord(cfg)})


def content_to_task(content: RecordDict) -> TrainTask:
    c = content["config"]
    return TrainTask(**{k: int(c[k]) for k in TASK_INTS}, stage=str(c["stage"]),
                     manifest_sha256=str(c["manifest_sha256"]), lr=float(c["lr"]),
                     weights=record_to_arrays(content["arrays"]),
                     budget_mb=float(c["budget_mb"]) if "budget_mb" in c else None)


def update_to_content(update: TrainUpdate) -> RecordDict:
    metrics = {k: float(v) for k, v in update.metrics.items() if v is not None}
    metrics["num-examples"] = int(update.num_samples)  # the key Flower's own strategies weigh by
    return RecordDict({"arrays": arrays_to_record(update.weights), "metrics": MetricRecord(metrics),
                       "config": ConfigRecord({"round": int(update.round), "stage": update.stage})})


def content_to_update(content: RecordDict) -> TrainUpdate:
    metrics = {k: float(v) for k, v in content["metrics"].items() if k != "num-examples"}
    return TrainUpdate(round=int(content["config"]["round"]), stage=str(content["config"]["stage"]),
                       weights=record_to_arrays(content["arrays"]), num_samples=int(content["metrics"]["num-examples"]),
                       metrics=metrics)


def stage_files(folder: str | os.PathLike, manifest: Manifest, stage: str, backend: str = "ort") -> dict[str, Path]:
    """Every file a device of `backend` needs for one stage (checkpoint folders expanded), by path relative to the
    export, plus the manifest itself."""
    root = Path(folder)
    out = {MANIFEST_NAME: root / MANIFEST_NAME}
    for ref in manifest.stage(stage).backend_files(backend).values():
        p = root / ref.path
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                out[str(f.relative_to(root))] = f
    return out


def held_key(manifest_sha: str, stage: str) -> str:
    return f"{manifest_sha}:{stage}"


# ---- the device side ----
def _safe_path(root: Path, rel: str) -> Path:
    p = (root / rel).resolve()
    if root.resolve() not in p.parents:
        raise ManifestError(f"artifact path {rel!r} leaves the cache folder")
    return p


def _export_folder(artifacts_dir: Path, manifest_sha: str) -> Path:
    """<artifacts_dir>/<manifest sha256>: the name comes from the server's message, so it must be a sha256 and
    nothing else (a path such as ../x would read or write outside the cache)."""
    if not re.fullmatch(r"[0-9a-f]{64}", manifest_sha):
        raise ManifestError(f"the task's manifest {manifest_sha[:80]!r} is not a sha256 (64 hex digits)")
    return artifacts_dir / manifest_sha


def held_stages(artifacts_dir: Path, backend: str = "ort") -> list[str]:
    """Stages whose `backend` files are present and intact in the cache: '<manifest sha>:<stage>' for each."""
    held = []
    if not artifacts_dir.is_dir():
        return held
    for folder in sorted(p for p in artifacts_dir.iterdir() if p.is_dir()):
        try:
            if sha256_file(folder / MANIFEST_NAME) != folder.name:
                continue
            m = Manifest.load(folder)
        except (ManifestError, OSError):
            continue
        for s in m.stages:
            try:
                m.verify_files(folder, s, backend)
                held.append(held_key(folder.name, s.name))
            except ManifestError:
                pass
    return held


def store_files(artifacts_dir: Path, manifest_sha: str, files: ArrayRecord, meta: ConfigRecord) -> Path:
    """Write a stage's files into <artifacts_dir>/<manifest sha>/, all of them checked first (sha256, path, manifest):
    a refused message writes nothing, not even the folder."""
    folder = _export_folder(artifacts_dir, manifest_sha)
    if set(files) != set(meta):
        raise ManifestError("artifact files and their sha256 list do not match")
    paths = {}
    for rel, arr in files.items():
        if hashlib.sha256(arr.numpy().tobytes()).hexdigest() != meta[rel]:
            raise ManifestError(f"artifact {rel}: received bytes do not match their sha256")
        if rel == MANIFEST_NAME and meta[rel] != manifest_sha:
            raise ManifestError("received manifest is not the one the task names")
        paths[rel] = _safe_path(folder, rel)
    for rel, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != meta[rel]:
            write_atomic(path, files[rel].numpy().tobytes())
    return folder


_reported_baseline: dict[str, float] = {}  # data path -> the baseline this node last reported


class NodeSettings:
    def __init__(self, context: Context, fleet: str | None = None):
        cfg: dict[str, Any] = dict(context.node_config)
        fleet = fleet or context.run_config.get("sim-fleet", "")
        if "memory-mb" not in cfg and fleet and "partition-id" in cfg:  # a virtual node of the simulation engine
            entry = json.loads(Path(str(fleet)).read_text())[str(int(cfg["partition-id"]))]
            cfg = {**cfg, **entry}
        missing = [k for k in ("memory-mb", "data-path", "artifacts-dir") if k not in cfg]
        if missing:
            raise ManifestError(f"node config lacks {', '.join(missing)}")
        self.backend = str(cfg.get("backend", "auto"))
        if self.backend not in BACKEND_CHOICES:
            raise ManifestError(f"node config: unknown backend {self.backend!r} (use {', '.join(BACKEND_CHOICES)})")
        if self.backend == "auto":
            self.backend = first_installed() or "ort"  # before any manifest: the first engine installed
        self.memory_mb = float(cfg["memory-mb"])
        self.data_path = str(cfg["data-path"])
        self.eval_path = str(cfg["eval-data-path"]) if cfg.get("eval-data-path") else None
        self.artifacts_dir = Path(str(cfg["artifacts-dir"]))
        self.threads = int(cfg.get("threads", 0))
        cache = str(cfg.get("feature-cache", self.artifacts_dir / "features"))
        self.feature_cache = None if cache in ("", "off") else cache
        self.device_id = int(cfg["device-id"]) if "device-id" in cfg else None
        self._fixed_baseline = float(cfg["baseline-mb"]) if "baseline-mb" in cfg else None

    def measure_baseline(self) -> float:
        """What the transport holds on the board now: measured, unless the node config says (a virtual node's Ray
        actor is no board's transport: the simulation sets 0). Measured at each capability query; a task is checked
        against the value last reported, the one the server sized it with."""
        value = self._fixed_baseline if self._fixed_baseline is not None else round(transport_mb(), 1)
        _reported_baseline[self.data_path] = value
        return value

    @property
    def baseline_mb(self) -> float:
        if self._fixed_baseline is not None:
            return self._fixed_baseline
        return _reported_baseline.get(self.data_path) or self.measure_baseline()

    @property
    def budget_mb(self) -> float:
        """What a training job may use: the node's memory minus its transport's."""
        return self.memory_mb - self.baseline_mb

    def job(self, folder: Path, data: str) -> Job:
        return Job(kind="", artifacts=str(folder), data=data, backend=self.backend, threads=self.threads,
                   budget_mb=self.budget_mb, cache=self.feature_cache)


def query(msg: Message, context: Context, fleet: str | None = None) -> Message:
    node = NodeSettings(context, fleet)
    y = read_labels(node.data_path)
    asked = msg.content["config"] if "config" in msg.content else {}
    classes = int(asked.get("num-classes", int(y.max()) + 1))
    caps = {"memory-mb": node.memory_mb, "baseline-mb": node.measure_baseline(), "num-samples": int(len(y)),
            "label-hist": [int(c) for c in np.bincount(y, minlength=classes)], "progfl-version": __version__,
            "backend": node.backend, "held": held_stages(node.artifacts_dir, node.backend),
            "eval-samples": len(read_labels(node.eval_path)) if node.eval_path else 0}
    if node.device_id is not None:
        caps["device-id"] = node.device_id
    return Message(RecordDict({"caps": ConfigRecord(caps)}), reply_to=msg)


def _artifacts(node: NodeSettings, manifest_sha: str) -> Path:
    folder = _export_folder(node.artifacts_dir, manifest_sha)
    if not (folder / MANIFEST_NAME).exists():
        raise ManifestError(f"no artifacts for manifest {manifest_sha[:12]} in {node.artifacts_dir}")
    return folder


def train(msg: Message, context: Context, fleet: str | None = None) -> Message:
    """Store the stage's files if sent, check the task against this node's own sizing, train in a fresh process
    (see job.py: its peak is its own), reply with the update. Any failure (a diverged round included: a device
    never sends a non-finite update) raises, and Flower replies with the error, which the server logs."""
    node = NodeSettings(context, fleet)
    task = content_to_task(msg.content)
    if "files" in msg.content:
        store_files(node.artifacts_dir, task.manifest_sha256, msg.content["files"], msg.content["files-meta"])
    folder = _artifacts(node, task.manifest_sha256)
    manifest = Manifest.load(folder)
    z = size_stage(manifest.stage(task.stage), node.budget_mb, manifest.batch_size, manifest.safety_margin,
                   backend=node.backend)  # refuses what this budget cannot hold, whatever the server says
    if not z.fits or task.micro_batch > z.micro_batch:
        raise ManifestError(f"task {task.stage} at micro-batch {task.micro_batch} does not fit this node's "
                            f"{node.budget_mb:g} MB ({node.memory_mb:g} minus {node.baseline_mb:g} of transport)")
    update = job.train(node.job(folder, node.data_path), task)
    return Message(update_to_content(update), reply_to=msg)


def evaluate(msg: Message, context: Context, fleet: str | None = None) -> Message:
    """The global model as a stage sees it, scored on this node's held-out shard (node config eval-data-path)."""
    node = NodeSettings(context, fleet)
    if node.eval_path is None:
        raise ManifestError("this node has no held-out data (node config eval-data-path)")
    c = msg.content["config"]
    folder = _artifacts(node, str(c["manifest_sha256"]))
    result = job.evaluate(node.job(folder, node.eval_path), str(c["stage"]), record_to_arrays(msg.content["arrays"]))
    metrics = {"accuracy": result["accuracy"], "loss": result["loss"], "num-examples": int(result["samples"])}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def make_client_app(fleet: str | None = None) -> ClientApp:
    """The ClientApp; `fleet` (a JSON file partition-id -> node settings) stands in for per-node config on
    Flower's simulation engine when the run config cannot carry it (flwr.simulation.run_simulation)."""
    client = ClientApp()

    @client.query()
    def _query(msg: Message, context: Context) -> Message:
        return query(msg, context, fleet)

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, fleet)

    @client.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, fleet)

    return client


app = make_client_app()
