"""A Flower ClientApp around the device runtime (numpy, flwr, progfl.manifest, progfl.device_runtime; torch only
when the node trains with the torch backend).

Node config (`flower-supernode --node-config`):
    memory-mb      the device's memory budget (MB)
    data-path      the device's .npz shard (x float32 N,C,H,W; y int labels; see device_runtime/shard.py)
    artifacts-dir  a local cache folder; each export lives in <artifacts-dir>/<manifest sha256>/
    backend        optional: ort, torch, or auto (default: ONNX Runtime training where installed, else torch)
    threads        optional: ONNX Runtime intra-op threads (0: one per core)
    feature-cache  optional: folder for the frozen-prefix feature cache
    device-id      optional: the id the server uses for this device (default: by node id)
In Flower's simulation engine every virtual node has only partition-id/num-partitions: then the run config key
`sim-fleet` names a JSON file mapping partition-id -> the keys above (written by progfl.server.flower_sim).

Messages (see progfl.server.flower for the server side):
    query "capabilities" -> budget, samples, label histogram, progfl version, stages held in the cache
    train -> arrays (the stage's global arrays), config (the TrainTask scalars), optional files (uint8 arrays
             keyed by relative path) + files-meta (path -> sha256) the first time this node meets a stage;
             reply: arrays (the update), metrics (TrainUpdate.metrics + num-samples, peak memory included)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .. import __version__
from ..manifest import MANIFEST_NAME, Manifest, ManifestError, TrainTask, TrainUpdate, sha256_file, write_atomic
from .backend import BACKEND_CHOICES, RuntimeOptions, first_installed
from .device import Device
from .shard import Shard

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
    """Write a stage's files into <artifacts_dir>/<manifest sha>/, each checked against its sha256 first."""
    folder = artifacts_dir / manifest_sha
    folder.mkdir(parents=True, exist_ok=True)
    if set(files) != set(meta):
        raise ManifestError("artifact files and their sha256 list do not match")
    for rel, arr in files.items():
        data = arr.numpy().tobytes()
        if hashlib.sha256(data).hexdigest() != meta[rel]:
            raise ManifestError(f"artifact {rel}: received bytes do not match their sha256")
        if rel == MANIFEST_NAME and meta[rel] != manifest_sha:
            raise ManifestError("received manifest is not the one the task names")
        path = _safe_path(folder, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != meta[rel]:
            write_atomic(path, data)
    return folder


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
        self.budget_mb = float(cfg["memory-mb"])
        self.data_path = str(cfg["data-path"])
        self.artifacts_dir = Path(str(cfg["artifacts-dir"]))
        self.threads = int(cfg.get("threads", 0))
        self.feature_cache = str(cfg["feature-cache"]) if cfg.get("feature-cache") else None
        self.device_id = int(cfg["device-id"]) if "device-id" in cfg else None
        self.key = (self.data_path, str(self.artifacts_dir), self.budget_mb, self.threads, self.feature_cache,
                    self.backend)


# One Device per (node settings, export) per process: the simulation engine's actors serve many virtual nodes,
# a SuperNode's ClientApp process serves one. Only the last one used is kept (one stage resident at a time).
_devices: dict[tuple, Device] = {}
_shards: dict[str, Shard] = {}  # the open shard of the node served last (read a micro-batch at a time)


def _shard(node: NodeSettings) -> Shard:
    if node.data_path not in _shards:
        for old in _shards.values():
            old.close()
        _shards.clear()
        _devices.clear()
        _shards[node.data_path] = Shard(node.data_path, scratch=node.feature_cache)
    return _shards[node.data_path]


def _device(node: NodeSettings, folder: Path) -> Device:
    key = (*node.key, str(folder))
    shard = _shard(node)
    if key not in _devices:
        _devices.clear()
        _devices[key] = Device(folder, shard, node.budget_mb, RuntimeOptions(threads=node.threads), node.feature_cache,
                               node.backend)
    return _devices[key]


def query(msg: Message, context: Context, fleet: str | None = None) -> Message:
    node = NodeSettings(context, fleet)
    y = _shard(node).y
    asked = msg.content["config"] if "config" in msg.content else {}
    classes = int(asked.get("num-classes", int(y.max()) + 1))
    caps = {"memory-mb": node.budget_mb, "num-samples": int(len(y)),
            "label-hist": [int(c) for c in np.bincount(y, minlength=classes)], "progfl-version": __version__,
            "backend": node.backend, "held": held_stages(node.artifacts_dir, node.backend)}
    if node.device_id is not None:
        caps["device-id"] = node.device_id
    return Message(RecordDict({"caps": ConfigRecord(caps)}), reply_to=msg)


def train(msg: Message, context: Context, fleet: str | None = None) -> Message:
    node = NodeSettings(context, fleet)
    task = content_to_task(msg.content)
    if "files" in msg.content:
        store_files(node.artifacts_dir, task.manifest_sha256, msg.content["files"], msg.content["files-meta"])
    folder = node.artifacts_dir / task.manifest_sha256
    if not (folder / MANIFEST_NAME).exists():
        raise ManifestError(f"no artifacts for manifest {task.manifest_sha256[:12]} in {node.artifacts_dir}")
    device = _device(node, folder)
    micro, _ = device.plan(task.stage)  # refuses a stage this budget cannot hold, whatever the server says
    if task.micro_batch > micro:
        raise ManifestError(f"task micro-batch {task.micro_batch} exceeds what {node.budget_mb:g} MB holds ({micro})")
    update = device.train(task)
    return Message(update_to_content(update), reply_to=msg)


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

    return client


app = make_client_app()
