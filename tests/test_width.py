"""The width-scaled baselines: sub-models sliced from the global model, and slice-wise averaging, against torch
references written here independently of progfl's numpy (HeteroFL's first channels, FedRolex's torch.roll window,
HeteroFL's count-and-sum combine)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from progfl.device_runtime.ort_backend import OrtStage
from progfl.device_runtime.trainer import train_round
from progfl.exporter import export_model
from progfl.exporter.eager import EagerStage
from progfl.manifest import (DeviceClass, Manifest, ManifestError, MemoryPoint, ParamSpec, Stage, TensorSpec, TrainTask,
                             TrainUpdate)
from progfl.models import StageSpec, build_model, build_stage, sliced_axes, width_model
from progfl.server.plans import PlanConfig, make_plan
from progfl.server.selection import DeviceInfo
from progfl.server.state import ServerState

SHAPE = (1, 12, 12)
NEED_MB = {1: 40.0, 2: 30.0, 4: 20.0, 8: 10.0}  # what each width-d stage needs (synthetic manifests)


def model(norm: str = "batch"):
    torch.manual_seed(0)
    return build_model("resnet18", 10, SHAPE, norm=norm, width=8)


def state_arrays(m) -> dict[str, np.ndarray]:
    return {n: t.detach().numpy().copy() for n, t in m.state_dict().items() if not n.endswith("num_batches_tracked")}


def width_stage(index: int, full, d: int) -> Stage:
    """A width-d stage as the exporter records it (names, sub-model shapes, cut axes), with synthetic memory."""
    sub = state_arrays(width_model(full, d))
    names = [n for n in sub if n.startswith(("blocks.", "classifier."))]
    params = [ParamSpec(n, list(sub[n].shape), not n.endswith(("running_mean", "running_var"))) for n in names]
    stats = [n for n in names if n.endswith(("running_mean", "running_var"))]
    return Stage(index=index, name=f"width-{d}", kind="width", block=d, loss="ce", loss_config={}, optimizer={},
                 inputs=[], feature=TensorSpec("features", [-1, *SHAPE]), params=params,
                 session_params={}, bn_updates={f"out.{n}": n for n in stats}, bn_variance={}, files={}, footprint={},
                 memory=[MemoryPoint(1, NEED_MB[d], NEED_MB[d]), MemoryPoint(32, NEED_MB[d], NEED_MB[d])],
                 slices=sliced_axes({n: list(a.shape) for n, a in state_arrays(full).items()},
                                    {p.name: p.shape for p in params}))


def synthetic_manifest(full) -> Manifest:
    arrays = state_arrays(full)
    return Manifest(model="resnet18", model_config=dict(full.config), input_shape=list(SHAPE), num_classes=10,
                    opset=17, batch_size=32, safety_margin=0.1,
                    stages=[width_stage(i, full, d) for i, d in enumerate((1, 2, 4, 8))],
                    device_classes=[DeviceClass("any", 1000.0)],
                    global_params=[ParamSpec(n, list(a.shape), not n.endswith(("running_mean", "running_var")))
                                   for n, a in arrays.items()])


# ---- torch references ----
def torch_window(n: int, k: int, offset: int) -> torch.Tensor:
    """FedRolex's window as its reference code builds it: the channel order rolled, the first k kept."""
    return torch.roll(torch.arange(n), shifts=-offset)[:k]


def torch_slice(t: torch.Tensor, sub_shape: list[int], offset: int) -> torch.Tensor:
    if offset == 0:  # HeteroFL: the first channels of every axis that shrinks
        return t[tuple(slice(0, k) for k in sub_shape)]
    for axis, (n, k) in enumerate(zip(t.shape, sub_shape)):
        if k < n:
            t = t.index_select(axis, torch_window(n, k, offset))
    return t


