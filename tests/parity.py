"""ORT float32 against torch float64, at a bound set by what float32 rounding costs on the same tensors.

Why this bound. A fixed tolerance is either loose or wrong: how far a float32 gradient lands from the exact one
depends on the model's depth and on how ill-conditioned each layer's reduction is (measured over every zoo stage:
from 1.6 u to 280 u per module, u = 2^-24, with no fixed rule in the number of layers). So each step runs a third
engine, torch in float32, on the same weights and batch: its distance from float64 is the float32 rounding of this
model at its depth, measured. On each tensor ORT must stay within 8x of the largest error float32 torch makes on
that tensor over the run's steps (one step's can be luckily small), and never needs to be better than sqrt(n) u, the
typical rounding of a float32 sum of n terms, n being the values the tensor's gradient or statistic sums over (batch
x positions; the batch for the loss). Why 8 and the sum: ORT's kernels round differently from torch's, most on long
reductions: ORT's error reached 8.1x float32 torch's (ResNet-18's light output module, distill-1, a BatchNorm's
gradient over 16 x 8 x 8 values: 81 u against 9.9 u, where sqrt(n) u is 32 u). Over 106 stages of 8 models and the 3
output-module kinds, the largest error was 0.49 of its bound.

Everything is compared as a relative L2 error of a change (a gradient, a BatchNorm statistic's move in one step, a
parameter's move in one step), grouped by module: a bias that feeds a norm has an exact gradient of zero, so it is
judged together with its layer's weight.

Steps at a ReLU's kink are not judged; the batch is drawn again. When a ReLU's input lies within float32's forward
error of zero, float32 and float64 may put it on different sides, and the one unit's gradient then differs by its
whole size and spreads to every layer below (measured on ResNet-18 neulite-2: a unit at 8 u of its layer's RMS made
1.8 % of a norm layer's gradient; units at 24 u and above never flipped). The gradient is discontinuous there, so no
rounding bound applies; a step whose float64 forward has any ReLU input within KINK (64 u) of its layer's RMS from
zero is redrawn, and the momentum it would have carried never forms.

What the bound catches that the old "1e-4 on the weights" could not: the step's update is ~1e-3 of a weight, so 1e-4
on the weights allowed 10 % of the update; here an lr 0.1 % off fails by 15x (cnn grow-0) and BatchNorm statistics
without the n/(n-1) correction by 35x or more.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from progfl.device_runtime.backend import ordered_inputs
from progfl.device_runtime.buffer_sgd import tensor_view
from progfl.device_runtime.ort_backend import OrtStage
from progfl.exporter.eager import EagerStage
from progfl.manifest import Manifest
from progfl.models import parse_stage_name

U = 2.0 ** -24  # float32's unit roundoff
FACTOR = 8.0
KINK = 64 * U  # a ReLU input closer to zero than this (relative to its layer's RMS) may flip in float32
TRIES = 100    # batches drawn for one step before the harness gives up (ResNet-34 full: 4 in 5 are at a kink)
STATS = ("running_mean", "running_var")


def bound(e32: float, n: int) -> float:
    """The most ORT may be off (relative) where float32 torch is off by e32 on a tensor that sums n values."""
    return FACTOR * max(e32, np.sqrt(n) * U)


def rel(a: dict[str, np.ndarray], ref: dict[str, np.ndarray], names: list[str]) -> float:
    """Relative L2 distance of a from ref over the tensors `names` taken together (0 when ref is 0 and a equals it)."""
    num = sum(float(np.sum((np.asarray(a[n], np.float64) - ref[n]) ** 2)) for n in names)
    den = sum(float(np.sum(np.asarray(ref[n], np.float64) ** 2)) for n in names)
    return float(np.sqrt(num / den)) if den else (0.0 if num == 0 else float("inf"))


def modules(names: list[str]) -> dict[str, list[str]]:
    """Parameter names grouped by the module that owns them; each BatchNorm statistic alone."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n if n.endswith(STATS) else n.rsplit(".", 1)[0], []).append(n)
    return groups


@dataclass
class Check:
    step: int
    kind: str   # loss, gradient, update or statistic
    name: str   # the module or statistic ("" for the loss)
    n: int      # the values it sums over
    ort: float  # ORT's relative error against float64
    e32: float  # float32 torch's


def judge(checks: list[Check]) -> list[tuple[Check, float]]:
    """The checks ORT fails, each with its bound: 8x float32 torch's largest error on that tensor and kind over all
    steps (at least sqrt(n) u), worst first."""
    worst: dict[tuple[str, str], float] = {}
    for c in checks:
        worst[c.kind, c.name] = max(worst.get((c.kind, c.name), 0.0), c.e32)
    bad = [(c, bound(worst[c.kind, c.name], c.n)) for c in checks]
    return sorted(((c, b) for c, b in bad if c.ort > b), key=lambda cb: -cb[0].ort / cb[1])


def failures(checks: list[Check]) -> str:
    """An assertion message: the failed checks, worst first ("" when none)."""
    return "; ".join(f"step {c.step} {c.kind} {c.name}: {c.ort / U:.1f} u > bound {b / U:.1f} u"
                     for c, b in judge(checks)[:5])


