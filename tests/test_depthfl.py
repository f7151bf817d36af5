"""DepthFL's depth-k stages and plan, against torch references written here independently of progfl's loss and
aggregation: DepthFL's loss as its reference code writes it (F.kl_div against detached softmax targets), its heads as
the model's own forward_stage, and a per-array numpy average over the devices that trained each array."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from progfl.device_runtime.ort_backend import OrtStage
from progfl.device_runtime.trainer import train_round
from progfl.exporter import export_model
from progfl.exporter.eager import EagerStage
from progfl.manifest import DeviceClass, Manifest, ManifestError, MemoryPoint, TrainTask, TrainUpdate
from progfl.models import StageSpec, build_model, build_stage, default_stages, parse_stage_name
from progfl.models.losses import depthfl, stop_gradient
from progfl.server.plans import PlanConfig, make_plan
from progfl.server.selection import DeviceInfo
from progfl.server.state import ServerState

SHAPE = (1, 12, 12)


def model(name: str = "cnn"):
    torch.manual_seed(0)
    return build_model(name, 10, SHAPE, width=8)


# ---- torch references ----
def reference_loss(logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """DepthFL's local loss as its reference code builds it: per classifier, CE plus the mean over the other
    classifiers of KL(their detached softmax || its softmax), batch mean, temperature 1."""
    k = len(logits)
    loss = torch.zeros((), dtype=logits[0].dtype)
    for j, z in enumerate(logits):
        loss = loss + F.cross_entropy(z, y)
        for i, other in enumerate(logits):
            if i != j:
                loss = loss + F.kl_div(F.log_softmax(z, dim=1), F.softmax(other.detach(), dim=1),
                                       reduction="batchmean") / (k - 1)
    return loss


def reference_heads(net, x: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The k classifiers of depth-k as the model itself computes them: forward_stage(j) (blocks 0..j, then block j's
    output module), training mode (batch statistics), on a copy whose statistics may move."""
    net = copy.deepcopy(net).train()
    return [net.forward_stage(x, j) for j in range(k)]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_loss_and_its_gradient_match_the_reference(k):
    gen = torch.Generator().manual_seed(k)
    y = torch.randint(0, 7, (5,), generator=gen)
    leaves = [(3 * torch.randn(5, 7, generator=gen, dtype=torch.float64)).requires_grad_() for _ in range(k)]
    ours = depthfl(leaves, y)
    ours_grads = torch.autograd.grad(ours, leaves)
    ref = reference_loss(leaves, y)
    ref_grads = torch.autograd.grad(ref, leaves)
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-7)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)
    if k == 1:
        torch.testing.assert_close(ours, F.cross_entropy(leaves[0], y))


def test_stop_gradient_keeps_the_value_and_cuts_the_gradient():
    x = torch.tensor([[-40.0, -1.5e-7, 0.0, 3.25, 1e-3, 8e8]], dtype=torch.float32, requires_grad=True)
    out = stop_gradient(x)
    assert not out.requires_grad
    np.testing.assert_allclose(out.numpy(), x.detach().numpy(), rtol=1e-7, atol=2 ** -30)


