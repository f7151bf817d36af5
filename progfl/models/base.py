"""A classifier cut into blocks, with the cheap stand-ins that make each block trainable on its own.

The global model is `blocks` (T real blocks), `basics` (basics[k] is ProFL's basic layer: one cheap
layer with block k's change of shape, standing in for block k; its kind, linear|conv|light, is the model's
`output_module`), a shared `classifier` and NeuLite's `projector`. The output module of block t is
basics[t+1..T-1] followed by the classifier, so output modules share weights the way ProFL's shrinking
produces them. Parameter names of this module are the
global names every other part of progfl uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .norms import GroupNorm, LayerNorm, norm2d

Shape = tuple[int, ...]


class Classifier(nn.Module):
    """Pool the last feature map (or tokens) to a vector, then a linear layer. `features` is what NeuLite projects."""

    def __init__(self, in_features: int, num_classes: int, pool: str = "avg", norm: nn.Module | None = None):
        super().__init__()
        if pool not in ("avg", "tokens", "none"):
            raise ValueError(f"unknown pooling {pool!r}")
        self.pool = pool
        self.norm = norm
        self.fc = nn.Linear(in_features, num_classes)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            h = self.norm(h)
        if self.pool == "avg":
            return h.mean(dim=(2, 3))
        if self.pool == "tokens":
            return h.mean(dim=1)
        return h.flatten(1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(h))


class Projector(nn.Module):
    """NeuLite's projector: linear layers without activations on the pooled feature, used only by the label term."""

    def __init__(self, dim: int, hidden: Sequence[int]):
        super().__init__()
        dims = [dim, *hidden, dim]
        self.layers = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


OUTPUT_MODULES = ("conv", "light", "linear")  # the kinds of basic layer, in the order `auto` falls back along
DEFAULT_OUTPUT_MODULE = "conv"  # what a model is built with and `auto` starts from (evidence: benchmarks/README.md)


