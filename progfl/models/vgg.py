"""VGG-11 with normalisation, one block per max-pool group."""

from __future__ import annotations

from torch import nn

from .base import BlockModel, Classifier, Shape
from .cnn import conv_unit

VGG11 = [[64], [128], [256, 256], [512, 512], [512, 512]]  # conv widths per group; each group ends in 'M'


def vgg11(
    num_classes: int = 10,
    input_shape: Shape = (3, 32, 32),
    norm: str = "batch",
    width: int | None = None,
    projector_hidden: list[int] | None = None,
) -> BlockModel:
    """Channels scale with width/64. ceil_mode pools take 28x28 to 1x1 as they take 32x32 (28,14,7,4,2,1)."""
    w = width or 64
    cin, blocks = input_shape[0], []
    for group in VGG11:
        units: list[nn.Module] = []
        for c in group:
            cout = c * w // 64
            units.append(conv_unit(cin, cout, norm))
            cin = cout
        units.append(nn.MaxPool2d(2, ceil_mode=True))
        blocks.append(nn.Sequential(*units))
    config = dict(
        name="vgg11", num_classes=num_classes, input_shape=list(input_shape), norm=norm, width=w,
        projector_hidden=projector_hidden,
    )
    return BlockModel("vgg11", blocks, Classifier(cin, num_classes, "avg"), input_shape, num_classes,
                      projector_hidden, config)
