"""The losses the exported training graphs compute, against references written a second time from the formulas in
the methods notes, in float64, without progfl's loss code (models/losses.py):

    NeuLite, stage t:  CE(logits, y) - l1_t nHSIC(Z, X) - l2_t nHSIC(P, onehot(y))
        nHSIC(a, b) = HSIC(a, b) / sqrt(HSIC(a, a) HSIC(b, b) + EPS),  HSIC(a, b) = tr(K_a H K_b H) / (m - 1)^2,
        K_ij = exp(-||a_i - a_j||^2 / (2 sigma^2 d)) on the flattened rows, H = I - 11^T / m
        EPS = 1e-12 / (m - 1)^4: progfl's stabiliser (models/losses.nhsic adds 1e-12 to the product of the
        un-normalised sums). It is not in the paper's formula and not negligible: on a fresh projector, whose rows
        barely differ, it moves nHSIC(P, Y) by 0.26 %. Without it the exact ratio is scale-invariant in P, its
        gradient grows as P's spread shrinks, and float32 torch and ORT drift apart (3.6e-4 in a round's loss
        against < 1e-4 with it). It is written here as progfl defines it; the methods notes say so.
    ProFL's distillation:  mean((student logits - teacher logits)^2)

The loss value is written twice (numpy and torch, float64) and must agree to 1e-12; ORT's value and its gradient of
every trainable array (after one accumulate, from its gradient buffers) are compared with the torch reference's.
The model's own layers give Z, P and the logits (their forward is what ORT's parity tests check); only the loss is
rewritten here.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from progfl.device_runtime.buffer_sgd import tensor_view
from progfl.device_runtime.ort_backend import OrtStage
from progfl.exporter import export_model
from progfl.manifest import DeviceClass
from progfl.models import build_model

SHAPE = (1, 8, 8)
M = 16  # samples in the batch


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model("cnn", 10, SHAPE, width=4)
    folder = tmp_path_factory.mktemp("losses") / "a"
    manifest = export_model(net, folder, [DeviceClass("any", 4096.0)], kinds=("grow", "distill", "neulite"),
                            batch_size=M, measure=False, backends=("ort",))
    return folder, manifest


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((M, *SHAPE)).astype(np.float32), rng.integers(0, 10, M).astype(np.int64)


def ort_loss_and_grads(folder, manifest, stage_name: str, inputs: dict[str, np.ndarray]):
    """ORT's data loss and the gradient of every trainable array after one accumulate at loss_scale 1."""
    backend = OrtStage(folder, manifest, stage_name)
    stage = manifest.stage(stage_name)
    arrays = manifest.initial_weights(folder)
    backend.set_weights({p.name: arrays[p.name] for p in stage.needed(manifest)})
    features = backend.features(inputs["inputs"])
    feeds = {"features": features, "labels": inputs["labels"], "inputs": inputs["inputs"],
             "loss_scale": np.asarray(1.0, np.float32)}
    if "teacher" in stage.files:
        feeds["teacher"] = backend.teacher(features)
    loss = backend.accumulate(feeds)
    raw = backend.state._state
    grads = {p.name: tensor_view(raw.get_parameter(p.name).grad, p.shape).copy()
             for p in stage.params if p.trainable}
    return loss, grads, feeds


def reference_model(folder, manifest) -> torch.nn.Module:
    """The model in float64 with the export's initial weights, training mode (BatchNorm on batch statistics, as the
    training graph)."""
    torch.manual_seed(0)
    net = build_model(**manifest.model_config).double().train()
    arrays = manifest.initial_weights(folder)
    net.load_state_dict({n: torch.from_numpy(arrays[n].astype(np.float64)) if arrays[n].dtype.kind == "f"
                         else torch.from_numpy(arrays[n]) for n in arrays}, strict=False)
    return net


# ---- the formulas, twice ----
def eps(m: int) -> float:
    """progfl's stabiliser in HSIC's units (module docstring)."""
    return 1e-12 / (m - 1) ** 4


def hsic_numpy(a: np.ndarray, b: np.ndarray, sigma: float) -> float:
    def kernel(z):
        z = z.reshape(len(z), -1)
        d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * sigma**2 * z.shape[1]))

    m = len(a)
    h = np.eye(m) - np.ones((m, m)) / m
    ka, kb = kernel(a), kernel(b)
    return float(np.trace(ka @ h @ kb @ h)) / (m - 1) ** 2


def nhsic_numpy(a: np.ndarray, b: np.ndarray, sigma: float) -> float:
    return hsic_numpy(a, b, sigma) / np.sqrt(hsic_numpy(a, a, sigma) * hsic_numpy(b, b, sigma) + eps(len(a)))


