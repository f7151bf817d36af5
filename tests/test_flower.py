"""progfl on Flower 1.41: a real loopback deployment (SuperLink + 3 SuperNodes, `flwr run`) and the simulation engine
(Ray): honest memory, federated evaluation, resume, divergence."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from progfl.data import iid, load_dataset, write_dataset, write_shards
from progfl.exporter import export_model
from progfl.manifest import DeviceClass, Manifest, size_stage
from progfl.models import build_model
from progfl.server.fleet import required_mb
from progfl.server.plans import PlanConfig, make_plan
from progfl.server.state import load_state

from loopback import Deployment

APP = Path(__file__).resolve().parent.parent / "progfl" / "flower_app"
PACE = {"window": 2, "slope_window": 2, "min_rounds": 1}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("flower") / "a"
    export_model(build_model("cnn", 10, (1, 8, 8), width=4), folder, [DeviceClass("any", 4096.0)],
                 kinds=("grow", "distill", "full", "width"), batch_size=16, measure_batches=[1, 16], backends=("ort",))
    return folder


def test_deployment_superlink_three_supernodes(artifacts, tmp_path):
    """A loopback deployment (insecure; tests/test_flower_secure.py runs TLS + node auth): 3 SuperNodes of different
    memory. Each node reports its transport baseline (SuperNode + ClientApp, measured); the server sizes with
    memory minus baseline; the training runs in its own process; so every device-round fits the node's whole memory.
    The devices also score each round's model on their own held-out shards (federated evaluation)."""
    manifest = Manifest.load(artifacts)
    need = {s.name: required_mb(manifest, s.name) for s in manifest.stages}
    budgets = [1024.0, 1124.0, 100.0]  # the 100 MB node cannot hold its transport and any stage

    train, test = load_dataset("digits", seed=0)
    write_shards(train, iid(train.y, 3, np.random.default_rng(0)), tmp_path / "data")
    write_shards(test, iid(test.y, 3, np.random.default_rng(1)), tmp_path / "eval")
    write_dataset(test, tmp_path / "test.npz")

    with Deployment(tmp_path / "deploy", tls=False) as d:
        d.start_superlink()
        for i, b in enumerate(budgets):
            d.start_supernode(f"node{i}", f'memory-mb={b} data-path="{tmp_path / "data" / f"device_{i:04d}.npz"}" '
                                          f'eval-data-path="{tmp_path / "eval" / f"device_{i:04d}.npz"}" '
                                          f'artifacts-dir="{tmp_path / f"cache{i}"}" backend="ort" threads=1 '
                                          f'device-id={i}')
        run_cfg = (f'artifacts="{artifacts}" out="{tmp_path / "run"}" test-data="{tmp_path / "test.npz"}" '
                   f'plan="profl" rounds=2 per-round=3 seed=1 lr=0.05 epochs=1 min-nodes=3 query-timeout=120.0 '
                   f'round-timeout=300.0 pace=\'{json.dumps(PACE)}\'')
        d.run_to_completion(APP, run_cfg, timeout=180)
    assert not d.left, f"processes left running: {d.left}"

    h = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["round"] for r in h["rounds"]] == [1, 2]
    fleet = {f["id"]: f for f in h["fleet"]}
    assert [fleet[i]["memory_mb"] for i in range(3)] == budgets
    for f in fleet.values():  # measured: at least the ClientApp's Python + flwr, and a sizing that subtracts it
        assert 30.0 < f["baseline_mb"] < 1000.0 and f["budget_mb"] == pytest.approx(f["memory_mb"] - f["baseline_mb"])
    assert fleet[2]["budget_mb"] < min(need.values())
    for r in h["rounds"]:
        assert not r["failed"], r["failed"]
        assert sorted(r["participants"]) == [0, 1] and 0.0 <= r["accuracy"] <= 1.0
        for dev in r["devices"]:  # the training's own peak plus the transport's: under the node's memory
            assert dev["peak_mb"] > 0 and dev["peak_mb"] + dev["baseline_mb"] <= fleet[dev["id"]]["memory_mb"]
            assert not dev["over_budget"] and not dev["torch_imported"]
        ev = r["device_eval"]  # the two participants scored the new model on their held-out shards
        assert ev["samples"] == sum(len(np.load(tmp_path / "eval" / f"device_{i:04d}.npz")["y"]) for i in (0, 1))
        assert 0.0 <= ev["accuracy"] <= 1.0 and np.isfinite(ev["loss"])
    # the small node never received a stage's files; the others did, once
    sha = next(p.name for p in (tmp_path / "cache0").iterdir() if p.name != "features")  # beside: the feature cache
    assert (tmp_path / "cache0" / "features").is_dir(), "a node keeps its frozen-prefix features by default"
    first = make_plan("profl", manifest, PlanConfig(rounds=2)).phases[0].stage
    assert (tmp_path / "cache0" / sha / manifest.stage(first).files["training"].path).exists()
    assert not (tmp_path / "cache2").exists() or not any((tmp_path / "cache2").rglob("*.onnx"))
    initial = manifest.initial_weights(artifacts)
    final = load_state(tmp_path / "run").arrays
    assert set(final) == set(initial)
    assert any(not np.array_equal(final[n], initial[n]) for n in initial), "the global model did not change"