def torch_combine(global_t: torch.Tensor, parts: list[tuple[torch.Tensor, int, float]]) -> torch.Tensor:
    """HeteroFL's combine: per element, the weighted sum of the updates holding it over their total weight; elements
    nobody holds keep their value. parts: (update, offset, weight)."""
    sums = torch.zeros(global_t.shape, dtype=torch.float64)
    count = torch.zeros(global_t.shape, dtype=torch.float64)
    for update, offset, w in parts:
        idx = [torch_window(n, k, offset) if k < n else torch.arange(n) for n, k in zip(global_t.shape, update.shape)]
        at = torch.meshgrid(*idx, indexing="ij")
        sums[at] += w * update.to(torch.float64)
        count[at] += w
    return torch.where(count > 0, sums / count.clamp(min=1e-300), global_t.to(torch.float64)).to(torch.float32)


@pytest.mark.parametrize("d", [2, 4, 8])
@pytest.mark.parametrize("offset", [0, 5, 77])
def test_sub_model_arrays_are_the_torch_reference_slices(d, offset):
    full = model()
    m = synthetic_manifest(full)
    stage = m.stage(f"width-{d}")
    arrays = state_arrays(full)
    cut = stage.take(arrays, m, offset)
    sub = width_model(full, d)
    for p in stage.params:
        ref = torch_slice(torch.from_numpy(arrays[p.name]), p.shape, offset).numpy()
        assert np.array_equal(cut[p.name], ref), p.name
    # the slices are exactly the sub-model's arrays: torch loads them by name, every shape as the sub-model has it
    missing, unexpected = sub.load_state_dict({n: torch.from_numpy(a) for n, a in cut.items()}, strict=False)
    assert not unexpected and all(n.startswith(("basics.", "projector.")) or n.endswith("num_batches_tracked")
                                  for n in missing)
    assert any(stage.slices.values()), "a narrower sub-model cuts some axes"


def test_input_channels_and_classes_are_kept_whole():
    full = model()
    stage = synthetic_manifest(full).stage("width-4")
    stem = "blocks.0.0.0.weight"  # the stem conv: [w/4, 1, 3, 3] of [w, 1, 3, 3]
    assert stage.slices[stem] == [0] and stage.slices["classifier.fc.weight"] == [1]
    assert "classifier.fc.bias" not in stage.slices


@pytest.mark.parametrize("plan_name", ["heterofl", "fedrolex"])
def test_plan_gives_each_device_its_widest_slice_and_averages_like_the_torch_reference(plan_name):
    full = model()
    m = synthetic_manifest(full)
    devices = [DeviceInfo(0, 50.0, 100, np.ones(10)), DeviceInfo(1, 36.0, 80, np.ones(10)),
               DeviceInfo(2, 25.0, 60, np.ones(10)), DeviceInfo(3, 12.0, 30, np.ones(10)),
               DeviceInfo(4, 24.0, 50, np.ones(10)), DeviceInfo(5, 5.0, 90, np.ones(10))]
    plan = make_plan(plan_name, m, PlanConfig(rounds=3, per_round=10, outlier_k=0))
    state = ServerState(round=0, plan=plan.name, plan_state={}, arrays=state_arrays(full), pace={},
                        rng=np.random.default_rng(0).bit_generator.state, config={})
    plan.start(state)
    rng = np.random.default_rng(1)
    for r in (1, 2):
        before = {n: a.copy() for n, a in state.arrays.items()}
        tasks = plan.configure_train(state, devices, rng)
        assert {d.id: t.stage for d, t in tasks} == {0: "width-1", 1: "width-2", 2: "width-4", 3: "width-8",
                                                      4: "width-4"}, "the widest the budget holds; device 5 none"
        offset = r if plan_name == "fedrolex" else 0
        gen = torch.Generator().manual_seed(r)
        results = []
        for d, t in tasks:
            stage = m.stage(t.stage)
            for p in stage.params:
                ref = torch_slice(torch.from_numpy(before[p.name]), p.shape, offset).numpy()
                assert np.array_equal(t.weights[p.name], ref), f"round {r}, {t.stage}: {p.name}"
            sent = {n: (torch.from_numpy(t.weights[n]) + 0.1 * torch.randn(t.weights[n].shape, generator=gen)).numpy()
                    for n in stage.updated_names}
            results.append((d, TrainUpdate(t.round, t.stage, sent, d.num_samples, {"loss": 1.0})))
        record = plan.aggregate_train(state, results)
        assert record["stage"] == "width-1" and not record["dropped"] and not record["kept_previous"]
        for name, old in before.items():
            if name.endswith(("running_mean", "running_var")) or not name.startswith(("blocks.", "classifier.")):
                assert np.array_equal(state.arrays[name], old), f"{name}: not trained, must not move"
                continue
            parts = [(torch.from_numpy(u.weights[name]), offset, float(d.num_samples)) for d, u in results]
            ref = torch_combine(torch.from_numpy(old), parts).numpy()
            assert np.array_equal(state.arrays[name], ref), f"round {r}: {name}"


