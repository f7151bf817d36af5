"""Norm layers that ONNX Runtime training can differentiate.

ORT 1.19 has no gradient for the InstanceNormalization that torch exports for GroupNorm, and its
LayerNorm gradient needs outputs the exporter leaves out. These drop-ins compute the same thing with
primitive ops and keep torch's state_dict keys, so weights move freely between the two.
"""

from __future__ import annotations

import torch
from torch import nn


class GroupNorm(nn.Module):
    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        g = x.reshape(n, self.num_groups, -1)
        mean = g.mean(dim=2, keepdim=True)
        var = ((g - mean) ** 2).mean(dim=2, keepdim=True)
        g = (g - mean) / torch.sqrt(var + self.eps)
        shape = [1, c] + [1] * (x.dim() - 2)
        return g.reshape(x.shape) * self.weight.reshape(shape) + self.bias.reshape(shape)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def norm2d(kind: str, channels: int) -> nn.Module:
    """BatchNorm (the papers' default) or GroupNorm (batch-size independent, exact under accumulation)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return GroupNorm(min(32, channels // 4) or 1, channels)
    raise ValueError(f"unknown norm {kind!r}: use 'batch' or 'group'")


def make_exportable(module: nn.Module) -> nn.Module:
    """Swap torch's GroupNorm/LayerNorm inside a user model for the drop-ins above, weights kept."""
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm) and child.affine:
            new = GroupNorm(child.num_groups, child.num_channels, child.eps)
        elif isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1 and child.elementwise_affine:
            new = LayerNorm(child.normalized_shape[0], child.eps)
        else:
            make_exportable(child)
            continue
        new.load_state_dict(child.state_dict())
        setattr(module, name, new)
    return module
