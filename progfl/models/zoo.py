"""Named models and `build_model`, which rebuilds any of them from its stored `config`."""

from __future__ import annotations

from collections.abc import Callable

from .base import BlockModel, Shape
from .cnn import cnn
from .resnet import resnet18, resnet34
from .vgg import vgg11
from .vit import vit

ZOO: dict[str, Callable[..., BlockModel]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "vgg11": vgg11,
    "cnn": cnn,
    "vit": vit,
}


def build_model(
    name: str,
    num_classes: int = 10,
    input_shape: Shape | list[int] = (3, 32, 32),
    norm: str = "batch",
    width: int | None = None,
    output_module: str | None = None,
    **kw,
) -> BlockModel:
    """A zoo model; `build_model(**model.config)` gives the same architecture (and, seeded, the same weights).
    output_module: the kind of basic layer (linear, conv, light; see base.basic_layer), default DEFAULT_OUTPUT_MODULE.
    The model is built with the default kind and then switched, as export_model switches one, so both ways of
    getting a kind draw the same weights."""
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(ZOO)}")
    model = ZOO[name](num_classes=num_classes, input_shape=tuple(input_shape), norm=norm, width=width, **kw)
    return model.set_output_modules(output_module) if output_module else model


def load_model(spec: str, num_classes: int, input_shape: Shape, norm: str = "batch", width: int | None = None,
               seed: int = 0, output_module: str | None = None) -> BlockModel:
    """A zoo name, or 'package.module:function' whose function returns an nn.Sequential of blocks (your model).
    output_module: the kind of basic layer (default: DEFAULT_OUTPUT_MODULE), applied as build_model does."""
    import importlib

    import torch
    from torch import nn

    from .sequential import from_sequential

    torch.manual_seed(seed)
    if ":" not in spec:
        return build_model(spec, num_classes, input_shape, norm, width, output_module)
    module, _, fn = spec.partition(":")
    try:
        seq = getattr(importlib.import_module(module), fn)()
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load model {spec!r}: {e}") from None
    if not isinstance(seq, nn.Sequential):
        raise ValueError(f"{spec} returned {type(seq).__name__}, expected an nn.Sequential of blocks")
    model = from_sequential(seq, input_shape, num_classes, name=spec)
    return model.set_output_modules(output_module) if output_module else model
