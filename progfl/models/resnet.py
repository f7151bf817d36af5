"""CIFAR-style ResNet-18/34: 3x3 stem without max-pool, one block per stage, the stem inside block 0."""

from __future__ import annotations

import torch
from torch import nn

from .base import BlockModel, Classifier, Shape
from .cnn import conv_unit
from .norms import norm2d


class BasicBlock(nn.Module):
    """Two 3x3 convs plus a shortcut (1x1 conv + norm when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm2d(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = norm2d(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm2d(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.norm1(self.conv1(x)))
        return self.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


def _resnet(
    name: str,
    units: list[int],
    num_classes: int,
    input_shape: Shape,
    norm: str,
    width: int | None,
    projector_hidden: list[int] | None,
) -> BlockModel:
    w = width or 64
    cin = w
    blocks = []
    for stage, n in enumerate(units):
        cout = w * 2**stage
        layers: list[nn.Module] = [conv_unit(input_shape[0], w, norm)] if stage == 0 else []
        for i in range(n):
            layers.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, norm))
            cin = cout
        blocks.append(nn.Sequential(*layers))
    config = dict(
        name=name, num_classes=num_classes, input_shape=list(input_shape), norm=norm, width=w,
        projector_hidden=projector_hidden,
    )
    return BlockModel(name, blocks, Classifier(cin, num_classes, "avg"), input_shape, num_classes,
                      projector_hidden, config)


def resnet18(
    num_classes: int = 10,
    input_shape: Shape = (3, 32, 32),
    norm: str = "batch",
    width: int | None = None,
    projector_hidden: list[int] | None = None,
) -> BlockModel:
    return _resnet("resnet18", [2, 2, 2, 2], num_classes, input_shape, norm, width, projector_hidden)


def resnet34(
    num_classes: int = 10,
    input_shape: Shape = (3, 32, 32),
    norm: str = "batch",
    width: int | None = None,
    projector_hidden: list[int] | None = None,
) -> BlockModel:
    return _resnet("resnet34", [3, 4, 6, 3], num_classes, input_shape, norm, width, projector_hidden)