def _stride_and_pool(in_shape: Shape, out_shape: Shape) -> tuple[int, nn.Module | None]:
    """The stride of a 3x3 conv taking in_shape's map towards out_shape's, and the adaptive pool that finishes the
    job when no stride lands exactly (None when one does)."""
    (_, hi, wi), (_, ho, wo) = in_shape, out_shape
    stride = max(1, -(-hi // ho))  # round up: 7 -> 4 is a stride-2 conv (an adaptive pool 7->4 does not export)
    if ((hi - 1) // stride + 1, (wi - 1) // stride + 1) == (ho, wo):
        return stride, None
    return stride, nn.AdaptiveAvgPool2d((ho, wo))


def _map_layer(in_shape: Shape, out_shape: Shape, kind: str, norm: str) -> nn.Module:
    ci, co = in_shape[0], out_shape[0]
    stride, pool = _stride_and_pool(in_shape, out_shape)
    if kind == "linear":
        layers: list[nn.Module] = [nn.Conv2d(ci, co, 3, stride=stride, padding=1)]
        return layers[0] if pool is None else nn.Sequential(layers[0], pool)  # ProFL's names: basics.k.weight
    if kind == "conv":
        layers = [nn.Conv2d(ci, co, 3, stride=stride, padding=1, bias=False)]
    else:  # light: depthwise 3x3 (carries the stride) + pointwise 1x1
        layers = [nn.Conv2d(ci, ci, 3, stride=stride, padding=1, groups=ci, bias=False),
                  nn.Conv2d(ci, co, 1, bias=False)]
    layers += [norm2d(norm, co), nn.ReLU()]
    return nn.Sequential(*layers, *([pool] if pool is not None else []))


def basic_layer(in_shape: Shape, out_shape: Shape, kind: str = "linear", norm: str = "batch") -> nn.Module:
    """One layer with a block's change of shape, standing in for that block. Never Identity: ProFL fits it by
    distillation, so it must have weights.

    Feature maps (C,H,W) -> (C',H',W'); the stride of the 3x3 conv is ceil(H/H'), and an adaptive average pool
    follows when no stride gives H'xW' exactly:
      linear  ProFL's basic layer: 3x3 conv with bias, no norm, no activation (a chain of them is a linear map)
      conv    3x3 conv (no bias) + norm + ReLU
      light   depthwise 3x3 conv (carries the stride) + pointwise 1x1 conv, no bias + norm + ReLU; for models whose
              blocks are themselves cheap (depthwise-separable), where a full 3x3 conv costs more than the block
    `norm` is "batch" (BatchNorm2d) or "group" (progfl's exportable GroupNorm), as progfl.models.norms.norm2d.
    Tokens (L,D) -> (L,D'): linear = Linear; conv and light = Linear + LayerNorm (progfl's drop-in) + GELU.
    Vectors (D,) -> (D',): linear = Linear; conv and light = Linear + ReLU.
    """
    if kind not in OUTPUT_MODULES:
        raise ValueError(f"unknown output module {kind!r}: use {', '.join(OUTPUT_MODULES)}")
    if len(in_shape) == 3 and len(out_shape) == 3:
        return _map_layer(in_shape, out_shape, kind, norm)
    if len(in_shape) == len(out_shape) and len(in_shape) in (1, 2) and in_shape[:-1] == out_shape[:-1]:
        fc = nn.Linear(in_shape[-1], out_shape[-1])
        if kind == "linear":
            return fc
        if len(in_shape) == 2:
            return nn.Sequential(fc, LayerNorm(out_shape[-1]), nn.GELU())
        return nn.Sequential(fc, nn.ReLU())
    raise ValueError(f"no basic layer maps a block input {in_shape} to its output {out_shape}")


def run_frozen(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A frozen layer inside a training graph, as in eval mode: BatchNorm from its running statistics, written with
    primitive ops (ORT forces every BatchNormalization node of a training graph into training mode, and its running
    statistics would move). Other layers do not depend on the mode."""
    for mod in (layer if isinstance(layer, nn.Sequential) else [layer]):
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            shape = [1, -1] + [1] * (h.dim() - 2)
            scale = mod.weight / torch.sqrt(mod.running_var + mod.eps)
            h = (h - mod.running_mean.reshape(shape)) * scale.reshape(shape) + mod.bias.reshape(shape)
        else:
            h = mod(h)
    return h


class BlockModel(nn.Module):
    """blocks[0..T-1] + basics + classifier (+ projector). Each block is an nn.Sequential of units."""

    def __init__(
        self,
        name: str,
        blocks: Sequence[nn.Module],
        classifier: Classifier,
        input_shape: Shape,
        num_classes: int,
        projector_hidden: Sequence[int] | None = None,
        config: dict | None = None,
    ):
        super().__init__()
        if len(blocks) < 1:
            raise ValueError("a model needs at least one block")
        self.name, self.input_shape, self.num_classes = name, tuple(input_shape), num_classes
        self.config = dict(config or {})
        self.blocks = nn.ModuleList(blocks)
        self.classifier = classifier
        self.shapes = self._trace_shapes()
        self.basics = nn.ModuleDict()
        self.set_output_modules(DEFAULT_OUTPUT_MODULE)
        feat = self.classifier.fc.in_features
        hidden = projector_hidden if projector_hidden is not None else (4 * feat, 2 * feat)
        self.projector = Projector(feat, hidden)

    @property
    def T(self) -> int:
        return len(self.blocks)

    @property
    def output_module(self) -> str:
        return self.config["output_module"]

    def basic_norm(self) -> str:
        """The norm of the basic layers: the model's own setting, else GroupNorm when the blocks use it."""
        if self.config.get("norm") in ("batch", "group"):
            return self.config["norm"]
        return "group" if any(isinstance(m, (GroupNorm, nn.GroupNorm)) for m in self.blocks.modules()) else "batch"

    def set_output_modules(self, kind: str) -> BlockModel:
        """Build the basic layers of `kind` (see basic_layer), freshly initialised, and record the kind in config so
        that build_model(**config) rebuilds the same architecture. Nothing changes when the kind is already set."""
        if kind not in OUTPUT_MODULES:
            raise ValueError(f"unknown output module {kind!r}: use {', '.join(OUTPUT_MODULES)}")
        if self.config.get("output_module") == kind and (len(self.basics) == self.T - 1):
            return self
        norm = self.basic_norm()
        self.basics = nn.ModuleDict(
            {str(k): basic_layer(self.shapes[k], self.shapes[k + 1], kind, norm) for k in range(1, self.T)})
        self.basics.train(self.training)
        self.config["output_module"] = kind
        return self

    @torch.no_grad()
    def _trace_shapes(self) -> list[Shape]:
        """shapes[k] = input shape of block k; shapes[T] = the last block's output (batch dim dropped)."""
        was = self.training
        self.eval()
        try:
            h = torch.zeros(2, *self.input_shape)
            shapes = [tuple(h.shape[1:])]
            for b in self.blocks:
                h = b(h)
                shapes.append(tuple(h.shape[1:]))
        except (RuntimeError, ValueError, IndexError, TypeError) as e:  # torch raises all of these for shapes
            raise ValueError(f"the blocks do not accept input shape {list(self.input_shape)}: {e}") from None
        finally:
            self.train(was)
        return shapes

    def run_blocks(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for k in range(start, stop):
            h = self.blocks[k](h)
        return h

    def head(self, h: torch.Tensor, t: int) -> torch.Tensor:
        """The output module of block t up to the classifier's input: basics[t+1..T-1]."""
        for k in range(t + 1, self.T):
            h = self.basics[str(k)](h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.run_blocks(x, 0, self.T))

    def forward_stage(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Logits of the model as stage t sees it: blocks 0..t, then block t's output module."""
        return self.classifier(self.head(self.run_blocks(x, 0, t + 1), t))
