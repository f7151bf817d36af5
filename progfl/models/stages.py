"""Stages: what one phase of progressive training trains, what it keeps frozen in front, and its loss.

A stage becomes up to four torch graphs, each a root module whose parameter names are the global
names (so exported ONNX initializers carry them and weights move by name):
  prefix     x -> features           frozen blocks, eval mode (a separate ORT inference session)
  train      (features, ..., loss_scale) -> (loss, logits, data_loss)   the trainable part with its loss
  inference  x -> logits             the whole model as this stage sees it, eval mode (server accuracy)
  teacher    features -> logits      the real block + output module (ProFL's distillation target)

A width stage is a sub-model's (models/width.py) whole-model training; the exporter builds it from the sub-model.
A depth stage is DepthFL's depth-k sub-model: blocks 0..k-1, a classifier after each (see StageSpec).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import BlockModel, run_frozen
from .losses import cross_entropy, depthfl, mse, nhsic, one_hot
from .norms import normalise_by_batch, with_batch_statistics

KINDS = ("grow", "distill", "neulite", "full", "width", "depth")
WIDTH_DIVISORS = (1, 2, 4, 8)  # width-d: 1/d of every hidden width (HeteroFL's ratios 1, 1/2, 1/4, 1/8)


@dataclass(frozen=True)
class StageSpec:
    """kind: grow (block t + output module, CE), distill (ProFL: fit basic layer t to the real block's logits),
    neulite (grow with the curriculum loss, co-adapting block t-1's last unit), full (everything, CE), width (a
    width-scaled sub-model's whole-model training, CE; `block` is its divisor d: width-2 is half width), depth
    (DepthFL, Kim et al. ICLR 2023: `block` is k, the number of blocks trained, 1..T).

    depth-k trains blocks 0..k-1 with a classifier after each, by DepthFL's loss (losses.depthfl: CE of every
    classifier + mutual self-distillation between them). The classifier after block j is block j's output module:
    basics[j+1..T-1] then the shared classifier (after the last block the classifier alone, the full model's head).
    So the classifiers share weights (basics[m] serves every block before m, the linear layer all of them), where
    DepthFL gives each depth its own bottleneck head: the global model has no other heads, and separate per-depth
    heads would be new global arrays that no other stage, plan or evaluation uses. Every depth stage therefore trains
    all basic layers and the classifier. BatchNorm inside the heads normalises by batch statistics and tracks none
    (runs_batch_statistics): a basic layer runs once per shallower head in one step, and torch would move its running
    statistics once per call where ORT's graph moves them once from the same start (the two would disagree, and
    neither describes one model). The blocks run once per step: their statistics are tracked as in `full`."""

    kind: str
    block: int

    @property
    def name(self) -> str:
        return "full" if self.kind == "full" else f"{self.kind}-{self.block}"

    @property
    def loss(self) -> str:
        return {"grow": "ce", "full": "ce", "width": "ce", "distill": "mse", "neulite": "neulite",
                "depth": "depthfl"}[self.kind]


def parse_stage_name(name: str) -> StageSpec:
    if name == "full":
        return StageSpec("full", 0)
    kind, _, block = name.partition("-")
    if kind not in KINDS or not block.isdigit():
        raise ValueError(f"bad stage name {name!r}: use grow-N, distill-N, neulite-N, width-D, depth-K or full")
    return StageSpec(kind, int(block))


def default_stages(num_blocks: int, kinds: tuple[str, ...] = ("grow", "distill", "full")) -> list[StageSpec]:
    """Stages in a stable order: grow-0..T-1, distill-1..T-1, neulite-0..T-1, full, width-1, -2, -4, -8, depth-1..T
    (those asked for)."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown stage kind(s) {sorted(unknown)}: choose from {', '.join(KINDS)}")
    out = []
    for kind in KINDS:
        if kind not in kinds:
            continue
        if kind == "full":
            out.append(StageSpec("full", 0))
        elif kind == "width":
            out += [StageSpec("width", d) for d in WIDTH_DIVISORS]
        elif kind == "depth":
            out += [StageSpec("depth", k) for k in range(1, num_blocks + 1)]
        else:
            out += [StageSpec(kind, t) for t in range(1 if kind == "distill" else 0, num_blocks)]
    return out


@dataclass
class NeuLiteWeights:
    """Stage-wise l1 (input term) and l2 (label term). Unpublished: by default the input term fades and the
    label term grows from the first block to the last (information-bottleneck reading)."""

    l1: float = 0.1
    l2: float = 0.1
    sigma: float = 5.0

    def at(self, t: int, num_blocks: int) -> tuple[float, float]:
        return self.l1 * (num_blocks - t) / num_blocks, self.l2 * (t + 1) / num_blocks


