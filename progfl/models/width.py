"""Width-scaled sub-models (HeteroFL, FedRolex, AllSmall): the model at 1/d of every hidden layer's width.

A sub-model is the zoo model rebuilt with its width divided by d (rounded up, as HeteroFL rounds): every hidden
layer's channels shrink by d, the input channels and the classes stay. Its arrays have the global names and are
slices of the global arrays; `sliced_axes` says which axes are cut (manifest.Stage.slices), manifest.channel_window
which channels they hold.
"""

from __future__ import annotations

import math

from .base import BlockModel
from .zoo import ZOO, build_model

SLICEABLE = ("resnet18", "resnet34", "vgg11", "cnn")  # ViT's fused q/k/v rows would be cut across heads


def width_model(model: BlockModel, divisor: int) -> BlockModel:
    """`model` at 1/divisor of its width, freshly initialised (a device receives its weights sliced from the global
    model every round; the values here only fill the exported files)."""
    name, width = model.config.get("name"), model.config.get("width")
    if name not in SLICEABLE or name not in ZOO or width is None:
        raise ValueError(f"width stages need a zoo model with a channel width ({', '.join(SLICEABLE)}); {model.name} "
                         f"has none to slice")
    if divisor < 1:
        raise ValueError(f"a width divisor must be >= 1, got {divisor}")
    sub = build_model(**{**model.config, "width": math.ceil(width / divisor)})
    sub.train(model.training)
    return sub


def sliced_axes(global_shapes: dict[str, list[int]], sub_shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """For each sub-model array, the axes on which it is smaller than the global array (only arrays cut somewhere)."""
    out = {}
    for name, shape in sub_shapes.items():
        whole = global_shapes[name]
        if len(whole) != len(shape) or any(k > n for n, k in zip(whole, shape)):
            raise ValueError(f"{name}: sub-model shape {shape} is not a slice of {whole}")
        axes = [a for a, (n, k) in enumerate(zip(whole, shape)) if k < n]
        if axes:
            out[name] = axes
    return out
