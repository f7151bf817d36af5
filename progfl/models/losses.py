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


STOP_GRADIENT_SCALE = 2.0 ** 30  # stop_gradient's resolution: 2^-30 (|x| must stay below 2^33)


def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    """x's value (to 2^-30) as a constant of the gradient, in torch and in the exported ORT training graph alike.

    torch's ONNX exporter drops detach() (ONNX has no stop-gradient), so ORT's gradient builder would differentiate
    through a detached tensor (measured on 1.19.2: gradients off by 0.2 on a two-head KL). An integer tensor has no
    gradient in either: torch's autograd ends at the cast to int64, and ORT's gradient builder treats a Cast to a
    non-float type as a stop-gradient edge. The round trip x -> round-toward-zero(x * 2^30) -> / 2^30 is exact for
    float32 values of magnitude >= 2^-6 and within 2^-30 below that; |x| must stay below 2^33 (int64 range)."""
    return (x * STOP_GRADIENT_SCALE).to(torch.int64).to(x.dtype) / STOP_GRADIENT_SCALE


def depthfl(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """DepthFL's local loss (Kim et al., ICLR 2023) over the k classifiers of a depth-k sub-model, shallow to deep:
    sum_j CE(z_j, y) + 1/(k-1) sum_j sum_{i != j} KL(softmax(z_i) || softmax(z_j)), the target side of each KL a
    constant (mutual self-distillation: every classifier learns from the others, none is pulled towards its student),
    temperature 1, batch mean. k = 1: cross-entropy alone."""
    loss = sum(cross_entropy(z, labels) for z in logits)
    k = len(logits)
    if k == 1:
        return loss
    targets = [stop_gradient(z) for z in logits]
    p = [F.softmax(t, dim=1) for t in targets]
    log_p = [F.log_softmax(t, dim=1) for t in targets]
    log_q = [F.log_softmax(z, dim=1) for z in logits]
    kd = sum((p[i] * (log_p[i] - log_q[j])).sum(dim=1).mean() for j in range(k) for i in range(k) if i != j)
    return loss + kd / (k - 1)