def test_simulation_engine_ten_nodes(artifacts, tmp_path):
    from progfl.server.flower_sim import run_flower_simulation
    from progfl.server.simulation import SimConfig

    manifest = Manifest.load(artifacts)
    need = {s.name: required_mb(manifest, s.name) for s in manifest.stages}
    fleet = [round(min(need.values()) - 1.0 + 4.0 * i, 1) for i in range(10)]  # device 0 holds no stage
    cfg = SimConfig(plan="profl", artifacts=str(artifacts), out=str(tmp_path / "run"), dataset="digits", devices=10,
                    per_round=4, rounds=2, epochs=1, workers=2, seed=1, fleet=fleet, pace=PACE)
    run = run_flower_simulation(cfg, quiet=True)
    h = json.loads((run / "history.json").read_text())
    assert [r["round"] for r in h["rounds"]] == [1, 2]
    assert len(h["fleet"]) == 10
    for r in h["rounds"]:
        assert not r["failed"] and 0 < len(r["participants"]) <= 4
        assert 0 not in r["participants"]
        stage = manifest.stage(r["stage"])
        for d in r["devices"]:
            assert size_stage(stage, d["budget_mb"], manifest.batch_size, manifest.safety_margin).fits
    initial = manifest.initial_weights(artifacts)
    final = load_state(run).arrays
    assert any(not np.array_equal(final[n], initial[n]) for n in initial)


def test_simulation_engine_trains_each_device_its_own_sub_model(artifacts, tmp_path):
    """HeteroFL on Flower: each node gets the files of the widest sub-model it holds, trains it, and scores the new
    global model cut to that sub-model on its own held-out data."""
    from progfl.server.flower_sim import run_flower_simulation
    from progfl.server.simulation import SimConfig

    # the tiny model's sub-models all peak at the runtime's ~63 MB: give them distinct peaks (a wider one needs more)
    art = tmp_path / "art"
    shutil.copytree(artifacts, art)
    manifest = Manifest.load(art)
    for s in manifest.stages:
        if s.kind == "width":
            for m in s.memory:
                m.measured_mb = 60.0 + 8.0 / s.block
    manifest.save(art)
    need = {d: required_mb(manifest, f"width-{d}") for d in (1, 2, 4, 8)}
    fleet = [need[d] + 0.5 for d in (1, 2, 4, 8) for _ in range(2)]  # two nodes that just hold each width
    cfg = SimConfig(plan="heterofl", artifacts=str(art), out=str(tmp_path / "run"), dataset="digits",
                    devices=8, per_round=8, rounds=2, epochs=1, workers=2, seed=1, fleet=fleet)
    run = run_flower_simulation(cfg, quiet=True)
    h = json.loads((run / "history.json").read_text())
    widest = {i: f"width-{d}" for i, d in enumerate(d for d in (1, 2, 4, 8) for _ in range(2))}
    for r in h["rounds"]:
        assert not r["failed"] and not r["dropped"] and len(r["participants"]) == 8
        assert {i: name for name, ids in r["sub_models"].items() for i in ids} == widest
        assert r["device_eval"] is not None and r["device_eval"]["samples"] > 0
        assert r["stage"] == "width-1" and 0.0 <= r["accuracy"] <= 1.0


