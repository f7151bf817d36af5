"""Norm layers that ONNX Runtime training can differentiate.

ORT 1.19 has no gradient for the InstanceNormalization that torch exports for GroupNorm, and its
LayerNorm gradient needs outputs the exporter leaves out. These drop-ins compute the same thing with
primitive ops and keep torch's state_dict keys, so weights move freely between the two.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class GroupNorm(nn.Module):
    """torch's GroupNorm in primitive ops, with no shape read from the input at run time. Reshaping x by its own
    shape exports Shape/Gather/Concat ops, and ORT 1.19's gradient of a Mul fed through them broke once two such
    norms were in one training graph (a full stage segfaulted at its first step; without graph optimizations:
    "Can broadcast 0 by 0 or 1"). Here only the per-channel means are regrouped, by -1 and constant sizes."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self._group_mean(x)
        x = centred / torch.sqrt(self._group_mean(centred * centred) + self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.reshape(shape) + self.bias.reshape(shape)

    def _group_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of t (N, C, ...) over each group's channels and positions, per channel: (N, C, 1, ...). Exact
        as a mean of channel means, since every channel of a group has as many positions."""
        per_group = self.num_channels // self.num_groups
        m = t.mean(dim=tuple(range(2, t.dim()))).reshape(-1, self.num_groups, per_group).mean(dim=2, keepdim=True)
        return m.repeat(1, 1, per_group).reshape((-1, self.num_channels) + (1,) * (t.dim() - 2))


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


class BatchStatNorm(nn.Module):
    """BatchNorm that always normalises by the batch's own statistics, in primitive ops, and keeps no running ones:
    HeteroFL's static BatchNorm at inference without the statistics query (track_running_stats=False in torch). The
    width-scaled sub-models train slices of each channel with different neighbours, so running statistics averaged
    across them describe no model; the width stages' inference graphs normalise each evaluation batch by itself."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = bn.eps
        self.weight, self.bias = bn.weight, bn.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalise_by_batch(x, self.weight, self.bias, self.eps)


def normalise_by_batch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """BatchNorm's arithmetic with the batch's own per-channel statistics (channels on axis 1), in primitive ops."""
    axes = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.reshape(shape) + bias.reshape(shape)


def with_batch_statistics(module: nn.Module) -> nn.Module:
    """A copy of `module` whose BatchNorms normalise by batch statistics (BatchStatNorm), weights and names kept."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, BatchStatNorm(child))
    return module


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
