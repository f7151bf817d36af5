"""A classifier cut into blocks, with the cheap stand-ins that make each block trainable on its own.

The global model is `blocks` (T real blocks), `basics` (basics[k] is ProFL's basic layer: one cheap
layer with block k's change of shape, standing in for block k), a shared `classifier` and NeuLite's
`projector`. The output module of block t is basics[t+1..T-1] followed by the classifier, so output
modules share weights the way ProFL's shrinking produces them. Parameter names of this module are the
global names every other part of progfl uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

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


def basic_layer(in_shape: Shape, out_shape: Shape) -> nn.Module:
    """One layer with a block's change of shape: a 3x3 conv (stride from the spatial change) or a Linear.
    Never Identity: ProFL fits it by distillation, so it must have weights."""
    if len(in_shape) == 3 and len(out_shape) == 3:
        (ci, hi, wi), (co, ho, wo) = in_shape, out_shape
        stride = max(1, -(-hi // ho))  # round up: 7 -> 4 is a stride-2 conv (an adaptive pool 7->4 does not export)
        conv = nn.Conv2d(ci, co, 3, stride=stride, padding=1)
        if ((hi - 1) // stride + 1, (wi - 1) // stride + 1) == (ho, wo):
            return conv
        return nn.Sequential(conv, nn.AdaptiveAvgPool2d((ho, wo)))
    if len(in_shape) == len(out_shape) and len(in_shape) in (1, 2) and in_shape[:-1] == out_shape[:-1]:
        return nn.Linear(in_shape[-1], out_shape[-1])
    raise ValueError(f"no basic layer maps a block input {in_shape} to its output {out_shape}")


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
        self.basics = nn.ModuleDict({str(k): basic_layer(self.shapes[k], self.shapes[k + 1]) for k in range(1, self.T)})
        feat = self.classifier.fc.in_features
        hidden = projector_hidden if projector_hidden is not None else (4 * feat, 2 * feat)
        self.projector = Projector(feat, hidden)

    @property
    def T(self) -> int:
        return len(self.blocks)

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
