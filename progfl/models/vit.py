"""A small ViT written with plain ops (reshape, matmul, softmax, GELU) so ONNX training graphs can carry it.

nn.MultiheadAttention and nn.TransformerEncoderLayer take fused paths that do not export to ORT training.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import BlockModel, Classifier, Shape
from .norms import LayerNorm


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (N, L, D) + learned positions; no class token, the classifier mean-pools."""

    def __init__(self, in_channels: int, dim: int, patch: int, num_patches: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, num_patches, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class Attention(nn.Module):
    """Multi-head self-attention with one qkv projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT dim {dim} is not divisible by {heads} heads")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, length, dim))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def vit(
    num_classes: int = 10,
    input_shape: Shape = (3, 32, 32),
    norm: str = "batch",
    width: int | None = None,
    projector_hidden: list[int] | None = None,
    patch: int = 4,
    depth: int = 6,
    layers_per_block: int = 2,
    heads: int | None = None,
    mlp_ratio: int = 4,
) -> BlockModel:
    """width is the token dimension (default 192; heads default dim // 64, at least 1). Transformers always
    normalise tokens with LayerNorm, so `norm` (kept for a uniform zoo signature) is only validated."""
    if norm not in ("batch", "group"):
        raise ValueError(f"unknown norm {norm!r}: use 'batch' or 'group'")
    if depth % layers_per_block:
        raise ValueError(f"ViT depth {depth} is not a multiple of layers_per_block {layers_per_block}")
    dim = width or 192
    heads = heads or max(1, dim // 64)
    c, h, w = input_shape
    if h % patch or w % patch:
        raise ValueError(f"ViT patch {patch} does not tile the {h}x{w} input")
    layers = [EncoderLayer(dim, heads, mlp_ratio) for _ in range(depth)]
    blocks = [nn.Sequential(*layers[i : i + layers_per_block]) for i in range(0, depth, layers_per_block)]
    blocks[0].insert(0, PatchEmbed(c, dim, patch, (h // patch) * (w // patch)))
    config = dict(
        name="vit", num_classes=num_classes, input_shape=list(input_shape), norm=norm, width=dim,
        projector_hidden=projector_hidden, patch=patch, depth=depth, layers_per_block=layers_per_block,
        heads=heads, mlp_ratio=mlp_ratio,
    )
    classifier = Classifier(dim, num_classes, "tokens", norm=LayerNorm(dim))
    return BlockModel("vit", blocks, classifier, input_shape, num_classes, projector_hidden, config)