def test_depth_stages_are_listed_and_parsed():
    net = model()
    assert [s.name for s in default_stages(net.T, ("depth", "full"))] == ["full"] + [f"depth-{k}"
                                                                                    for k in range(1, net.T + 1)]
    assert parse_stage_name("depth-2") == StageSpec("depth", 2) and StageSpec("depth", 2).loss == "depthfl"
    for bad in (0, net.T + 1):
        with pytest.raises(ValueError, match="does not exist"):
            build_stage(net, StageSpec("depth", bad))


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_depth_stage_graph_is_the_reference_loss_of_the_models_own_heads(name):
    net = model(name).to(torch.float64)
    x = torch.randn(6, *SHAPE, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    for k in range(1, net.T + 1):
        g = build_stage(net, StageSpec("depth", k))
        assert g.prefix is None and g.teacher is None and g.train.input_names() == ["features", "labels", "loss_scale"]
        trained = {".".join(n.split(".")[:2]) for n, _ in g.train.trainable_parameters()}
        assert trained == {f"blocks.{j}" for j in range(k)} | {f"basics.{m}" for m in range(1, net.T)} | {
            "classifier.fc"}, "blocks 0..k-1 and every head's layers"
        heads = reference_heads(net, x, k)
        loss, logits, data_loss = g.train.train()(x, y, torch.tensor(0.25, dtype=torch.float64))
        torch.testing.assert_close(data_loss, reference_loss(heads, y), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(loss, 0.25 * data_loss)
        torch.testing.assert_close(logits, heads[-1], rtol=1e-10, atol=1e-10)


def test_depth_T_is_the_full_model():
    net = model("resnet18")
    full, deepest = build_stage(net, StageSpec("full", 0)), build_stage(net, StageSpec("depth", net.T))
    x = torch.randn(6, *SHAPE)
    with torch.no_grad():
        reference = copy.deepcopy(net).eval()(x)
        torch.testing.assert_close(deepest.inference.eval()(x), reference, rtol=0, atol=0)
        torch.testing.assert_close(full.inference.eval()(x), reference, rtol=0, atol=0)
        # its deepest head in training is the full model's training forward
        train_ref = copy.deepcopy(net).train()(x)
        torch.testing.assert_close(deepest.train.train()(x, torch.zeros(6, dtype=torch.long), torch.tensor(1.0))[1],
                                   train_ref, rtol=1e-6, atol=1e-6)


def test_the_heads_track_no_batchnorm_statistics_and_the_blocks_do():
    net = model("resnet18")
    before = {n: t.clone() for n, t in net.state_dict().items()}
    g = build_stage(net, StageSpec("depth", 2))
    g.train.train()(torch.randn(6, *SHAPE), torch.zeros(6, dtype=torch.long), torch.tensor(1.0))
    moved = {n for n, t in net.state_dict().items() if n.endswith("running_mean") and not torch.equal(t, before[n])}
    assert moved and all(n.startswith(("blocks.0.", "blocks.1.")) for n in moved), moved


# ---- exported: the artifacts devices train ----
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net = model()
    folder = tmp_path_factory.mktemp("depth") / "a"
    manifest = export_model(net, folder, [DeviceClass("any", 4096.0)], kinds=("full", "depth"), batch_size=16,
                            measure=False, backends=("ort",))
    return net, folder, manifest


def task(manifest: Manifest, arrays: dict[str, np.ndarray], stage: str) -> TrainTask:
    return TrainTask(round=1, stage=stage, manifest_sha256="", weights=manifest.stage(stage).take(arrays, manifest),
                     lr=0.05, epochs=2, batch_size=16, micro_batch=8, accum_steps=2, seed=3)


def test_export_lists_depth_stages(exported):
    net, folder, manifest = exported
    T = net.T
    assert [s.name for s in manifest.stages] == ["full"] + [f"depth-{k}" for k in range(1, T + 1)]
    reloaded = Manifest.load(folder)
    for k in range(1, T + 1):
        s = reloaded.stage(f"depth-{k}")
        assert s.kind == "depth" and s.block == k and s.loss == "depthfl" and not s.slices and "prefix" not in s.files
        assert all(not n.startswith("basics.") for n in s.bn_updates.values()), "the heads track no statistics"
        assert {n.split(".")[1] for n in s.trainable_names if n.startswith("blocks.")} == {str(j) for j in range(k)}
    assert set(manifest.stage(f"depth-{T}").session_params["inference"]) == set(
        manifest.stage("full").session_params["inference"]), "depth-T evaluates the full model"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_depth_stage_trains_like_torch(exported, shard_1x12x12, k):
    net, folder, manifest = exported
    arrays = manifest.initial_weights(folder)
    stage = manifest.stage(f"depth-{k}")
    t = task(manifest, arrays, stage.name)
    ort = train_round(OrtStage(folder, manifest, stage.name), stage, dataclasses.replace(t, weights=dict(t.weights)),
                      shard_1x12x12)
    ref = train_round(EagerStage(copy.deepcopy(net), StageSpec("depth", k), dtype=torch.float64), stage, t,
                      shard_1x12x12)
    assert set(ort.weights) == set(stage.updated_names)
    for name, value in ort.weights.items():
        assert not np.array_equal(value, arrays[name]), f"{name} did not move"
        np.testing.assert_allclose(value, ref.weights[name], atol=1e-4, rtol=1e-4, err_msg=name)
    assert ort.metrics["loss"] == pytest.approx(ref.metrics["loss"], rel=1e-4)


# ---- the plan ----
NEED_MB = {1: 10.0, 2: 20.0, 3: 30.0}  # what depth-k needs (synthetic memory)


def plan_manifest(manifest: Manifest) -> Manifest:
    """The exported manifest with synthetic memory: depth-k needs NEED_MB[k] at any micro-batch."""
    stages = [dataclasses.replace(s, memory=[MemoryPoint(b, NEED_MB[s.block], NEED_MB[s.block]) for b in (1, 16)])
              if s.kind == "depth" else s for s in manifest.stages]
    return dataclasses.replace(manifest, stages=stages)


def test_plan_gives_each_device_its_deepest_stage_and_averages_over_those_that_trained(exported):
    net, folder, exported_manifest = exported
    assert net.T == 3 and set(NEED_MB) == {1, 2, 3}
    m = plan_manifest(exported_manifest)
    devices = [DeviceInfo(0, 40.0, 100, np.ones(10)), DeviceInfo(1, 25.0, 80, np.ones(10)),
               DeviceInfo(2, 15.0, 60, np.ones(10)), DeviceInfo(3, 5.0, 30, np.ones(10)),
               DeviceInfo(4, 24.0, 50, np.ones(10)), DeviceInfo(5, 12.0, 90, np.ones(10))]
    plan = make_plan("depthfl", m, PlanConfig(rounds=3, per_round=10, outlier_k=0))
    state = ServerState(round=0, plan=plan.name, plan_state={}, arrays=m.initial_weights(folder), pace={},
                        rng=np.random.default_rng(0).bit_generator.state, config={})
    plan.start(state)
    assert plan.stage(state).name == "depth-3", "the server evaluates the full-depth model"
    rng = np.random.default_rng(1)
    for r in (1, 2):
        before = {n: a.copy() for n, a in state.arrays.items()}
        tasks = plan.configure_train(state, devices, rng)
        assert {d.id: t.stage for d, t in tasks} == {0: "depth-3", 1: "depth-2", 2: "depth-1", 4: "depth-2",
                                                      5: "depth-1"}, "the deepest the budget holds; device 3 none"
        results = []
        gen = np.random.default_rng(r)
        for d, t in tasks:
            stage = m.stage(t.stage)
            assert set(t.weights) == {p.name for p in stage.needed(m)}
            for n, a in t.weights.items():
                assert np.array_equal(a, before[n]), "unsliced: the global arrays themselves"
            sent = {n: (t.weights[n] + 0.1 * gen.standard_normal(t.weights[n].shape)).astype(np.float32)
                    for n in stage.updated_names}
            results.append((d, TrainUpdate(t.round, t.stage, sent, d.num_samples, {"loss": 1.0})))
        record = plan.aggregate_train(state, results)
        assert record["stage"] == "depth-3" and not record["dropped"] and not record["kept_previous"]
        assert record["sub_models"] == {"depth-3": [0], "depth-2": [1, 4], "depth-1": [2, 5]}
        for name, old in before.items():
            holders = [(u.weights[name].astype(np.float64), float(d.num_samples)) for d, u in results
                       if name in u.weights]
            if not holders:
                assert np.array_equal(state.arrays[name], old), f"{name}: trained by nobody, must not move"
                continue
            ref = sum(w * a for a, w in holders) / sum(w for _, w in holders)
            np.testing.assert_allclose(state.arrays[name], ref.astype(np.float32), rtol=1e-6, atol=1e-7,
                                       err_msg=name)
        # who trained what: block 2 by the depth-3 device alone, block 0, the heads and block 0's statistics by all
        b2 = next(n for n in before if n.startswith("blocks.2.") and n.endswith("weight"))
        assert np.allclose(state.arrays[b2], results[0][1].weights[b2])
        stat = next(n for n in before if n.startswith("blocks.0.") and n.endswith("running_mean"))
        assert not np.array_equal(state.arrays[stat], before[stat]), "the blocks' BatchNorm statistics are averaged"
        assert all(name in u.weights for _, u in results for name in ("classifier.fc.weight", "basics.1.0.weight"))


def test_the_server_evaluates_the_deepest_classifier_the_fleet_trains(exported):
    """Blocks nobody holds never train: the evaluated classifier is the deepest the largest device holds, chosen at
    the first round and kept when a larger device appears later."""
    _, folder, exported_manifest = exported
    m = plan_manifest(exported_manifest)
    plan = make_plan("depthfl", m, PlanConfig(rounds=3, per_round=10))
    state = ServerState(round=0, plan=plan.name, plan_state={}, arrays=m.initial_weights(folder), pace={},
                        rng=np.random.default_rng(0).bit_generator.state, config={})
    plan.start(state)
    small = [DeviceInfo(0, 25.0, 10, np.ones(10)), DeviceInfo(1, 15.0, 10, np.ones(10))]
    tasks = plan.configure_train(state, small, np.random.default_rng(0)) if plan.candidates(small, state) else []
    assert plan.stage(state).name == "depth-2" and {t.stage for _, t in tasks} == {"depth-2", "depth-1"}
    plan.candidates([*small, DeviceInfo(2, 40.0, 10, np.ones(10))], state)
    assert plan.stage(state).name == "depth-2"


def test_plan_needs_the_full_depth_stage(exported):
    _, _, manifest = exported
    deepest = f"depth-{len(manifest.stages) - 1}"
    cut = dataclasses.replace(manifest, stages=[s for s in manifest.stages if s.name != deepest])
    with pytest.raises(ManifestError, match="full-depth stage"):
        make_plan("depthfl", cut, PlanConfig())
    with pytest.raises(ManifestError, match="--stages depth"):
        make_plan("depthfl", dataclasses.replace(manifest, stages=manifest.stages[:1]), PlanConfig())
