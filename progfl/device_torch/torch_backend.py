"""The PyTorch backend, for boards that run torch but have no ONNX Runtime training build (Raspberry Pi, Jetson).

It trains the TorchScript files the exporter wrote (exporter/torch_files.py) with `torch.jit.load` alone: no progfl
models and no user code on the device. It mirrors the ORT backend step for step, so the same weights and batches give
the same update: micro-batch losses weighted by their share of the batch (loss_scale), gradients summed, one step;
SGD with momentum and coupled weight decay (the papers' optimizer; the ORT backend applies the same update to ORT's
buffers) or AdamW; fresh optimizer state every round; BatchNorm statistics updated by torch itself (unbiased variance,
as the ORT backend corrects to).

The optimizers are written here with tensor ops, the same updates as torch.optim.SGD and AdamW: constructing a
torch.optim optimizer imports torch._dynamo, measured +72 MB of RSS on a process that holds ~255 MB, a board's memory
spent on nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..device_runtime.backend import RuntimeOptions, StageBackend, ordered_inputs, weights_digest
from ..manifest import Manifest, ManifestError, check_arrays


def _simple_executor() -> None:
    """TorchScript's default (profiling) executor runs the first calls slowly while it profiles and re-specialises
    the graph. Measured (cnn, batch 16, 1 thread, x86): steps 1-3 took 42, 10 and 11 ms against 2.5 ms after, and a
    local round of a few steps paid that again for every stage; the legacy executor optimises once on the first call
    (48 ms) and then runs at the same 2.4-2.6 ms. The switch is private but present from torch 1.x to 2.13."""
    switch = getattr(torch._C, "_jit_set_profiling_executor", None)
    if switch is not None:
        switch(False)


def _load(path: Path, what: str) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as e:  # torch's errors for malformed or too-new files
        raise ManifestError(f"{what}: {path.name} does not load in torch {torch.__version__} "
                            f"({str(e).strip().splitlines()[0]})") from None


class TorchStage(StageBackend):
    def __init__(self, folder: str | Path, manifest: Manifest, stage: str | int,
                 options: RuntimeOptions | None = None, verify: bool = True, train_graph: bool = True):
        """train_graph=False: only the eval graphs (prefix, teacher, inference), for a backend that trains the stage
        with another engine (executorch_backend.py) and has no TorchScript train graph on the device."""
        self.folder, self.manifest = Path(folder), manifest
        self.stage = manifest.stage(stage)
        self.options = options or RuntimeOptions()
        self.files = self.stage.backend_files("torch")
        if verify:
            manifest.verify_files(self.folder, self.stage, "torch")
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        _simple_executor()
        self.train_graph = None
        self._params: list[torch.Tensor] = []
        if train_graph:
            self.train_graph = _load(self.folder / self.files["training"].path, f"stage {self.stage.name}").train()
            trainable = set(self.stage.trainable_names)
            own = dict(self.train_graph.named_parameters())
            for name, p in own.items():
                p.requires_grad_(name in trainable)
            self._params = [own[n] for n in self.stage.trainable_names]
        self._graphs: dict[str, torch.jit.ScriptModule] = {}  # prefix, teacher, inference: loaded when first used
        self._weights: dict[str, np.ndarray] = {}
        self._digests: dict[str, str] = {}
        self.optimizer: SGD | AdamW | None = None

    def _new_optimizer(self) -> SGD | AdamW:
        """Fresh state (zero momentum) every round, as a FedAvg client's optimizer is."""
        o = self.stage.optimizer
        if o["name"] == "sgd":
            return SGD(self._params, o["momentum"], o["weight_decay"])
        return AdamW(self._params, tuple(o["betas"]), o["eps"], o["weight_decay"])

    # --- weights ---
    def set_weights(self, arrays: dict[str, np.ndarray]) -> None:
        needed = self.stage.needed(self.manifest)
        check_arrays(arrays, needed, f"weights for stage {self.stage.name}")
        self._weights = {p.name: np.asarray(arrays[p.name], np.float32) for p in needed}
        self._digests.clear()
        if self.train_graph is not None:
            _copy_into(self.train_graph, self._weights)
            self.optimizer = self._new_optimizer()
            for p in self._params:
                p.grad = None

    def get_weights(self) -> dict[str, np.ndarray]:
        state = self.train_graph.state_dict()
        return {n: state[n].detach().numpy().copy() for n in self.stage.updated_names}

    def _graph(self, kind: str) -> torch.jit.ScriptModule:
        """An eval graph with the current weights copied in (once per change of weights)."""
        g = self._graphs.get(kind)
        if g is None:
            g = self._graphs[kind] = _load(self.folder / self.files[kind].path, f"stage {self.stage.name}").eval()
        if kind not in self._digests:
            if not self._weights:
                raise ManifestError(f"stage {self.stage.name}: {kind} needs the round's weights: set_weights first")
            _copy_into(g, self._weights)
            self._digests[kind] = weights_digest(self._weights, self.stage.session_params[kind])
        return g

    def _run(self, kind: str, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self._graph(kind)(torch.from_numpy(x)).numpy()

    def session_digest(self, kind: str) -> str:
        self._graph(kind)
        return self.files[kind].sha256 + self._digests[kind]

    def features(self, x: np.ndarray) -> np.ndarray:
        return self._run("prefix", x) if "prefix" in self.files else x

    def teacher(self, features: np.ndarray) -> np.ndarray | None:
        return self._run("teacher", features) if "teacher" in self.files else None

    def release_frozen(self) -> None:
        for kind in ("prefix", "teacher"):
            self._graphs.pop(kind, None)
            self._digests.pop(kind, None)
        self._weights = {}

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.train_graph is not None:
            self._weights.update(self.get_weights())
        self._digests.pop("inference", None)
        return self._run("inference", x)

    # --- training ---
    def accumulate(self, inputs: dict[str, np.ndarray]) -> float:
        """The train graph has no weight-decay term (the optimizer applies it): its loss is loss_scale x data loss."""
        args = ordered_inputs([t.name for t in self.stage.inputs], inputs)
        loss, _, data_loss = self.train_graph(*map(torch.from_numpy, args))
        loss.backward()
        return float(data_loss.detach())

    def step(self, lr: float) -> None:
        self.optimizer.step(lr)
        for p in self._params:
            p.grad = None


def _copy_into(module: torch.jit.ScriptModule, weights: dict[str, np.ndarray]) -> None:
    """Copy the arrays a module holds (parameters and BatchNorm statistics, by global name) into it."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name in weights:
                t.copy_(torch.from_numpy(weights[name]))


class SGD:
    """torch.optim.SGD's update: d = g + wd p; buf = mu buf + d (buf = d at the first step); p -= lr buf."""

    def __init__(self, params: list[torch.Tensor], momentum: float, weight_decay: float):
        self.params, self.momentum, self.weight_decay = params, momentum, weight_decay
        self.bufs: list[torch.Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d = p.grad.add(p, alpha=self.weight_decay) if self.weight_decay else p.grad
            if self.momentum:
                if self.bufs[i] is None:
                    self.bufs[i] = d.clone()
                else:
                    self.bufs[i].mul_(self.momentum).add_(d)
                d = self.bufs[i]
            p.add_(d, alpha=-lr)


class AdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments)."""

    def __init__(self, params: list[torch.Tensor], betas: tuple[float, float], eps: float, weight_decay: float):
        self.params, self.betas, self.eps, self.weight_decay = params, betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            p.mul_(1 - lr * self.weight_decay)
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / bc2 ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / bc1)
