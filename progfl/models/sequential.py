"""Bring your own model: an nn.Sequential whose children are the blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import BlockModel, Classifier, Shape
from .norms import make_exportable

POOLS = {3: "avg", 2: "tokens", 1: "none"}  # rank of the last block's output (no batch dim) -> pooling


@torch.no_grad()
def _output_shape(blocks: list[nn.Module], input_shape: Shape) -> Shape:
    """The last block's output shape (eval-mode dry run): the classifier is sized before BlockModel exists."""
    modes = [b.training for b in blocks]
    h = torch.zeros(2, *input_shape)
    try:
        for b in blocks:
            h = b.eval()(h)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"the blocks do not accept input shape {list(input_shape)}: {e}") from None
    finally:
        for b, mode in zip(blocks, modes):
            b.train(mode)
    return tuple(h.shape[1:])


def from_sequential(
    seq: nn.Sequential,
    input_shape: Shape,
    num_classes: int,
    name: str = "custom",
    projector_hidden: Sequence[int] | None = None,
) -> BlockModel:
    """Each child of `seq` is one block (a non-Sequential child becomes a one-unit block). Torch's GroupNorm and
    LayerNorm are swapped in place for the exportable drop-ins. The classifier pools by the output's rank."""
    if len(seq) == 0:
        raise ValueError("from_sequential needs a non-empty nn.Sequential")
    make_exportable(seq)
    blocks = [c if isinstance(c, nn.Sequential) else nn.Sequential(c) for c in seq]
    out = _output_shape(blocks, tuple(input_shape))
    if len(out) not in POOLS:
        raise ValueError(f"the last block outputs shape {list(out)}: expected (C,H,W), (L,D) or (D,)")
    classifier = Classifier(out[0] if len(out) == 3 else out[-1], num_classes, POOLS[len(out)])
    config = dict(name=name, num_classes=num_classes, input_shape=list(input_shape), projector_hidden=projector_hidden)
    return BlockModel(name, blocks, classifier, input_shape, num_classes, projector_hidden, config)
