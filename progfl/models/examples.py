"""Models a user would bring (`--model module:function`), shipped as examples and as the cases tests and benchmarks
need: `progfl export --model progfl.models.examples:depthwise_separable --input-shape 1,28,28 ...`."""

from __future__ import annotations

from torch import nn


def depthwise_separable() -> nn.Sequential:
    """A cheap grey-image CNN: a 3x3 conv stem (a depthwise conv on one channel would see a single filter), then
    depthwise 3x3 + pointwise 1x1 + BN + ReLU units, widths 16/32/64, in three blocks (10.7k parameters). A full 3x3
    conv from 16 to 32 channels alone (4.6k) costs more than the whole block it stands for (2.1k): the case where
    conv output modules would train more than full-model training."""
    def unit(ci: int, co: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(ci, ci, 3, stride, 1, groups=ci, bias=False), nn.Conv2d(ci, co, 1, bias=False),
                             nn.BatchNorm2d(co), nn.ReLU())
    stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    return nn.Sequential(nn.Sequential(stem, unit(16, 16, 1)), nn.Sequential(unit(16, 32, 2), unit(32, 32, 1)),
                         nn.Sequential(unit(32, 64, 2), unit(64, 64, 1)))