def test_fedrolex_rolls_its_window_and_heterofl_does_not():
    full = model()
    m = synthetic_manifest(full)
    stage = m.stage("width-8")
    name = "blocks.3.0.conv1.weight"  # 64 x 32 x 3 x 3 globally, 8 x 4 x 3 x 3 in width-8
    whole = full.state_dict()[name].shape
    rows = lambda offset: stage.slice_index(name, whole, offset)[0].tolist()  # noqa: E731
    assert rows(0) == list(range(8)) and rows(1) == list(range(1, 9)) and rows(60) == [60, 61, 62, 63, 0, 1, 2, 3]
    assert make_plan("fedrolex", m, PlanConfig()).offset(7) == 7
    assert make_plan("heterofl", m, PlanConfig()).offset(7) == 0


def test_allsmall_trains_the_widest_its_smallest_device_holds_and_keeps_it():
    full = model()
    m = synthetic_manifest(full)
    plan = make_plan("allsmall", m, PlanConfig(rounds=2, per_round=10))
    state = ServerState(round=0, plan=plan.name, plan_state={}, arrays=state_arrays(full), pace={},
                        rng=np.random.default_rng(0).bit_generator.state, config={})
    plan.start(state)
    fleet = [DeviceInfo(0, 50.0, 10, np.ones(10)), DeviceInfo(1, 25.0, 10, np.ones(10))]
    assert [d.id for d in plan.candidates(fleet, state)] == [0, 1]
    tasks = plan.configure_train(state, fleet, np.random.default_rng(0))
    assert {t.stage for _, t in tasks} == {"width-4"} and plan.stage(state).name == "width-4"
    smaller = [*fleet, DeviceInfo(2, 12.0, 10, np.ones(10))]  # joins later: the choice stands, it cannot take part
    assert [d.id for d in plan.candidates(smaller, state)] == [0, 1]
    fresh = ServerState(round=0, plan=plan.name, plan_state={}, arrays=state.arrays, pace={}, rng=state.rng, config={})
    plan.start(fresh)
    assert [d.id for d in plan.candidates([DeviceInfo(0, 5.0, 10, np.ones(10)), DeviceInfo(1, 12.0, 10, np.ones(10))],
                                          fresh)] == [1] and plan.stage(fresh).name == "width-8"


