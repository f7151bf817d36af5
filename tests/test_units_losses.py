"""Unit tests of the losses inside the exported training graphs (progfl/models/losses.py), in plain torch.

Each loss is checked against its textbook formula written here in numpy float64 (the Gaussian kernel through exp,
HSIC through the centring matrix H, KL through its definition), not against the rewritten forms losses.py uses to
stay exportable and precise (expm1 through tanh, centring without H, stop-gradient through an integer cast).
test_loss_reference.py checks the same losses through ONNX Runtime; these run in milliseconds, without an export.
(Written for issue 13's mutation testing: `make mutation`.)
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from progfl.models.losses import (
    STOP_GRADIENT_SCALE,
    _centre,
    cross_entropy,
    depthfl,
    gaussian_kernel_minus_one,
    mse,
    nhsic,
    one_hot,
    stop_gradient,
)


def kernel_ref(a: np.ndarray, sigma: float) -> np.ndarray:
    """K_ij = exp(-||a_i - a_j||^2 / (2 sigma^2 d)) on the flattened rows, float64, by the definition."""
    a = a.reshape(len(a), -1).astype(np.float64)
    d = a.shape[1]
    dist = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    return np.exp(-dist / (2 * sigma * sigma * d))


def nhsic_ref(a: np.ndarray, b: np.ndarray, sigma: float) -> float:
    """HSIC(a,b) / sqrt(HSIC(a,a) HSIC(b,b)) with HSIC = tr(K_a H K_b H) / (m-1)^2, H = I - 11^T/m."""
    m = len(a)
    h = np.eye(m) - np.ones((m, m)) / m

    def hsic(k: np.ndarray, l_: np.ndarray) -> float:
        return float(np.trace(k @ h @ l_ @ h)) / (m - 1) ** 2

    ka, kb = kernel_ref(a, sigma), kernel_ref(b, sigma)
    return hsic(ka, kb) / math.sqrt(hsic(ka, ka) * hsic(kb, kb))


def t64(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, np.float64))


@pytest.mark.parametrize("sigma", [5.0, 0.7])
def test_kernel_minus_one_is_the_gaussian_kernel_less_one(sigma: float) -> None:
    """Against exp() of the squared distances scaled by 2 sigma^2 d (d: scalars per row, here 2 x 3 = 6)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 2, 3))
    got = gaussian_kernel_minus_one(t64(a), sigma).numpy()
    np.testing.assert_allclose(got, kernel_ref(a, sigma) - 1.0, rtol=1e-9, atol=1e-14)
    assert got.shape == (7, 7)
    np.testing.assert_allclose(np.diag(got), 0.0, atol=1e-12)


def test_kernel_minus_one_keeps_its_precision_in_float32_far_from_the_origin() -> None:
    """Rows far from the origin but close together: K - 1 is tiny, and in float32 it stays within 1e-3 relative of
    float64's only because each feature is centred over the rows before the norms are expanded (||a_i||^2 ~ 8e6
    would swamp it; the features' offsets differ in sign, so subtracting one overall mean would not help)."""
    rng = np.random.default_rng(1)
    a = 1000.0 * np.array([1.0, -1.0] * 4) + 0.05 * rng.standard_normal((6, 8))  # per-column offsets: +-1000
    ref = kernel_ref(a, 5.0) - 1.0
    got = gaussian_kernel_minus_one(torch.from_numpy(a.astype(np.float32)), 5.0).double().numpy()
    off = ~np.eye(6, dtype=bool)
    np.testing.assert_allclose(got[off], ref[off], rtol=1e-3)


def test_centre_is_h_k_h() -> None:
    """(I - 11^T/m) K (I - 11^T/m) for a non-symmetric K (so rows and columns cannot be confused)."""
    rng = np.random.default_rng(2)
    k = rng.standard_normal((5, 5)) + np.arange(5)[:, None] * 3.0
    h = np.eye(5) - np.ones((5, 5)) / 5
    np.testing.assert_allclose(_centre(t64(k)).numpy(), h @ k @ h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma", [5.0, 1.0])
def test_nhsic_matches_the_textbook_formula(sigma: float) -> None:
    """Normalised HSIC of two related representations (different widths) against the formula with K, not K - 1."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((9, 4))
    b = np.tanh(a @ rng.standard_normal((4, 6))) + 0.3 * rng.standard_normal((9, 6))
    got = float(nhsic(t64(a), t64(b), sigma))
    ref = nhsic_ref(a, b, sigma)
    assert got == pytest.approx(ref, rel=1e-6)
    assert 0.0 < got < 1.0
    assert float(nhsic(t64(b), t64(a), sigma)) == pytest.approx(got, rel=1e-9)  # symmetric
    assert float(nhsic(t64(a), t64(a), sigma)) == pytest.approx(1.0, rel=1e-9)  # a with itself


def test_nhsic_of_a_constant_is_zero_not_nan() -> None:
    """A representation that says nothing (all rows equal) has HSIC 0 with anything: 0, not 0/0."""
    a = t64(np.random.default_rng(4).standard_normal((5, 3)))
    got = nhsic(a, torch.ones(5, 3, dtype=torch.float64), 5.0)
    assert torch.isfinite(got) and float(got) == pytest.approx(0.0, abs=1e-9)


def test_nhsic_gradient_matches_finite_differences() -> None:
    """NeuLite differentiates nHSIC(Z, X) through Z: the gradient is the formula's (central differences of the
    float64 reference), so the rewritten kernel does not bend it."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((6, 3))
    b = a @ rng.standard_normal((3, 4)) + 0.5 * rng.standard_normal((6, 4))
    at = t64(a).requires_grad_()
    (g,) = torch.autograd.grad(nhsic(at, t64(b), 1.0), at)
    eps = 1e-6
    num = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        hi, lo = a.copy(), a.copy()
        hi[idx] += eps
        lo[idx] -= eps
        num[idx] = (nhsic_ref(hi, b, 1.0) - nhsic_ref(lo, b, 1.0)) / (2 * eps)
    np.testing.assert_allclose(g.numpy(), num, rtol=1e-4, atol=1e-7)


