"""EXPERIMENTAL: the ExecuTorch (1.5.1) backend. It trains a stage's ExecuTorch training program
(exporter/executorch_files.py) and runs the frozen prefix, the teacher and local evaluation from the stage's TorchScript
files through the torch backend (ExecuTorch's Python bindings link and import torch anyway).

Same semantics as TorchStage: weights set by global name each round (the program's parameter tensors, which
`TrainingModule.named_parameters()` returns as aliases of the program's own memory, are overwritten in place); each
micro-batch's gradients (of loss_scale x data loss) summed; one update per logical batch with ExecuTorch's own SGD
(momentum and coupled weight decay, torch.optim.SGD's update); fresh optimizer state every round. AdamW is refused:
ExecuTorch 1.5.1 has no AdamW.

1.5.1 quirks handled here:
- named_parameters() exists only after a first forward_backward: loading runs one on a zero batch of 1 (loss_scale 0).
- ExecuTorchSGD.step adds weight decay (and momentum) into the gradient tensors it is given, in place: it is given
  this backend's own sums, which are dropped after every step (the next logical batch starts from the next
  micro-batch's gradients, which forward_backward returns as fresh clones).
- ExecuTorchSGD's learning rate is fixed when it is made: it is made at the round's first step, and a later step at
  another learning rate is refused (progfl's rounds use one learning rate).
- The program's batch size is dynamic up to the bound it was exported with (the export's batch size): a larger
  micro-batch is refused with one clear error; smaller ones, the shard's tail included, run as they are.
- Importing the bindings the documented way (`executorch.extension.training`) imports all of `executorch.exir`
  (the exporter, torchao: measured +140 MB RSS and 4.5 s) for one decorator module; `_import_runtime` loads that one
  module on its own when exir is not loaded yet (+2.5 MB), falling back to the plain import.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

import numpy as np

from ..device_runtime.backend import INSTALL as INSTALLS
from ..device_runtime.backend import RuntimeOptions, StageBackend, ordered_inputs
from ..manifest import EXECUTORCH_PIN as VERSION
from ..manifest import Manifest, ManifestError

INSTALL = INSTALLS["executorch"]


def _import_runtime():
    """(load_for_training, get_sgd_optimizer) from ExecuTorch's training bindings, without importing executorch.exir
    when it is not loaded already (see the module docstring)."""
    spec = importlib.util.find_spec("executorch")  # raises nothing when absent: None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'executorch'", name="executorch")
    stubs: list[str] = []
    if "executorch.exir" not in sys.modules:
        try:
            root = Path(list(spec.submodule_search_locations)[0]) / "exir"
            exir = types.ModuleType("executorch.exir")
            exir.__path__ = [str(root)]
            ws = importlib.util.spec_from_file_location("executorch.exir._warnings", root / "_warnings.py")
            mod = importlib.util.module_from_spec(ws)
            sys.modules["executorch.exir"], sys.modules["executorch.exir._warnings"] = exir, mod
            stubs = ["executorch.exir", "executorch.exir._warnings"]
            ws.loader.exec_module(mod)
            exir._warnings = mod
        except Exception:  # layout of another version: the plain import below
            for name in stubs:
                sys.modules.pop(name, None)
            stubs = []
    try:
        from executorch.extension.training import _load_for_executorch_for_training, get_sgd_optimizer
    finally:
        for name in stubs:  # a later `import executorch.exir` (the exporter) gets the real package
            sys.modules.pop(name, None)
    return _load_for_executorch_for_training, get_sgd_optimizer


try:
    import torch

    _load_for_training, _get_sgd = _import_runtime()
except ImportError as e:
    raise ImportError(f"the executorch backend needs ExecuTorch {VERSION} (and torch): {INSTALL} ({e})") from e

from .torch_backend import TorchStage  # noqa: E402  (after the check above: its error names what is missing)


class ExecuTorchStage(StageBackend):
    def __init__(self, folder: str | Path, manifest: Manifest, stage: str | int,
                 options: RuntimeOptions | None = None, verify: bool = True):
        self.folder, self.manifest = Path(folder), manifest
        self.stage = manifest.stage(stage)
        self.options = options or RuntimeOptions()
        o = self.stage.optimizer
        if o["name"] != "sgd":
            raise ManifestError(f"stage {self.stage.name}: optimizer {o['name']} is not available on the executorch "
                                f"backend (ExecuTorch {VERSION} has SGD only): export with --optimizer sgd")
        path = self.folder / self.stage.backend_files("executorch")["training"].path  # the program; the rest: torch's
        if verify:
            manifest.verify_files(self.folder, self.stage, "executorch")
        # prefix, teacher, inference: the torch backend's TorchScript eval graphs
        self._torch = TorchStage(self.folder, manifest, self.stage.name, options, verify=False, train_graph=False)
        self._names = [t.name for t in self.stage.inputs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning on every call of the training API
            try:
                self.module = _load_for_training(str(path))
            except RuntimeError as e:
                why = (str(e).strip().splitlines() or ["load failed"])[0]
                raise ManifestError(f"stage {self.stage.name}: {path.name} does not load in ExecuTorch ({why})") from None
            meta = self.module.model.method_meta("forward")
            self.max_batch = int(meta.input_tensor_meta(0).sizes()[0])  # dynamic dims are planned at their bound
            self.module.forward_backward("forward", self._tensors(self._zeros()))  # materialises named_parameters
        self._params: dict[str, torch.Tensor] = self.module.named_parameters()
        missing = [p.name for p in self.stage.params if p.name not in self._params]
        if missing:
            raise ManifestError(f"stage {self.stage.name}: the executorch program lacks {missing[:3]} "
                                f"({len(missing)} arrays): export again")
        self._trainable = {n: self._params[n] for n in self.stage.trainable_names}
        self._arrays: dict[str, np.ndarray] = {}
        self._sums: dict[str, torch.Tensor] | None = None
        self.optimizer = None
        self._lr: float | None = None

    def _zeros(self) -> list[np.ndarray]:
        return [np.zeros([1 if d == -1 else d for d in t.shape], t.dtype) for t in self.stage.inputs]

    def _tensors(self, arrays: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
        # np.asarray, not ascontiguousarray: that one makes the 0-d loss_scale 1-d, which the program rejects
        return tuple(torch.from_numpy(np.asarray(a, t.dtype, order="C")) for a, t in zip(arrays, self.stage.inputs))

    # --- weights ---
    def set_weights(self, arrays: dict[str, np.ndarray]) -> None:
        self._torch.set_weights(arrays)  # check_arrays on everything the stage needs; the eval graphs' weights
        self._arrays = dict(arrays)
        with torch.no_grad():
            for p in self.stage.params:
                self._params[p.name].copy_(torch.from_numpy(np.asarray(arrays[p.name], np.float32)))
        self.optimizer, self._lr, self._sums = None, None, None

    def get_weights(self) -> dict[str, np.ndarray]:
        return {n: self._params[n].detach().numpy().copy() for n in self.stage.updated_names}

    def session_digest(self, kind: str) -> str:
        return self._torch.session_digest(kind)

    def features(self, x: np.ndarray) -> np.ndarray:
        return self._torch.features(x)

    def teacher(self, features: np.ndarray) -> np.ndarray | None:
        return self._torch.teacher(features)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The torch inference graph with this round's arrays and the program's current (trained) weights."""
        self._torch.set_weights({**self._arrays, **self.get_weights()})
        return self._torch.predict(x)

    # --- training ---
    def accumulate(self, inputs: dict[str, np.ndarray]) -> float:
        args = ordered_inputs(self._names, inputs)
        n = len(args[0])
        if n > self.max_batch:
            raise ManifestError(f"stage {self.stage.name}: micro-batch {n} is above the {self.max_batch} the "
                                "executorch program was exported for: use a smaller micro-batch or export with a "
                                "larger batch size")
        _loss, data_loss = self.module.forward_backward("forward", self._tensors(args))[:2]
        grads = self.module.named_gradients()  # fresh clones every call
        if self._sums is None:
            self._sums = {name: grads[name] for name in self._trainable}
        else:
            for name, s in self._sums.items():
                s.add_(grads[name])
        return float(data_loss)

    def step(self, lr: float) -> None:
        if self._sums is None:
            return
        if self.optimizer is None:
            o = self.stage.optimizer
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.optimizer = _get_sgd(self._trainable, lr, o["momentum"], 0.0, o["weight_decay"], False)
            self._lr = lr
        elif lr != self._lr:
            raise ManifestError(f"stage {self.stage.name}: the executorch backend's SGD keeps the round's first "
                                f"learning rate ({self._lr:g}); a step at {lr:g} in the same round is not supported")
        self.optimizer.step(self._sums)  # adds weight decay into the sums in place: they are dropped right after
        self._sums = None