class Lockstep:
    """ORT, float64 torch and float32 torch on one stage. Before each step both torch engines take ORT's weights and
    statistics, so every step starts from the same point; each keeps its own momentum, so momentum is checked too."""

    def __init__(self, model: torch.nn.Module, folder, manifest: Manifest, stage: str, weights: dict[str, np.ndarray]):
        spec = parse_stage_name(stage)
        self.ort = OrtStage(folder, manifest, stage)
        self.e64 = EagerStage(copy.deepcopy(model), spec, dtype=torch.float64)
        self.e32 = EagerStage(copy.deepcopy(model), spec, dtype=torch.float32)
        for engine in (self.ort, self.e64, self.e32):
            engine.set_weights(weights)
        s = manifest.stage(stage)
        self.trainable = [p.name for p in s.params if p.trainable]
        self.stats = [n for n in s.updated_names if n.endswith(STATS)]
        raw = self.ort.state._state  # ORT's gradient buffers, which BufferSGD also keeps its momentum in
        self._grads = {p.name: tensor_view(raw.get_parameter(p.name).grad, p.shape) for p in s.params if p.trainable}
        self._closest = float("inf")
        self._summed: dict[str, int] = {}  # module -> values its parameters' gradients sum over
        for name, m in self.e64.g.train.named_modules():
            if isinstance(m, torch.nn.ReLU):
                m.register_forward_pre_hook(self._note_relu_input)
            elif isinstance(getattr(m, "weight", None), torch.nn.Parameter):
                m.register_forward_hook(lambda mod, _args, out, name=name: self._note_output(name, mod, out))
        self.redrawn = 0

    def _note_output(self, name: str, module: torch.nn.Module, out: torch.Tensor) -> None:
        """A layer's output has one value per (sample, position) for each of its weight's first-axis entries: what
        the gradients of its parameters (and a norm's statistics) sum over."""
        if isinstance(out, torch.Tensor):
            self._summed[name] = max(self._summed.get(name, 1), out.numel() // module.weight.shape[0])

    def _note_relu_input(self, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        z = args[0].detach()
        rms = float(z.pow(2).mean().sqrt())
        if rms > 0:
            self._closest = min(self._closest, float(z.abs().min()) / rms)

    def _at_kink(self, inputs: dict[str, np.ndarray], before: dict[str, np.ndarray]) -> bool:
        """Whether float64's forward on this batch puts a ReLU input within KINK of zero (statistics restored after)."""
        self._closest = float("inf")
        train = self.e64.g.train.train()
        with torch.no_grad():
            train(*(torch.from_numpy(np.asarray(a, np.float64) if a.dtype == np.float32 else a)
                    for a in ordered_inputs(train.input_names(), inputs)))
        self.e64.set_weights(before)
        return self._closest < KINK

    def step(self, draw: Callable[[], dict[str, np.ndarray]], lr: float, step: int) -> list[Check]:
        """One accumulate + SGD step on every engine, on the first batch from `draw` that is not at a kink; the
        checks of its loss, gradients, statistics and update."""
        before = self.ort.get_weights()
        for engine in (self.e64, self.e32):
            engine.set_weights(before)
        for _ in range(TRIES):
            inputs = draw()
            if not self._at_kink(inputs, before):
                break
            self.redrawn += 1
        else:
            raise AssertionError(f"{TRIES} batches in a row had a ReLU input within {KINK / U:.0f} u of zero")
        buffers = {n: g.astype(np.float64) for n, g in self._grads.items()}  # momentum carried from the last step
        losses = {"ort": self.ort.accumulate(inputs), "64": self.e64.accumulate(_float64(inputs)), "32": self.e32.accumulate(inputs)}
        grads = {"ort": {n: g.astype(np.float64) - buffers[n] for n, g in self._grads.items()},
                 "64": _eager_grads(self.e64), "32": _eager_grads(self.e32)}
        stats = {"ort": self.ort.get_weights(), "64": self.e64.get_weights(), "32": self.e32.get_weights()}
        for engine in (self.ort, self.e64, self.e32):
            engine.step(lr)
        after = {"ort": self.ort.get_weights(), "64": self.e64.get_weights(), "32": self.e32.get_weights()}

        batch = len(inputs["labels"])
        checks = [Check(step, "loss", "", batch,
                        *(abs(losses[k] - losses["64"]) / abs(losses["64"]) for k in ("ort", "32")))]
        for m, names in modules(self.trainable).items():
            n = self._summed.get(m, batch)
            checks.append(Check(step, "gradient", m, n, *(rel(grads[k], grads["64"], names) for k in ("ort", "32"))))
            moved = {k: {x: after[k][x].astype(np.float64) - before[x] for x in names} for k in after}
            checks.append(Check(step, "update", m, n, *(rel(moved[k], moved["64"], names) for k in ("ort", "32"))))
        for x in self.stats:
            n = self._summed.get(x.rsplit(".", 1)[0], batch)
            moved = {k: {x: stats[k][x].astype(np.float64) - before[x]} for k in stats}
            checks.append(Check(step, "statistic", x, n, *(rel(moved[k], moved["64"], [x]) for k in ("ort", "32"))))
        return checks


def _float64(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in inputs.items()}


def _eager_grads(engine: EagerStage) -> dict[str, np.ndarray]:
    return {n: p.grad.detach().to(torch.float64).numpy().copy() for n, p in engine.g.train.trainable_parameters()}