def test_one_hot() -> None:
    y = torch.tensor([2, 0, 3, 3])
    got = one_hot(y, 5)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), np.eye(5, dtype=np.float32)[[2, 0, 3, 3]])


def test_cross_entropy_and_mse_are_batch_means() -> None:
    rng = np.random.default_rng(6)
    z, y = rng.standard_normal((4, 3)) * 3, np.array([0, 2, 1, 2])
    ref = float(np.mean(np.logaddexp.reduce(z, axis=1) - z[np.arange(4), y]))
    assert float(cross_entropy(t64(z), torch.from_numpy(y))) == pytest.approx(ref, rel=1e-12)
    s, t = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    assert float(mse(t64(s), t64(t))) == pytest.approx(float(np.mean((s - t) ** 2)), rel=1e-12)


def test_stop_gradient_resolution_and_rounding_toward_zero() -> None:
    """Values to 2^-30, truncated toward zero: 0.75 x 2^-30 becomes 0 on both sides of zero, 1.75 x 2^-30 becomes
    +-2^-30; a float32 value of magnitude >= 2^-6 comes back exactly; float64 stays float64."""
    q = 2.0 ** -30
    assert STOP_GRADIENT_SCALE == 2.0 ** 30
    x = torch.tensor([0.75 * q, -0.75 * q, 1.75 * q, -1.75 * q], dtype=torch.float64)
    assert stop_gradient(x).tolist() == [0.0, 0.0, q, -q]
    f = torch.tensor([2.0 ** -6, -0.3, 7.123456, -1000.5, 2.0 ** 32], dtype=torch.float32)
    out = stop_gradient(f)
    assert out.dtype == torch.float32 and torch.equal(out, f)
    assert stop_gradient(torch.tensor([0.5], dtype=torch.float64)).dtype == torch.float64


def test_stop_gradient_has_no_gradient_but_passes_the_value() -> None:
    """d/dx [x * stop_gradient(x)] = stop_gradient(x): the second factor is a constant."""
    x = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((x * stop_gradient(x)).sum(), x)
    assert g.tolist() == [0.5, -2.0, 3.0]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def depthfl_ref(zs: list[np.ndarray], y: np.ndarray) -> float:
    """sum_j CE(z_j) + 1/(k-1) sum_j sum_{i != j} KL(p_i || p_j), batch means, from the definitions."""
    k, n = len(zs), len(y)
    ce = sum(float(np.mean(-np.log(softmax(z)[np.arange(n), y]))) for z in zs)
    if k == 1:
        return ce
    kl = sum(float(np.mean((softmax(zs[i]) * (np.log(softmax(zs[i])) - np.log(softmax(zs[j])))).sum(1)))
             for j in range(k) for i in range(k) if i != j)
    return ce + kl / (k - 1)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_depthfl_loss_value(k: int) -> None:
    """The formula's value; the softmaxes name their class dimension (torch warns, and may one day differ, when it
    has to guess)."""
    rng = np.random.default_rng(10 + k)
    zs = [rng.standard_normal((6, 4)) * 2 for _ in range(k)]
    y = rng.integers(0, 4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = float(depthfl([t64(z) for z in zs], torch.from_numpy(y)))
    assert got == pytest.approx(depthfl_ref(zs, y), rel=1e-7)


def test_depthfl_gradient_treats_the_targets_as_constants() -> None:
    """d loss / d z_j = (softmax(z_j) - onehot(y)) / n + 1/(k-1) sum_{i != j} (softmax(z_j) - p_i) / n: every
    classifier is pulled towards the others, none towards its students (the targets' side has no gradient)."""
    rng = np.random.default_rng(20)
    k, n, c = 3, 5, 4
    zs = [rng.standard_normal((n, c)) * 2 for _ in range(k)]
    y = rng.integers(0, c, n)
    leaves = [t64(z).requires_grad_() for z in zs]
    grads = torch.autograd.grad(depthfl(leaves, torch.from_numpy(y)), leaves)
    p = [softmax(z) for z in zs]
    onehot = np.eye(c)[y]
    for j in range(k):
        expect = (p[j] - onehot) / n + sum((p[j] - p[i]) / n for i in range(k) if i != j) / (k - 1)
        np.testing.assert_allclose(grads[j].numpy(), expect, rtol=1e-6, atol=1e-9)
