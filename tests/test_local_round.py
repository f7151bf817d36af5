"""A device's local round against the SGD step written out by hand: what the task asks (lr, weight decay) is what the
weights move by, checked without the trainer or the eager reference (which share the trainer's loop, so a learning
rate mis-applied there moves both alike).

One epoch over a shard of exactly one batch is one step: w1 = w0 - lr (g + wd w0), torch's SGD with coupled weight
decay (the momentum buffer of a first step is g + wd w0), g the float64 gradient of the batch's mean loss. The
weights' movement must match lr (g + wd w0) to BOUND, relative L2 per array (float32 against float64): a learning
rate 3 % off misses it by 3e-2, 15 x the bound.

(A GroupNorm cnn of width 4 on 8x8 inputs makes ONNX Runtime 1.19.2 segfault in the full stage's first training
step; width 8 on 12x12 trains. Found writing this test; not yet traced, so this test uses BatchNorm.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from progfl.device_runtime.ort_backend import OrtStage
from progfl.device_runtime.shard import Shard
from progfl.device_runtime.trainer import train_round
from progfl.exporter import export_model
from progfl.manifest import DeviceClass, TrainTask
from progfl.models import build_model, build_stage, parse_stage_name

SHAPE = (1, 12, 12)
N = 16  # the shard: one batch
BOUND = 2e-3  # measured: at most 4.8e-4 (a BatchNorm weight: float32 reductions over the batch)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("round") / "a"
    manifest = export_model(build_model("cnn", 10, SHAPE, width=8), folder, [DeviceClass("any", 4096.0)],
                            kinds=("grow", "full"), batch_size=N, measure=False, backends=("ort",))
    return folder, manifest


@pytest.mark.parametrize("stage_name,lr", [("full", 0.05), ("grow-1", 0.01)])
def test_one_step_moves_the_weights_by_lr_times_the_gradient(exported, tmp_path, stage_name, lr):
    folder, manifest = exported
    stage = manifest.stage(stage_name)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((N, *SHAPE)).astype(np.float32), rng.integers(0, 10, N).astype(np.int64)
    np.savez(tmp_path / "shard.npz", x=x, y=y)
    w0 = manifest.initial_weights(folder)
    task = TrainTask(round=1, stage=stage.name, manifest_sha256="", weights={p.name: w0[p.name] for p in
                     stage.needed(manifest)}, lr=lr, epochs=1, batch_size=N, micro_batch=N, accum_steps=1, seed=0)
    with Shard(tmp_path / "shard.npz") as shard:
        update = train_round(OrtStage(folder, manifest, stage.name), stage, task, shard)
    assert update.metrics["steps"] == 1

    # the reference gradient: float64 torch, the stage's graph on the whole batch in training mode (BatchNorm on
    # the batch's statistics, as the training graph), the frozen prefix in eval mode
    net = build_model(**manifest.model_config).double()
    net.load_state_dict({n: torch.from_numpy(a.astype(np.float64)) for n, a in w0.items()}, strict=False)
    g = build_stage(net, parse_stage_name(stage.name))
    feats = torch.from_numpy(x.astype(np.float64))
    if g.prefix is not None:
        with torch.no_grad():
            feats = g.prefix.eval()(feats)
    loss, _, _ = g.train.train()(feats, torch.from_numpy(y), torch.tensor(1.0, dtype=torch.float64))
    loss.backward()
    wd = stage.optimizer["weight_decay"]
    assert wd > 0
    for name, p in g.train.trainable_parameters():
        expected = lr * (p.grad.numpy() + wd * w0[name].astype(np.float64))
        moved = w0[name].astype(np.float64) - update.weights[name].astype(np.float64)
        err = float(np.linalg.norm(moved - expected) / np.linalg.norm(expected))
        assert err < BOUND, f"{stage.name} {name}: moved {err:.2e} off lr x (gradient + wd w)"
