"""A small CNN for 28x28 grey images (FEMNIST-like), and the conv+norm+ReLU unit the conv models share."""

from __future__ import annotations

from torch import nn

from .base import BlockModel, Classifier, Shape
from .norms import norm2d


def conv_unit(cin: int, cout: int, norm: str, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias: the norm's shift replaces it) + norm + ReLU, one unit of a block."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        norm2d(norm, cout),
        nn.ReLU(inplace=True),
    )


def cnn(
    num_classes: int = 10,
    input_shape: Shape = (1, 28, 28),
    norm: str = "batch",
    width: int | None = None,
    projector_hidden: list[int] | None = None,
) -> BlockModel:
    """3 blocks of width w, 2w, 4w channels (default w=32); the first two halve the map with a max-pool."""
    w = width or 32
    cin = input_shape[0]
    blocks = [
        nn.Sequential(conv_unit(cin, w, norm), nn.MaxPool2d(2)),
        nn.Sequential(conv_unit(w, 2 * w, norm), nn.MaxPool2d(2)),
        nn.Sequential(conv_unit(2 * w, 4 * w, norm)),
    ]
    config = dict(
        name="cnn", num_classes=num_classes, input_shape=list(input_shape), norm=norm, width=w,
        projector_hidden=projector_hidden,
    )
    return BlockModel("cnn", blocks, Classifier(4 * w, num_classes, "avg"), input_shape, num_classes,
                      projector_hidden, config)
