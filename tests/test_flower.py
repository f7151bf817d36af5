"""progfl on Flower 1.41: a real loopback deployment (SuperLink + 3 SuperNodes, `flwr run`) and the simulation engine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
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

BIN = Path(sys.executable).parent
APP = Path(__file__).resolve().parent.parent / "progfl" / "flower_app"
PACE = {"window": 2, "slope_window": 2, "min_rounds": 1}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("flower") / "a"
    export_model(build_model("cnn", 10, (1, 8, 8), width=4), folder, [DeviceClass("any", 4096.0)],
                 kinds=("grow", "distill", "full"), batch_size=16, measure_batches=[1, 16], backends=("ort",))
    return folder


# ---- process handling: every process started here is stopped by pid, with its descendants ----
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(p.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def _stop(procs: list[subprocess.Popen], extra: set[int]) -> list[int]:
    """SIGTERM each started process and every descendant seen (by pid), wait, SIGKILL what remains."""
    pids = set(extra)
    for p in procs:
        pids.add(p.pid)
        pids.update(_descendants(p.pid))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 20
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    while time.time() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    time.sleep(0.5)
    return [pid for pid in pids if _alive(pid)]


def _env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _flwr(args: list[str], env: dict[str, str], timeout: float = 120) -> dict:
    r = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=env, capture_output=True, text=True,
                       timeout=timeout)
    start = r.stdout.find("{")
    if start < 0:
        raise AssertionError(f"flwr {' '.join(args)} printed no JSON:\n{r.stdout}\n{r.stderr}")
    return json.loads(r.stdout[start:])


def test_deployment_superlink_three_supernodes(artifacts, tmp_path):
    manifest = Manifest.load(artifacts)
    plan = make_plan("profl", manifest, PlanConfig(rounds=2))
    first = plan.phases[0].stage
    need = {s.name: required_mb(manifest, s.name) for s in manifest.stages}
    small = need[first] - 0.5  # cannot hold the first stage (even at micro-batch 1)
    big = max(need.values()) + 40.0
    budgets = [big, big + 10.0, small]
    assert not size_stage(manifest.stage(first), small, manifest.batch_size, manifest.safety_margin).fits

    train, test = load_dataset("digits", seed=0)
    write_shards(train, iid(train.y, 3, np.random.default_rng(0)), tmp_path / "data")
    write_dataset(test, tmp_path / "test.npz")

    port = _free_port()
    procs: list[subprocess.Popen] = []
    logs = []
    seen: set[int] = set()
    try:
        log = open(tmp_path / "superlink.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--database", str(tmp_path / "state.db"), "--disable-runtime-dependency-installation"],
            env=_env(tmp_path / "home-link"), stdout=log, stderr=subprocess.STDOUT))
        for i, b in enumerate(budgets):
            log = open(tmp_path / f"supernode{i}.log", "w")
            logs.append(log)
            cfg = (f'memory-mb={b} data-path="{tmp_path / "data" / f"device_{i:04d}.npz"}" '
                   f'artifacts-dir="{tmp_path / f"cache{i}"}" backend="ort" threads=1 device-id={i}')
            procs.append(subprocess.Popen(
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--port", str(_free_port()), "--node-config", cfg],
                env=_env(tmp_path / f"home-node{i}"), stdout=log, stderr=subprocess.STDOUT))
        cli_home = tmp_path / "home-cli"
        env = _env(cli_home)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        run_cfg = (f'artifacts="{artifacts}" out="{tmp_path / "run"}" test-data="{tmp_path / "test.npz"}" '
                   f'plan="profl" rounds=2 per-round=3 seed=1 lr=0.05 epochs=1 min-nodes=3 query-timeout=120.0 '
                   f'round-timeout=300.0 pace=\'{json.dumps(PACE)}\'')
        deadline = time.time() + 60
        while True:  # the SuperLink needs a moment before it accepts runs
            started = _flwr(["run", str(APP), "deploy", "--run-config", run_cfg], env)
            if started.get("success") or time.time() > deadline:
                break
            time.sleep(2)
        assert started.get("success"), started
        run_id = started["run-id"]
        status, deadline = "", time.time() + 150
        while time.time() < deadline:
            for p in procs:  # remember descendants (superexec, serverapp, clientapps) while they exist
                seen.update(_descendants(p.pid))
            runs = _flwr(["ls", "deploy", "--run-id", run_id], env, timeout=60)["runs"]
            status = runs[0]["status"] if runs else ""
            if status.startswith("finished"):
                break
            time.sleep(2)
        assert status == "finished:completed", (status, (tmp_path / "superlink.log").read_text()[-3000:])
    finally:
        for p in procs:
            seen.update(_descendants(p.pid))
        left = _stop(procs, seen)
        for f in logs:
            f.close()
    assert not left, f"processes left running: {left}"

    h = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["round"] for r in h["rounds"]] == [1, 2]
    assert sorted(d["budget_mb"] for d in h["fleet"]) == sorted(budgets)
    small_id = next(d["id"] for d in h["fleet"] if d["budget_mb"] == small)
    for r in h["rounds"]:
        assert not r["failed"], r["failed"]
        assert r["participants"] and 0.0 <= r["accuracy"] <= 1.0
        fits = size_stage(manifest.stage(r["stage"]), small, manifest.batch_size, manifest.safety_margin).fits
        if not fits:
            assert small_id not in r["participants"]
        assert all(d["peak_mb"] > 0 and d["samples"] > 0 for d in r["devices"])
    # the small node never received the files of the stage it cannot hold; the others did, once
    sha = (tmp_path / "cache0").iterdir().__next__().name
    train_file = manifest.stage(first).files["training"].path
    assert (tmp_path / "cache0" / sha / train_file).exists()
    assert not (tmp_path / "cache2" / sha / train_file).exists()
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


def test_simulation_engine_stops_on_divergence(artifacts, tmp_path):
    """The Flower strategy honours max_rejected_rounds like progfl simulate: lr 1e30 makes every update NaN."""
    from progfl.server.divergence import Diverged
    from progfl.server.flower_sim import run_flower_simulation
    from progfl.server.simulation import SimConfig

    manifest = Manifest.load(artifacts)
    fleet = [max(required_mb(manifest, s.name) for s in manifest.stages) + 10.0] * 3
    cfg = SimConfig(plan="fedavg", artifacts=str(artifacts), out=str(tmp_path / "run"), dataset="digits", devices=3,
                    per_round=2, rounds=5, epochs=1, lr=1e30, workers=2, seed=1, fleet=fleet, max_rejected_rounds=2)
    with pytest.raises(Diverged, match="rounds 1, 2"):
        run_flower_simulation(cfg, quiet=True)
    h = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["round"] for r in h["rounds"]] == [1, 2]
    assert all(r["participants"] and len(r["dropped"]) == len(r["participants"]) for r in h["rounds"])
