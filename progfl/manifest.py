"""The contract between exporter, server and device: what a stage is made of, on disk and in messages.

Pure standard library + numpy so the device runtime can import it without torch. Every record is a
dataclass that round-trips through JSON; `Manifest.load` validates the schema before anyone trusts it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

SCHEMA_VERSION = 4  # 2: backends (torch files, per-backend memory points, device classes' backend and profile) and
# the training graphs' loss_scale input (version-1 graphs lack it: export again). 3: no weight decay in the training
# graphs, no eval graph, and no optimizer graph for SGD (the runtime steps SGD itself). 4: width stages (sub-models
# of the global model, their arrays slices of the global ones: Stage.slices) and depth stages (DepthFL's depth-k
# sub-models, loss "depthfl")
MANIFEST_NAME = "manifest.json"
# What a device trains with: ONNX Runtime training; PyTorch (boards without ORT); ExecuTorch (EXPERIMENTAL: 1.5.1,
# the stages it trains correctly only). A stage's files of backend b other than ORT have kinds "b.<kind>"
# (torch.training, torch.prefix, executorch.training, ...).
BACKENDS = ("ort", "torch", "executorch")
EXECUTORCH_PIN = "1.5.1"  # the ExecuTorch version its programs and refusals were checked against
STAGE_KINDS = ("grow", "distill", "neulite", "full", "width", "depth")
LOSSES = ("ce", "neulite", "mse", "depthfl")


class ManifestError(ValueError):
    """A manifest, an artifact or a message that does not satisfy the contract."""


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory's files (sorted by relative path) for a checkpoint folder."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers never see half a file.
    `data` is the bytes, or a function that writes them to the open file (streams large arrays and PNGs
    without a second copy in memory)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600: manifests, shards and reports are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, missing: str) -> Any:
    """A JSON file that crossed a boundary (a manifest, a board's profile): missing or malformed is one clear error."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None


@dataclass
class FileRef:
    """A file (or checkpoint folder) of a stage, relative to the manifest's folder."""

    path: str
    sha256: str
    size: int


@dataclass
class TensorSpec:
    """A graph input or output. A dimension of -1 is the batch (any size)."""

    name: str
    shape: list[int]
    dtype: str = "float32"


@dataclass
class ParamSpec:
    """A named array of the global model; `trainable` False means a frozen weight or a BatchNorm statistic."""

    name: str
    shape: list[int]
    trainable: bool = True


@dataclass
class MemoryPoint:
    """Peak memory of one stage at one micro-batch size and backend: measured (VmHWM of a process running only that
    backend) and estimated. source: "export" for the exporter's own machine, else the profile a board measured it in
    (see `progfl device profile` and exporter/profile.py)."""

    batch: int
    measured_mb: float | None
    estimate_mb: float
    breakdown: dict[str, float] = field(default_factory=dict)
    backend: str = "ort"
    source: str = "export"
    phases: list[dict[str, Any]] = field(default_factory=list)  # measured: {name, rss_mb, peak_mb} per phase of a round


@dataclass
class Sizing:
    """How a device class runs a stage: micro-batch x accum_steps = the logical batch, or it cannot take part."""

    device_class: str
    budget_mb: float
    micro_batch: int
    accum_steps: int
    peak_mb: float | None
    fits: bool


@dataclass
class DeviceClass:
    """A kind of device: its memory budget, the backend it trains with, and (once a board of it was profiled) the
    profile whose measured peaks size it instead of the exporter's."""

    name: str
    memory_mb: float
    backend: str = "ort"
    profile: str | None = None


@dataclass
class Stage:
    """One compiled stage: the frozen prefix (inference), the trainable part (ORT training artifacts).

    A width stage (kind "width", `block` = d) is the whole model at 1/d of every hidden layer's width (HeteroFL's
    sub-model; input channels and classes kept). Its arrays are slices of the global arrays with the same names:
    `slices[name]` lists the axes that are cut, and along each such axis the sub-model holds k of the global n
    channels, `channel_window(n, k, offset)`: the first k (offset 0, HeteroFL) or a window rolled by `offset`
    (FedRolex). The other axes are kept whole. Every other stage's arrays are the global arrays themselves."""

    index: int
    name: str
    kind: str
    block: int
    loss: str
    loss_config: dict[str, float]
    optimizer: dict[str, Any]
    inputs: list[TensorSpec]  # user inputs of the training graph, in order
    feature: TensorSpec  # what the prefix hands to the trainable part
    params: list[ParamSpec]  # in the training graph's buffer order (what copy_buffer_to_parameters expects)
    session_params: dict[str, list[str]]  # inference file (prefix, inference, teacher) -> global arrays it reads
    bn_updates: dict[str, str]  # training-graph output name -> BatchNorm statistic it updates
    bn_variance: dict[str, list[float]]  # running_var name -> [elements per channel per sample, torch momentum]
    files: dict[str, FileRef]  # prefix, training, optimizer (AdamW only), checkpoint, inference, teacher
    footprint: dict[str, Any]  # element counts and intermediate-tensor peaks (MB by batch) behind the analytic
    # memory estimate (see exporter/sizing.py)
    memory: list[MemoryPoint] = field(default_factory=list)
    sizing: list[Sizing] = field(default_factory=list)
    slices: dict[str, list[int]] = field(default_factory=dict)  # width stages: array -> the axes cut from the global

    def has_backend(self, backend: str) -> bool:
        return backend == "ort" or any(k.startswith(backend + ".") for k in self.files)

    def backend_files(self, backend: str) -> dict[str, FileRef]:
        """The files of `backend` by ORT's kind names (prefix, training, ...): the torch backend's train graph is
        `training`. The executorch backend's own file is its training program; it runs the rest from torch's."""
        if backend not in BACKENDS:
            raise ManifestError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
        if backend == "ort":
            return {k: f for k, f in self.files.items() if "." not in k}
        if not self.has_backend(backend):
            why = " (ExecuTorch cannot train this stage: see the manifest's notes)" if backend == "executorch" else ""
            raise ManifestError(f"stage {self.name} has no {backend} files{why}: export with --backends ort,torch"
                                + (",executorch" if backend == "executorch" else ""))
        own = {k[len(backend) + 1:]: f for k, f in self.files.items() if k.startswith(backend + ".")}
        return {**self.backend_files("torch"), **own} if backend == "executorch" else own

    @property
    def min_micro_batch(self) -> int:
        """The smallest micro-batch this stage trains with: 2 when it trains a BatchNorm, else 1. BatchNorm normalises
        each micro-batch by its own statistics (as torch does when a batch is split); with one sample those are one
        image's, and training drifts from the big batch's (the demo's ExclusiveFL device, trained at micro-batch 1,
        ended far below the same device at 2: README, "Micro-batches down to 1"). A BatchNorm after global pooling
        would even see a single value per channel and pass no gradient."""
        return 2 if self.bn_variance else 1

    @property
    def trainable_names(self) -> list[str]:
        return [p.name for p in self.params if p.trainable]

    @property
    def updated_names(self) -> list[str]:
        """Arrays a device sends back: what it trained plus the BatchNorm statistics it refreshed."""
        return [p.name for p in self.params if p.trainable or p.name in self.bn_updates.values()]

    def needed(self, manifest: Manifest) -> list[ParamSpec]:
        """Every global array a device needs for this stage, at the shape this stage holds it (a width stage's are
        slices): the trainable part's and the inference files'."""
        names = {p.name for p in self.params}.union(*self.session_params.values())
        own = {p.name: p for p in self.params}
        return [own.get(p.name, p) for p in manifest.global_params if p.name in names]

    def slice_index(self, name: str, global_shape: list[int] | tuple[int, ...], offset: int = 0) -> tuple[np.ndarray, ...]:
        """Where this stage's array `name` sits in the global one, one index array per axis (for np.ix_): the axes in
        `slices` hold channel_window(n, k, offset), the others everything."""
        own = next(p.shape for p in self.params if p.name == name)
        cut = self.slices.get(name, [])
        return tuple(channel_window(n, k, offset) if axis in cut else np.arange(n)
                     for axis, (n, k) in enumerate(zip(global_shape, own)))

    def take(self, arrays: dict[str, np.ndarray], manifest: Manifest, offset: int = 0) -> dict[str, np.ndarray]:
        """The arrays a device of this stage receives, cut from the global `arrays` (copies where sliced)."""
        out = {}
        for p in self.needed(manifest):
            a = arrays[p.name]
            out[p.name] = a[np.ix_(*self.slice_index(p.name, a.shape, offset))] if self.slices.get(p.name) else a
        return out

    def sizing_for(self, device_class: str) -> Sizing:
        for s in self.sizing:
            if s.device_class == device_class:
                return s
        raise ManifestError(f"stage {self.name}: no sizing for device class {device_class!r}")


@dataclass
class Manifest:
    model: str
    model_config: dict[str, Any]
    input_shape: list[int]
    num_classes: int
    opset: int
    batch_size: int
    safety_margin: float
    stages: list[Stage]
    device_classes: list[DeviceClass]
    global_params: list[ParamSpec]  # every array of the global model, for the server
    initial: FileRef | None = None  # initial global arrays (.npz), so the server needs no torch
    schema_version: int = SCHEMA_VERSION
    producer: str = "progfl"
    notes: list[str] = field(default_factory=list)  # decisions of the export and why (e.g. the output module)

    def stage(self, key: int | str) -> Stage:
        """A stage by index or by name ('grow-2', 'full')."""
        for s in self.stages:
            if s.index == key or s.name == key or str(s.index) == str(key):
                return s
        names = ", ".join(f"{s.index}:{s.name}" for s in self.stages)
        raise ManifestError(f"no stage {key!r} in manifest (stages: {names})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False)

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / MANIFEST_NAME
        write_atomic(path, self.to_json().encode())
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        try:
            version = d["schema_version"]
            if version != SCHEMA_VERSION:
                raise ManifestError(f"manifest schema version {version}, this progfl reads {SCHEMA_VERSION}: "
                                    "export the model again with this progfl")
            stages = [
                Stage(
                    **{
                        **s,
                        "inputs": [TensorSpec(**t) for t in s["inputs"]],
                        "feature": TensorSpec(**s["feature"]),
                        "params": [ParamSpec(**p) for p in s["params"]],
                        "files": {k: FileRef(**f) for k, f in s["files"].items()},
                        "memory": [MemoryPoint(**m) for m in s["memory"]],
                        "sizing": [Sizing(**z) for z in s["sizing"]],
                    }
                )
                for s in d["stages"]
            ]
            m = cls(
                **{
                    **d,
                    "stages": stages,
                    "device_classes": [DeviceClass(**c) for c in d["device_classes"]],
                    "global_params": [ParamSpec(**p) for p in d["global_params"]],
                    "initial": FileRef(**d["initial"]) if d.get("initial") else None,
                }
            )
        except (KeyError, TypeError) as e:
            raise ManifestError(f"manifest does not follow schema {SCHEMA_VERSION}: {e}") from None
        m.validate()
        return m

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Manifest:
        path = Path(folder)
        if path.is_dir():
            path = path / MANIFEST_NAME
        d = read_json(path, "no manifest (run `progfl export` first)")
        if not isinstance(d, dict):
            raise ManifestError(f"{path}: not a manifest object")
        return cls.from_dict(d)

    def validate(self) -> None:
        """Internal consistency: names unique, stage params known to the global model with the same shapes."""
        shapes = {p.name: p.shape for p in self.global_params}
        if len(shapes) != len(self.global_params):
            raise ManifestError("manifest: duplicate global parameter names")
        if [s.index for s in self.stages] != list(range(len(self.stages))):
            raise ManifestError("manifest: stage indices must be 0..n-1 in order")
        for s in self.stages:
            if s.kind not in STAGE_KINDS or s.loss not in LOSSES:
                raise ManifestError(f"stage {s.name}: unknown kind {s.kind!r} or loss {s.loss!r}")
            for p in s.params:
                whole = shapes.get(p.name)
                cut = s.slices.get(p.name, [])
                if whole is None or len(whole) != len(p.shape) or any(
                        (k > n or k < 1) if axis in cut else k != n for axis, (n, k) in enumerate(zip(whole, p.shape))):
                    raise ManifestError(f"stage {s.name}: {p.name} {p.shape} not in the global model as such")
            if s.slices and s.kind != "width":
                raise ManifestError(f"stage {s.name}: only width stages hold slices of the global arrays")
            for kind, names in s.session_params.items():
                if kind not in s.files or not set(names) <= shapes.keys():
                    raise ManifestError(f"stage {s.name}: {kind} reads arrays the global model does not have")
            if not set(s.bn_updates.values()) <= {p.name for p in s.params}:
                raise ManifestError(f"stage {s.name}: BatchNorm update of an unknown parameter")
            optimizer_graph = ("optimizer",) if s.optimizer["name"] == "adamw" else ()  # SGD is stepped by the runtime
            for need in ("training", "checkpoint", "inference", *optimizer_graph):
                if need not in s.files:
                    raise ManifestError(f"stage {s.name}: no {need} file")
            for m in s.memory:
                if m.backend not in BACKENDS:
                    raise ManifestError(f"stage {s.name}: memory point of unknown backend {m.backend!r}")
        for c in self.device_classes:
            if c.backend not in self.backends:
                raise ManifestError(f"device class {c.name}: backend {c.backend!r} was not exported "
                                    f"(this export has {', '.join(self.backends)})")

    @property
    def backends(self) -> list[str]:
        """The backends exported: ORT always (the server evaluates with it), torch for every stage, executorch for the
        stages it can train."""
        return [b for b in BACKENDS if any(s.has_backend(b) for s in self.stages)]

    def files_digest(self, backend: str) -> str:
        """Identity of the files a `backend` device trains from (not of manifest.json, which sizing edits rewrite):
        a board's profile names it, so its peaks are applied only to the artifacts it measured."""
        h = hashlib.sha256()
        for s in self.stages:
            if not s.has_backend(backend):  # executorch: the stages it cannot train have no files
                continue
            for kind, ref in sorted(s.backend_files(backend).items()):
                h.update(f"{s.name}/{kind}/{ref.sha256}".encode())
        return h.hexdigest()

    def device_class(self, name: str) -> DeviceClass:
        for c in self.device_classes:
            if c.name == name:
                return c
        raise ManifestError(f"no device class {name!r} (classes: {', '.join(c.name for c in self.device_classes)})")

    def initial_weights(self, folder: str | os.PathLike) -> dict[str, np.ndarray]:
        if self.initial is None:
            raise ManifestError("manifest has no initial weights")
        path = Path(folder) / self.initial.path
        if not path.exists() or sha256_file(path) != self.initial.sha256:
            raise ManifestError(f"{path}: initial weights missing or do not match their sha256")
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        check_arrays(arrays, self.global_params, f"{path}")
        return arrays

    def verify_files(self, folder: str | os.PathLike, stage: Stage | None = None, backend: str | None = None) -> None:
        """Check every file's sha256 (of one stage, or all; of one backend, or all): a corrupt or truncated artifact
        fails here."""
        root = Path(folder)
        for s in [stage] if stage else [s for s in self.stages if backend is None or s.has_backend(backend)]:
            for kind, ref in (s.backend_files(backend) if backend else s.files).items():
                p = root / ref.path
                if not p.exists():
                    raise ManifestError(f"stage {s.name}: {kind} file {p} is missing")
                if sha256_file(p) != ref.sha256:
                    raise ManifestError(f"stage {s.name}: {kind} file {p} does not match its sha256 (corrupt or changed)")


# ---- messages between server and device, transport-agnostic ----


@dataclass
class TrainTask:
    """What the server sends a device for one round."""

    round: int
    stage: str
    manifest_sha256: str
    weights: dict[str, np.ndarray]  # prefix + trainable-part arrays of this stage
    lr: float
    epochs: int
    batch_size: int
    micro_batch: int
    accum_steps: int
    seed: int = 0
    budget_mb: float | None = None


@dataclass
class TrainUpdate:
    """What a device sends back: the arrays it trained (and BN statistics), how many samples, metrics."""

    round: int
    stage: str
    weights: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float]


def check_arrays(arrays: dict[str, np.ndarray], specs: list[ParamSpec], what: str) -> None:
    """Names, shapes and finiteness of arrays against their specs: one clear error for the first mismatch."""
    for p in specs:
        if p.name not in arrays:
            raise ManifestError(f"{what}: missing array {p.name}")
        a = arrays[p.name]
        if list(a.shape) != list(p.shape):
            raise ManifestError(f"{what}: {p.name} has shape {list(a.shape)}, expected {p.shape}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ManifestError(f"{what}: {p.name} contains NaN or Inf")


def channel_window(n: int, k: int, offset: int = 0) -> np.ndarray:
    """k of a layer's n channels: the first k at offset 0 (HeteroFL's static slice), else the k from `offset` on,
    wrapping around (FedRolex's rolling window: offset = the round)."""
    if not 0 < k <= n:
        raise ManifestError(f"a slice of {k} channels out of {n}")
    return (offset + np.arange(k)) % n


def file_ref(root: Path, path: Path) -> FileRef:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return FileRef(path=str(path.relative_to(root)), sha256=sha256_file(path), size=size)




def predicted_peak_mb(stage: Stage, micro_batch: int, backend: str = "ort", source: str = "export") -> float:
    """Peak memory at a micro-batch size for a backend, from the points measured on `source` (the exporter's machine
    or a profiled board): the measured point if there is one, else a line through the measured points (peak is affine
    in batch: fixed weights/optimizer/runtime + per-sample activations), else the exporter's estimate."""
    own = [m for m in stage.memory if m.backend == backend]
    if not own:
        raise ManifestError(f"stage {stage.name}: no memory table for backend {backend!r}")
    pts = {m.batch: m.measured_mb for m in own if m.measured_mb is not None and m.source == source}
    if micro_batch in pts:
        return pts[micro_batch]
    if len(pts) >= 2:
        b = np.array(sorted(pts), float)
        slope, icpt = np.polyfit(b, [pts[int(x)] for x in b], 1)
        return float(icpt + max(slope, 0.0) * micro_batch)
    est = {m.batch: m.estimate_mb for m in own if m.source == "export"}
    if not est:
        raise ManifestError(f"stage {stage.name}: no {backend} measurements from {source!r} and no estimate")
    b = np.array(sorted(est), float)
    if len(b) == 1:
        return est[int(b[0])] * max(1.0, micro_batch / b[0])
    slope, icpt = np.polyfit(b, [est[int(x)] for x in b], 1)
    return float(icpt + max(slope, 0.0) * micro_batch)


def size_stage(stage: Stage, budget_mb: float, batch: int, margin: float, device_class: str = "",
               backend: str = "ort", source: str = "export") -> Sizing:
    """The largest micro-batch (batch, batch/2, ..., down to the stage's min_micro_batch) whose peak stays under
    budget x (1 - margin); the logical batch is kept by accumulating ceil(batch / micro) micro-batches. fits=False:
    cannot take part."""
    if not stage.has_backend(backend):  # ExecuTorch refused this stage at export
        return Sizing(device_class, budget_mb, 0, 0, None, False)
    limit = budget_mb * (1.0 - margin)
    micro, smallest = batch, min(batch, stage.min_micro_batch)
    while True:
        peak = predicted_peak_mb(stage, micro, backend, source)
        if peak <= limit:
            return Sizing(device_class, budget_mb, micro, math.ceil(batch / micro), round(peak, 1), True)
        if micro == smallest:
            return Sizing(device_class, budget_mb, 0, 0, round(peak, 1), False)
        micro = max(smallest, micro // 2)
