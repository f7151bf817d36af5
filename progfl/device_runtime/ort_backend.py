"""The ONNX Runtime backend: frozen prefix in an inference session, trainable part in a training Module."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..manifest import Manifest, ManifestError, check_arrays
from .backend import RuntimeOptions, StageBackend, ordered_inputs, weights_digest
from .buffer_sgd import BufferSGD, tensor_view
from .memory import mark, release_free_memory
from .ort import CheckpointState, InferenceSession, Module, Optimizer, OrtValue, SessionOptions, onnxruntime

_OPT_LEVELS = {
    "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
_env_allocator_registered = False


def session_options(opts: RuntimeOptions, shared_arena: bool = True) -> SessionOptions:
    """shared_arena=False: the session keeps its own arena, which goes (and its memory back to the system) with the
    session: the frozen prefix's, before training starts. The shared one keeps its regions for the process's life,
    and the training session did not reuse a prefix's regions of other sizes (measured +49 MB on grow-1 at 32)."""
    global _env_allocator_registered
    so = SessionOptions()
    if opts.threads:
        so.intra_op_num_threads = opts.threads
    so.inter_op_num_threads = 1
    if not opts.spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = _OPT_LEVELS[opts.graph_optimization]
    so.log_severity_level = 3
    if opts.low_memory and shared_arena:
        if not _env_allocator_registered:
            info = onnxruntime.OrtMemoryInfo("Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                             onnxruntime.OrtMemType.DEFAULT)
            onnxruntime.create_and_register_allocator(info, onnxruntime.OrtArenaCfg(0, 1, -1, -1))
            _env_allocator_registered = True
        so.add_session_config_entry("session.use_env_allocators", "1")
    return so


class InferenceFile:
    """An inference ONNX file whose global weights are graph inputs (see exporter.fixes.weights_as_inputs):
    the session is built once; the weights are bound as OrtValues and rebound only when they change."""

    def __init__(self, path: str | Path, weight_names: list[str], so: SessionOptions):
        self.names = weight_names
        self.session = InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.digest, self._bound = "", {}

    def bind(self, weights: dict[str, np.ndarray]) -> None:
        """Bind this round's weights (hashing them is not free: call it when they change, not per batch)."""
        digest = weights_digest(weights, self.names)
        if digest != self.digest:
            self._arrays = {n: np.ascontiguousarray(weights[n], np.float32) for n in self.names}  # OrtValues borrow these
            self._bound = {n: OrtValue.ortvalue_from_numpy(a) for n, a in self._arrays.items()}
            self.digest = digest

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {**self._bound, **{k: OrtValue.ortvalue_from_numpy(v) for k, v in inputs.items()}}
        return self.session.run_with_ort_values(None, feeds)[0].numpy()


class OrtStage(StageBackend):
    """One stage on ONNX Runtime. What the process holds while it trains: the checkpoint state (the training graph's
    weights, once), one gradient buffer per trainable tensor (which SGD's momentum shares: buffer_sgd.py), the training
    session's intermediates, and (AdamW only) the two moments. Weights are read and written in place through numpy
    views of the state's buffers, so no flat copy of the model is ever made; the frozen prefix's and teacher's
    sessions and weights are dropped once their outputs are cached (release_frozen)."""

    def __init__(self, folder: str | Path, manifest: Manifest, stage: str | int,
                 options: RuntimeOptions | None = None, verify: bool = True):
        self.folder, self.manifest = Path(folder), manifest
        self.stage = manifest.stage(stage)
        self.options = options or RuntimeOptions()
        if verify:
            manifest.verify_files(self.folder, self.stage, "ort")
        self._so = session_options(self.options)
        self._inference_so = session_options(self.options, shared_arena=False)
        self._sessions: dict[str, InferenceFile] = {}
        self._load_training()
        self.output_names = self.module.output_names()
        self._bn = [(i, self.stage.bn_updates[n]) for i, n in enumerate(self.output_names) if n in self.stage.bn_updates]
        self._fresh: set[str] = set()  # files whose bound weights are current
        in_graph = {p.name for p in self.stage.params}
        self._frozen_names = sorted({n for names in self.stage.session_params.values() for n in names} - in_graph)
        self._frozen: dict[str, np.ndarray] = {}  # this round's weights that only the inference files read

    def _load_training(self) -> None:
        """Checkpoint state and training Module (no eval session: predict uses inference.onnx), numpy views of their
        buffers, and the optimizer: SGD in place on the gradient buffers, or ORT's AdamW, whose moments ORT cannot
        reset: each round must start from zero moments (a FedAvg client's optimizer is new every round), so an AdamW
        round that follows training reloads them, the old ones dropped first."""
        f = {k: str(self.folder / r.path) for k, r in self.stage.files.items()}
        o = self.stage.optimizer
        self.state = self.module = self.optimizer = self.sgd = None
        self._views: dict[str, np.ndarray] = {}
        try:
            self.state = CheckpointState.load_checkpoint(f["checkpoint"])
            mark("checkpoint loaded")
            self.module = Module(f["training"], self.state, None, "cpu", self._so)
            mark("training session created")
            if o["name"] == "adamw":
                self.optimizer = Optimizer(f["optimizer"], self.module)
                mark("optimizer created")
        except Exception as e:  # ORT raises its own exception types for malformed files
            raise ManifestError(f"stage {self.stage.name}: artifacts do not load ({str(e).splitlines()[0]})") from None
        raw = self.state._state  # the C-level state: its parameters' OrtValues are the buffers the sessions use
        try:
            self._views = {p.name: tensor_view(raw.get_parameter(p.name).data, p.shape) for p in self.stage.params}
            grads = [(self._views[p.name], tensor_view(raw.get_parameter(p.name).grad, p.shape))
                     for p in self.stage.params if p.trainable]
        except (RuntimeError, ValueError) as e:
            raise ManifestError(f"stage {self.stage.name}: checkpoint does not match the manifest ({e})") from None
        if o["name"] == "sgd":
            self.sgd = BufferSGD(grads, float(o["momentum"]), float(o["weight_decay"]))
        for f in self._sessions.values():
            f.digest = ""  # bound to the old state's buffers: rebind even if the values are the same
        self._stepped = False

    # --- weights ---
    def set_weights(self, arrays: dict[str, np.ndarray]) -> None:
        """A new round's weights, written into ORT's buffers; optimizer state starts from zero again (SGD: the reset
        gradient buffers are its momentum)."""
        s = self.stage
        if self._stepped and self.optimizer is not None:
            self._load_training()
        check_arrays(arrays, s.needed(self.manifest), f"weights for stage {s.name}")
        for name, view in self._views.items():
            view[...] = arrays[name]
        self._frozen = {n: np.asarray(arrays[n], np.float32) for n in self._frozen_names}
        self._fresh.clear()
        self.module.lazy_reset_grad()

    def get_weights(self) -> dict[str, np.ndarray]:
        return {n: self._views[n].copy() for n in self.stage.updated_names}

    def release_frozen(self) -> None:
        for kind in ("prefix", "teacher"):
            self._sessions.pop(kind, None)
            self._fresh.discard(kind)
        self._frozen = {}
        release_free_memory()

    def _file(self, kind: str) -> InferenceFile:
        """The inference file with the current weights bound (rebound once after each change of weights)."""
        f = self._sessions.get(kind)
        if f is None:
            f = self._sessions[kind] = InferenceFile(self.folder / self.stage.files[kind].path,
                                                     self.stage.session_params[kind], self._inference_so)
        if kind not in self._fresh:
            if len(self._frozen) != len(self._frozen_names):
                raise ManifestError(f"stage {self.stage.name}: {kind} needs the round's weights: set_weights first")
            f.bind({**self._frozen, **self._views})
            self._fresh.add(kind)
        return f

    def _run(self, kind: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._file(kind).run(inputs)

    def session_digest(self, kind: str) -> str:
        return self.stage.files[kind].sha256 + self._file(kind).digest

    def features(self, x: np.ndarray) -> np.ndarray:
        if "prefix" not in self.stage.files:
            return x
        return self._run("prefix", {"inputs": x})

    def teacher(self, features: np.ndarray) -> np.ndarray | None:
        if "teacher" not in self.stage.files:
            return None
        return self._run("teacher", {"features": features})

    def predict(self, x: np.ndarray) -> np.ndarray:
        self._fresh.discard("inference")  # the trained weights changed since the last bind
        return self._run("inference", {"inputs": x})

    # --- training ---
    def accumulate(self, inputs: dict[str, np.ndarray]) -> float:
        self.module.train()
        outs = self.module(*ordered_inputs([t.name for t in self.stage.inputs], inputs))
        batch = len(inputs["features"])
        for i, name in self._bn:  # bug 5: write BatchNorm statistics back ourselves
            value, view = outs[i], self._views[name]
            if name in self.stage.bn_variance:  # ORT used the biased batch variance; torch the unbiased one
                per_sample, momentum = self.stage.bn_variance[name]
                n = batch * per_sample
                old = view * (1.0 - momentum)
                value = old + (value - old) * (n / max(n - 1.0, 1.0))
            view[...] = value
        return float(outs[self.output_names.index("data_loss")])

    def step(self, lr: float) -> None:
        if self.sgd is not None:
            self.sgd.step(lr)  # leaves momentum in the gradient buffers: no lazy_reset_grad
        else:
            self.optimizer.set_learning_rate(lr)
            self.optimizer.step()
            self.module.lazy_reset_grad()
        self._stepped = True
