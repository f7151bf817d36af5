"""Losses computed inside the exported training graph (ORT then differentiates them as they are)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel_minus_one(a: torch.Tensor, sigma: float) -> torch.Tensor:
    """K_ij - 1 with K_ij = exp(-||a_i - a_j||^2 / (2 sigma^2 d)) on the flattened rows of a.

    With sigma = 5 and the 1/d scaling, K is within a few percent of 1 everywhere, so centring K in float32
    subtracts nearly equal numbers and HSIC's gradient becomes noise-dominated (ORT and torch then drift apart
    within a few steps, both away from float64). Centring ignores constants, so we centre K - 1 instead,
    computed to full relative precision as expm1(x) = 2 tanh(x/2) / (1 - tanh(x/2)) (ONNX has no Expm1).
    Rows are centred first: distances do not change, and ||a_i||^2 + ||a_j||^2 - 2 a_i.a_j loses less to
    cancellation. The diagonal comes out as +-rounding around 0 and stays unclamped (a ReLU kink there would
    flip the gradient with rounding)."""
    a = a.flatten(1)
    a = a - a.mean(dim=0, keepdim=True)
    sq = (a * a).sum(dim=1, keepdim=True)
    dist = sq + sq.t() - 2.0 * (a @ a.t())
    t = torch.tanh(-dist / (4.0 * sigma * sigma * a.shape[1]))
    return 2.0 * t / (1.0 - t)


def _centre(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T/m, written without building H."""
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()


def nhsic(a: torch.Tensor, b: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """Normalized HSIC(a, b) = HSIC(a,b) / sqrt(HSIC(a,a) HSIC(b,b)); the 1/(m-1)^2 factors cancel."""
    ka, kb = _centre(gaussian_kernel_minus_one(a, sigma)), _centre(gaussian_kernel_minus_one(b, sigma))
    return (ka * kb).sum() / torch.sqrt((ka * ka).sum() * (kb * kb).sum() + 1e-12)


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return (y.unsqueeze(1) == torch.arange(num_classes, device=y.device).unsqueeze(0)).float()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return ((student - teacher) ** 2).mean()