class Mirror(nn.Module):
    """Registers the model's submodules at their own dotted paths, so names stay global; `m` is the model."""

    def __init__(self, model: BlockModel, paths: list[str]):
        super().__init__()
        object.__setattr__(self, "m", model)  # not a submodule: its parameters would get a 'm.' prefix
        for path in paths:
            parent: nn.Module = self
            *parents, leaf = path.split(".")
            for p in parents:
                if p not in parent._modules:
                    parent.add_module(p, nn.ModuleDict())
                parent = parent._modules[p]
            parent.add_module(leaf, model.get_submodule(path))


def _prefix_split(model: BlockModel, spec: StageSpec) -> tuple[list[str], str | None]:
    """Frozen paths in front of the stage, and the unit of block t-1 that NeuLite co-adapts (if any)."""
    t = spec.block
    if spec.kind in ("full", "width", "depth") or t == 0:
        return [], None
    frozen = [f"blocks.{k}" for k in range(t - 1)]
    last = model.blocks[t - 1]
    if spec.kind == "neulite" and isinstance(last, nn.Sequential) and len(last) > 1:
        frozen += [f"blocks.{t - 1}.{i}" for i in range(len(last) - 1)]
        return frozen, f"blocks.{t - 1}.{len(last) - 1}"
    return frozen + [f"blocks.{t - 1}"], None


def _run(model: BlockModel, paths: list[str], h: torch.Tensor, batch_stats: tuple[str, ...] = ()) -> torch.Tensor:
    """h through the modules at `paths`; those starting with a prefix in `batch_stats` by runs_batch_statistics."""
    for p in paths:
        layer = model.get_submodule(p)
        h = runs_batch_statistics(layer, h) if p.startswith(batch_stats) else layer(h)
    return h


def runs_batch_statistics(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A layer whose BatchNorms normalise by the batch's own statistics, in primitive ops, and update no running ones
    (norms.BatchStatNorm's arithmetic on the layer's own weights: names stay global, nothing is copied). Whatever the
    mode, so torch, ORT and the inference graphs agree. Other layers run as they are. The depth stages' heads."""
    for mod in (layer if isinstance(layer, nn.Sequential) else [layer]):
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            h = normalise_by_batch(h, mod.weight, mod.bias, mod.eps)
        else:
            h = mod(h)
    return h


class PrefixGraph(Mirror):
    def __init__(self, model: BlockModel, paths: list[str]):
        super().__init__(model, paths)
        self.paths = paths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self.m, self.paths, x)


class TrainGraph(Mirror):
    """The trainable part of a stage and its loss. Inputs: features, [inputs (raw x) | teacher], labels, loss_scale.

    loss_scale is the micro-batch's share of its logical batch (size / batch size): the gradients the runtime sums over
    the micro-batches are then exactly the logical batch's mean gradient, whatever the split, and the optimizer steps
    at the plan's learning rate. Weight decay is the optimizer's (every backend's SGD adds wd * p to the gradient): a
    penalty in the graph would cost weight-sized gradient temporaries per tensor. Dividing the learning rate by the number of micro-batches
    instead is wrong under momentum when that number changes (a short last batch rescales the whole momentum history
    in ORT's formulation) or when micro-batches differ in size."""

    def __init__(self, model: BlockModel, spec: StageSpec, neulite: NeuLiteWeights):
        t, T = spec.block, model.T
        self.spec = spec
        self.coadapt = _prefix_split(model, spec)[1]
        if spec.kind in ("full", "width"):
            self.trainable = ["blocks", "classifier"]
        elif spec.kind == "depth":  # blocks 0..k-1 and their heads: every basic layer (block 0's head has them all)
            self.trainable = [f"blocks.{j}" for j in range(t)] + [f"basics.{k}" for k in range(1, T)] + ["classifier"]
        elif spec.kind == "distill":
            self.trainable = [f"basics.{t}"]
        else:
            self.trainable = [f"blocks.{t}"] + [f"basics.{k}" for k in range(t + 1, T)] + ["classifier"]
            if self.coadapt:
                self.trainable.insert(0, self.coadapt)
            if spec.kind == "neulite":
                self.trainable.append("projector")
        frozen = [f"basics.{k}" for k in range(t + 1, T)] + ["classifier"] if spec.kind == "distill" else []
        super().__init__(model, self.trainable + frozen)
        self.l1, self.l2 = neulite.at(t, T)
        self.sigma = neulite.sigma
        self.uses_raw_input = spec.kind == "neulite" and t > 0
        self.frozen_in_graph = frozen

    def input_names(self) -> list[str]:
        extra = {"distill": ["teacher"], "neulite": ["inputs", "labels"] if self.uses_raw_input else ["labels"]}
        return ["features", *extra.get(self.spec.kind, ["labels"]), "loss_scale"]

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        frozen = tuple(p + "." for p in self.frozen_in_graph)
        return [(n, p) for n, p in self.named_parameters() if not n.startswith(frozen)]

    def forward(self, features: torch.Tensor, *rest: torch.Tensor):
        *rest, scale = rest
        m, t, kind = self.m, self.spec.block, self.spec.kind
        if kind == "depth":  # a classifier after each block; logits: the deepest's
            heads, h = [], features
            for j in range(t):
                h = m.blocks[j](h)
                heads.append(m.classifier(_run(m, [f"basics.{k}" for k in range(j + 1, m.T)], h, ("basics.",))))
            data_loss = depthfl(heads, rest[-1])
            return data_loss * scale, heads[-1], data_loss
        if kind in ("full", "width"):
            h = m.run_blocks(features, 0, m.T)
        elif kind == "distill":  # the frozen rest of the output module runs as in the teacher (eval-mode norms)
            h = m.basics[str(t)](features)
            for k in range(t + 1, m.T):
                h = run_frozen(m.basics[str(k)], h)
        else:
            h = features if self.coadapt is None else m.get_submodule(self.coadapt)(features)
            h = m.head(m.blocks[t](h), t)
        logits = m.classifier(h)
        if kind == "distill":
            data_loss = mse(logits, rest[0])
        else:
            labels = rest[-1]
            data_loss = cross_entropy(logits, labels)
            if kind == "neulite":
                x = rest[0] if self.uses_raw_input else features
                z = m.classifier.features(h)
                data_loss = (
                    data_loss
                    - self.l1 * nhsic(h, x, self.sigma)
                    - self.l2 * nhsic(m.projector(z), one_hot(labels, m.num_classes), self.sigma)
                )
        return data_loss * scale, logits, data_loss


