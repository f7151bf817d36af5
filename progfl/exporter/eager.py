"""The same stage trained by PyTorch eager, step for step as the device runtime does it.

It is the reference the ORT artifacts are tested against and the baseline the benchmarks compare with.
Same method names as the device backends (set_weights, features, teacher, accumulate, step, get_weights,
predict), so one loop drives either.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.base import BlockModel
from ..models.stages import NeuLiteWeights, StageSpec, build_stage
from ..device_runtime.backend import ordered_inputs
from .compile import OptimizerConfig


class EagerStage:
    def __init__(self, model: BlockModel, spec: StageSpec, optimizer: OptimizerConfig | None = None,
                 neulite: NeuLiteWeights | None = None, threads: int = 0, dtype: torch.dtype = torch.float32):
        """dtype float64 makes the reference that tests trust: float32 eager itself drifts from the exact result
        when rounding flips a ReLU under a large gradient (measured: 1e-3 after a few NeuLite steps)."""
        if threads:
            torch.set_num_threads(threads)
        self.model, self.spec, self.dtype = model.to(dtype), spec, dtype
        cfg = optimizer or OptimizerConfig()
        self.g = build_stage(model, spec, neulite)
        params = [p for _, p in self.g.train.trainable_parameters()]
        if cfg.name == "sgd":
            self.opt = torch.optim.SGD(params, lr=0.01, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=0.001, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.opt.zero_grad(set_to_none=False)

    def _t(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(self.dtype) if t.is_floating_point() else t

    def set_weights(self, arrays: dict[str, np.ndarray]) -> None:
        own = self.model.state_dict()
        with torch.no_grad():
            for name, value in arrays.items():
                if name in own:
                    own[name].copy_(torch.from_numpy(np.asarray(value)))

    def get_weights(self) -> dict[str, np.ndarray]:
        """Everything the training graph holds: parameters and BatchNorm statistics, by global name."""
        return {n: t.detach().numpy().copy() for n, t in self.g.train.state_dict().items()
                if not n.endswith("num_batches_tracked")}

    @torch.no_grad()
    def features(self, x: np.ndarray) -> np.ndarray:
        if self.g.prefix is None:
            return x
        return self.g.prefix.eval()(self._t(x)).numpy()

    @torch.no_grad()
    def teacher(self, features: np.ndarray) -> np.ndarray | None:
        return None if self.g.teacher is None else self.g.teacher.eval()(self._t(features)).numpy()

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.g.inference.eval()(self._t(x)).numpy()

    def accumulate(self, inputs: dict[str, np.ndarray]) -> float:
        """inputs without loss_scale: the micro-batch is the whole batch. The graph has no decay term (weight_decay=0
        above): its loss is loss_scale x data loss."""
        self.g.train.train()
        args = [self._t(a) for a in ordered_inputs(self.g.train.input_names(), inputs)]
        loss, _, data_loss = self.g.train(*args)
        loss.backward()
        return float(data_loss.detach())

    def release_frozen(self) -> None:
        """Nothing to free: the reference keeps the whole model."""

    def step(self, lr: float) -> None:
        """Gradients summed over the micro-batches (each weighted by its share); one optimizer step."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