def test_simulation_engine_stops_on_divergence(artifacts, tmp_path, caplog):
    """The Flower strategy honours max_rejected_rounds like progfl simulate: lr 1e30 makes every update NaN."""
    from progfl.server.divergence import Diverged
    from progfl.server.flower_sim import run_flower_simulation
    from progfl.server.simulation import SimConfig

    manifest = Manifest.load(artifacts)
    fleet = [max(required_mb(manifest, s.name) for s in manifest.stages) + 10.0] * 3
    cfg = SimConfig(plan="fedavg", artifacts=str(artifacts), out=str(tmp_path / "run"), dataset="digits", devices=3,
                    per_round=2, rounds=5, epochs=1, lr=1e30, workers=2, seed=1, fleet=fleet, max_rejected_rounds=2)
    with caplog.at_level(logging.WARNING, logger="progfl.server"), pytest.raises(Diverged, match="rounds 1, 2"):
        run_flower_simulation(cfg, quiet=True)
    logged = [r.getMessage() for r in caplog.records if r.name == "progfl.server"]
    assert sum("failed round" in m and "training diverged" in m for m in logged) == 4, logged  # 2 nodes x 2 rounds
    h = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["round"] for r in h["rounds"]] == [1, 2]
    for r in h["rounds"]:  # the nodes replied with an error instead of a NaN update; the server logged and kept it
        assert r["selected"] and not r["participants"] and r["kept_previous"]
        assert all("training diverged" in why for _, why in r["failed"]), r["failed"]


def test_simulation_engine_resume_is_exact(artifacts, tmp_path):
    """A Flower run stopped after round 1 and resumed ends with the same weights and the same choices as one run
    straight through: the round engine's checkpoint carries the plan, the pace window and the random stream."""
    from progfl.server.flower_sim import run_flower_simulation
    from progfl.server.rounds import Stopped
    from progfl.server.simulation import SimConfig

    def cfg(out):
        return SimConfig(plan="profl", artifacts=str(artifacts), out=str(out), dataset="digits", devices=4,
                         per_round=2, rounds=3, epochs=1, workers=2, seed=3, pace=PACE,
                         options={"shrink_rounds": 1, "distill_rounds": 1})

    whole = run_flower_simulation(cfg(tmp_path / "whole"), quiet=True)
    with pytest.raises(Stopped):
        run_flower_simulation(cfg(tmp_path / "split"), quiet=True, stop_after=1)
    assert load_state(tmp_path / "split").round == 1
    resumed = run_flower_simulation(cfg(tmp_path / "split"), resume=True, quiet=True)
    a, b = load_state(whole), load_state(resumed)
    assert a.round == b.round == 3
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)
    ha = json.loads((whole / "history.json").read_text())["rounds"]
    hb = json.loads((resumed / "history.json").read_text())["rounds"]
    assert [(r["stage"], r["participants"]) for r in ha] == [(r["stage"], r["participants"]) for r in hb]
    for r in hb:  # no device failed, and the round's participants scored the model on their held-out shards
        assert not r["failed"], r["failed"]
        assert r["device_eval"]["samples"] > 0 if r["participants"] else r["device_eval"] is None
