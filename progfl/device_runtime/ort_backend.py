"""The ONNX Runtime backend: frozen prefix in an inference session, trainable part in a training Module."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..manifest import Manifest, ManifestError, check_arrays
from .backend import RuntimeOptions, StageBackend, ordered_inputs, weights_digest
from .ort import CheckpointState, InferenceSession, Module, Optimizer, OrtValue, SessionOptions, onnxruntime

_OPT_LEVELS = {
    "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
_env_allocator_registered = False


def session_options(opts: RuntimeOptions) -> SessionOptions:
    global _env_allocator_registered
    so = SessionOptions()
    if opts.threads:
        so.intra_op_num_threads = opts.threads
    so.inter_op_num_threads = 1
    if not opts.spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = _OPT_LEVELS[opts.graph_optimization]
    so.log_severity_level = 3
    if opts.low_memory:
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
    def __init__(self, folder: str | Path, manifest: Manifest, stage: str | int,
                 options: RuntimeOptions | None = None, verify: bool = True):
        self.folder, self.manifest = Path(folder), manifest
        self.stage = manifest.stage(stage)
        self.options = options or RuntimeOptions()
        if verify:
            manifest.verify_files(self.folder, self.stage, "ort")
        self._so = session_options(self.options)
        self._load_training()
        self.output_names = self.module.output_names()
        self._bn = [(i, self.stage.bn_updates[n]) for i, n in enumerate(self.output_names) if n in self.stage.bn_updates]
        self._sessions: dict[str, InferenceFile] = {}
        self._fresh: set[str] = set()  # files whose bound weights are current
        self._weights: dict[str, np.ndarray] = {}
        self._lr_scale = float(self.stage.optimizer["lr_scale"])

    def _load_training(self) -> None:
        """Checkpoint state, training Module and Optimizer, fresh: no optimizer moments. ORT has no call that
        resets them, and each round must start with zero momentum (a FedAvg client's optimizer is new every
        round), so a round that follows training reloads them; the old ones are dropped first."""
        f = {k: str(self.folder / r.path) for k, r in self.stage.files.items()}
        self.state = self.module = self.optimizer = None
        try:
            self.state = CheckpointState.load_checkpoint(f["checkpoint"])
            self.module = Module(f["training"], self.state, f["eval"], "cpu", self._so)
            self.optimizer = Optimizer(f["optimizer"], self.module)
        except Exception as e:  # ORT raises its own exception types for malformed files
            raise ManifestError(f"stage {self.stage.name}: artifacts do not load ({str(e).splitlines()[0]})") from None
        self._stepped = False

    # --- weights ---
    def set_weights(self, arrays: dict[str, np.ndarray]) -> None:
        """A new round's weights; optimizer state starts from zero again."""
        s = self.stage
        if self._stepped:
            self._load_training()
        needed = s.needed(self.manifest)
        check_arrays(arrays, needed, f"weights for stage {s.name}")
        self._weights = {p.name: np.asarray(arrays[p.name], np.float32) for p in needed}
        self._fresh.clear()
        flat = np.concatenate([self._weights[p.name].ravel() for p in s.params])
        value = OrtValue.ortvalue_from_numpy(flat)  # does not copy: keep flat alive through the call
        self.module.copy_buffer_to_parameters(value._ortvalue, trainable_only=False)  # raw value: API quirk
        del value, flat
        self._bn_values = {n: self._weights[n].copy() for n in self.stage.bn_updates.values()}
        self.module.lazy_reset_grad()

    def get_weights(self) -> dict[str, np.ndarray]:
        flat = self.module.get_contiguous_parameters(trainable_only=False).numpy()
        out, offset = {}, 0
        keep = set(self.stage.updated_names)
        for p in self.stage.params:
            n = int(np.prod(p.shape))
            if p.name in keep:
                out[p.name] = flat[offset:offset + n].reshape(p.shape).copy()
            offset += n
        return out

    def _file(self, kind: str) -> InferenceFile:
        """The inference file with the current weights bound (rebound once after each change of weights)."""
        f = self._sessions.get(kind)
        if f is None:
            f = self._sessions[kind] = InferenceFile(self.folder / self.stage.files[kind].path,
                                                     self.stage.session_params[kind], self._so)
        if kind not in self._fresh:
            f.bind(self._weights)
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
        self._weights.update(self.get_weights())
        self._fresh.discard("inference")
        return self._run("inference", {"inputs": x})

    # --- training ---
    def accumulate(self, inputs: dict[str, np.ndarray]) -> float:
        self.module.train()
        outs = self.module(*ordered_inputs([t.name for t in self.stage.inputs], inputs))
        batch = len(inputs["features"])
        for i, name in self._bn:  # bug 5: write BatchNorm statistics back ourselves
            value = outs[i]
            if name in self.stage.bn_variance:  # ORT used the biased batch variance; torch the unbiased one
                per_sample, momentum = self.stage.bn_variance[name]
                n = batch * per_sample
                old = self._bn_values[name] * (1.0 - momentum)
                value = old + (value - old) * (n / max(n - 1.0, 1.0))
            self._bn_values[name] = value
            self.state.parameters[name] = value
        return float(outs[self.output_names.index("data_loss")])

    def step(self, lr: float) -> None:
        self.optimizer.set_learning_rate(lr * self._lr_scale)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        self._stepped = True