def nhsic_torch(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    def kernel(z):
        z = z.reshape(len(z), -1)
        return torch.exp(-torch.cdist(z, z) ** 2 / (2 * sigma**2 * z.shape[1]))

    m = len(a)
    h = torch.eye(m, dtype=torch.float64) - 1.0 / m

    def hsic(x, y):
        return torch.trace(kernel(x) @ h @ kernel(y) @ h) / (m - 1) ** 2

    return hsic(a, b) / torch.sqrt(hsic(a, a) * hsic(b, b) + eps(m))


def ce_numpy(logits: np.ndarray, y: np.ndarray) -> float:
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


GRAD_BOUND = 1e-3  # relative L2 error of an array's gradient, float32 ORT against float64 (measured: below 3e-4)


def check_grads(grads: dict[str, np.ndarray], reference: dict[str, torch.Tensor]) -> None:
    """Each array's gradient within GRAD_BOUND of the reference, relative, in L2 norm (a whole-array bound: float32
    rounding is elementwise noise). An array whose true gradient is zero or nearly (the projector's bias: HSIC does
    not change when P is shifted) is held to GRAD_BOUND of the stage's largest gradient instead."""
    assert grads.keys() == reference.keys()
    largest = max(float(np.linalg.norm(r.numpy())) for r in reference.values())
    for name, g in grads.items():
        ref = reference[name].numpy()
        err = float(np.linalg.norm(g - ref)) / max(float(np.linalg.norm(ref)), GRAD_BOUND * largest)
        assert err < GRAD_BOUND, f"{name}: gradient off by {err:.2e} (relative L2)"


@pytest.mark.parametrize("t", [0, 1, 2])
def test_neulite_loss_and_gradients_match_the_formula(exported, t):
    folder, manifest = exported
    stage = manifest.stage(f"neulite-{t}")
    x, y = batch(t)
    loss, grads, feeds = ort_loss_and_grads(folder, manifest, stage.name, {"inputs": x, "labels": y})

    net = reference_model(folder, manifest)
    h = torch.from_numpy(feeds["features"].astype(np.float64))
    if t > 0:  # co-adaptation: block t-1's last unit trains with block t (the prefix stops before it)
        h = net.blocks[t - 1][-1](h)
    h = net.blocks[t](h)
    for k in range(t + 1, net.T):  # the output module: basic layers t+1.., then the classifier
        h = net.basics[str(k)](h)
    z = h  # Z: the output module's final feature map
    pooled = net.classifier.features(h)
    p = net.projector(pooled)  # P
    logits = net.classifier.fc(pooled)
    x_term = torch.from_numpy((x if t > 0 else feeds["features"]).astype(np.float64))  # X: the stage's input
    onehot = torch.nn.functional.one_hot(torch.from_numpy(y), 10).double()
    l1, l2, sigma = stage.loss_config["l1"], stage.loss_config["l2"], stage.loss_config["sigma"]
    assert l1 > 0 and l2 > 0, "both terms must weigh for the check to mean anything"
    ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
    ref = ce - l1 * nhsic_torch(z, x_term, sigma) - l2 * nhsic_torch(p, onehot, sigma)

    by_numpy = (ce_numpy(logits.detach().numpy(), y) - l1 * nhsic_numpy(z.detach().numpy(), x_term.numpy(), sigma)
                - l2 * nhsic_numpy(p.detach().numpy(), onehot.numpy(), sigma))
    value = float(ref.detach())
    assert abs(by_numpy - value) < 1e-12, "the two writings of the formula disagree"
    assert abs(loss - value) < 1e-5 * max(1.0, abs(value)), (loss, value)

    ref.backward()
    named = dict(net.named_parameters())
    check_grads(grads, {n: named[n].grad for n in grads})


@pytest.mark.parametrize("t", [1, 2])
def test_profl_distillation_loss_and_gradients_match_the_formula(exported, t):
    folder, manifest = exported
    stage = manifest.stage(f"distill-{t}")
    x, y = batch(10 + t)
    loss, grads, feeds = ort_loss_and_grads(folder, manifest, stage.name, {"inputs": x, "labels": y})

    net = reference_model(folder, manifest)
    student = net.basics[str(t)](torch.from_numpy(feeds["features"].astype(np.float64)))  # trains: batch statistics
    frozen = copy.deepcopy(net).eval()  # the rest of the output module is frozen: running statistics
    h = student
    for k in range(t + 1, net.T):
        h = frozen.basics[str(k)](h)
    logits = frozen.classifier(h)
    teacher = feeds["teacher"].astype(np.float64)
    ref = ((logits - torch.from_numpy(teacher)) ** 2).mean()
    by_numpy = float(((logits.detach().numpy() - teacher) ** 2).mean())
    value = float(ref.detach())
    assert abs(by_numpy - value) < 1e-12
    assert abs(loss - value) < 1e-5 * max(1.0, abs(value)), (loss, value)

    ref.backward()
    named = dict(net.named_parameters())
    assert set(grads) == {n for n in named if n.startswith(f"basics.{t}.")}, "distillation trains basic layer t alone"
    check_grads(grads, {n: named[n].grad for n in grads})