def test_width_one_is_the_full_model():
    full = model()
    one = width_model(full, 1)
    assert {n: a.shape for n, a in state_arrays(one).items()} == {n: a.shape for n, a in state_arrays(full).items()}
    assert sliced_axes({n: list(a.shape) for n, a in state_arrays(full).items()},
                       {n: list(a.shape) for n, a in state_arrays(one).items()}) == {}
    m = synthetic_manifest(full)
    arrays = state_arrays(full)
    cut = m.stage("width-1").take(arrays, m, offset=9)
    assert all(cut[n] is arrays[n] for n in cut), "nothing is cut from the full model, whatever the offset"
    one.load_state_dict(full.state_dict())
    x = torch.randn(6, *SHAPE)
    with torch.no_grad():
        assert torch.equal(one.eval()(x), full.eval()(x))
        # its inference graph normalises by batch statistics (HeteroFL's static BatchNorm): train-mode BN's output
        batch_stats = build_stage(one, StageSpec("width", 1)).inference.eval()(x)
        reference = copy.deepcopy(full).train()(x)
    torch.testing.assert_close(batch_stats, reference, rtol=1e-5, atol=1e-5)


# ---- exported: the artifacts devices train ----
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model("cnn", 10, SHAPE, width=8)
    folder = tmp_path_factory.mktemp("width") / "a"
    manifest = export_model(net, folder, [DeviceClass("any", 4096.0)], kinds=("full", "width"), batch_size=16,
                            measure=False, backends=("ort",))
    return net, folder, manifest


def task(manifest: Manifest, arrays: dict[str, np.ndarray], stage: str, offset: int = 0) -> TrainTask:
    s = manifest.stage(stage)
    return TrainTask(round=1, stage=stage, manifest_sha256="", weights=s.take(arrays, manifest, offset), lr=0.05,
                     epochs=2, batch_size=16, micro_batch=8, accum_steps=2, seed=3)


def test_export_lists_width_stages_with_their_slices(exported):
    _, folder, manifest = exported
    assert [s.name for s in manifest.stages] == ["full", "width-1", "width-2", "width-4", "width-8"]
    assert manifest.stage("width-1").slices == {} and manifest.stage("width-2").slices["blocks.1.0.0.weight"] == [0, 1]
    reloaded = Manifest.load(folder)
    assert reloaded.stage("width-8").slices == manifest.stage("width-8").slices
    bad = dataclasses.replace(manifest.stage("width-2"), slices={})  # sub-model shapes with no axis declared cut
    with pytest.raises(ManifestError, match="not in the global model as such"):
        dataclasses.replace(manifest, stages=[*manifest.stages[:2], bad, *manifest.stages[3:]]).validate()
    full_cut = dataclasses.replace(manifest.stage("full"), slices={"classifier.fc.weight": [1]})
    with pytest.raises(ManifestError, match="only width stages"):
        dataclasses.replace(manifest, stages=[full_cut, *manifest.stages[1:]]).validate()


def test_width_one_trains_exactly_as_the_full_stage(exported, shard_1x12x12):
    _, folder, manifest = exported
    arrays = manifest.initial_weights(folder)
    one = train_round(OrtStage(folder, manifest, "width-1"), manifest.stage("width-1"),
                      task(manifest, arrays, "width-1"), shard_1x12x12)
    full = train_round(OrtStage(folder, manifest, "full"), manifest.stage("full"), task(manifest, arrays, "full"),
                       shard_1x12x12)
    assert one.weights.keys() == full.weights.keys()
    for name in full.weights:
        np.testing.assert_array_equal(one.weights[name], full.weights[name], err_msg=name)


@pytest.mark.parametrize("d,offset", [(2, 0), (4, 3)])
def test_a_sub_model_trains_like_torch_on_its_slice(exported, shard_1x12x12, d, offset):
    net, folder, manifest = exported
    arrays = manifest.initial_weights(folder)
    stage = manifest.stage(f"width-{d}")
    t = task(manifest, arrays, stage.name, offset)
    ort = train_round(OrtStage(folder, manifest, stage.name), stage, dataclasses.replace(t, weights=dict(t.weights)),
                      shard_1x12x12)
    ref = train_round(EagerStage(width_model(net, d), StageSpec("width", d), dtype=torch.float64), stage, t,
                      shard_1x12x12)
    for name, value in ort.weights.items():
        np.testing.assert_allclose(value, ref.weights[name], atol=1e-4, rtol=1e-4, err_msg=name)