class InferenceGraph(Mirror):
    """x -> logits of the model as stage t sees it (the full model for the last grow stage and 'full'). A width stage's
    normalises by batch statistics (HeteroFL's static BatchNorm, see norms.BatchStatNorm). depth-k's is its deepest
    classifier: blocks 0..k-1 then block k-1's head, whose BatchNorms use batch statistics as in training (depth-T's
    is the full model's)."""

    def __init__(self, model: BlockModel, spec: StageSpec):
        if spec.kind == "width":
            model = with_batch_statistics(model)
        t = {"full": model.T - 1, "width": model.T - 1, "depth": spec.block - 1}.get(spec.kind, spec.block)
        paths = [f"blocks.{k}" for k in range(t + 1)] + [f"basics.{k}" for k in range(t + 1, model.T)]
        if spec.kind == "distill":  # the student: basic layer t in place of block t
            paths[t] = f"basics.{t}"
        super().__init__(model, paths + ["classifier"])
        self.paths = paths
        self.batch_stats = ("basics.",) if spec.kind == "depth" else ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m.classifier(_run(self.m, self.paths, x, self.batch_stats))


class TeacherGraph(Mirror):
    """features -> logits through the real block t and its output module."""

    def __init__(self, model: BlockModel, spec: StageSpec):
        t = spec.block
        self.paths = [f"blocks.{t}"] + [f"basics.{k}" for k in range(t + 1, model.T)]
        super().__init__(model, self.paths + ["classifier"])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.m.classifier(_run(self.m, self.paths, features))


@dataclass
class StageGraphs:
    spec: StageSpec
    prefix: PrefixGraph | None
    train: TrainGraph
    inference: InferenceGraph
    teacher: TeacherGraph | None


def build_stage(model: BlockModel, spec: StageSpec, neulite: NeuLiteWeights | None = None) -> StageGraphs:
    blocks_ok = {"width": spec.block >= 1, "depth": 1 <= spec.block <= model.T}.get(spec.kind, 0 <= spec.block < model.T)
    if spec.kind not in KINDS or not blocks_ok or (spec.kind == "distill" and spec.block == 0):
        raise ValueError(f"stage {spec.name} does not exist for a model of {model.T} blocks")
    if spec.kind == "depth" and any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.classifier.modules()):
        raise ValueError(f"stage {spec.name}: the classifier runs once per head and holds a BatchNorm, whose running "
                         "statistics ORT and torch would move differently: use a classifier without BatchNorm")
    frozen, _ = _prefix_split(model, spec)
    return StageGraphs(
        spec=spec,
        prefix=PrefixGraph(model, frozen) if frozen else None,
        train=TrainGraph(model, spec, neulite or NeuLiteWeights()),
        inference=InferenceGraph(model, spec),
        teacher=TeacherGraph(model, spec) if spec.kind == "distill" else None,
    )
