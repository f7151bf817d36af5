"""Stragglers: a per-round deadline drops late devices (logged, not aggregated), simulated device times come from the
seed alone, and SmartFreeze's selector weighs only what the server measured."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from progfl.exporter import export_model
from progfl.manifest import DeviceClass, Manifest, TrainUpdate
from progfl.models import build_model
from progfl.server.deadline import measured_rates, simulate_time, speed_factors, stage_cost
from progfl.server.flower import DeadlineGrid
from progfl.server.plans import PlanConfig, make_plan
from progfl.server.selection import DeviceInfo
from progfl.server.simulation import SimConfig, Stopped, run_simulation
from progfl.server.state import ServerState, load_state

from fleets import budgets_above

ABOVE_NEED = (1.5, 5.0, 8.0, 11.0, 16.0, 46.0)  # as tests/test_simulation.py: MB above the cheapest grow stage's need
PACE = {"window": 2, "slope_window": 2, "min_rounds": 1}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("stragglers") / "a"
    export_model(build_model("cnn", 10, (1, 8, 8), width=4), folder, [DeviceClass("any", 4096.0)],
                 kinds=("grow", "full"), batch_size=16, measure_batches=[1, 16], backends=("ort",))
    return folder


def fleet_for(artifacts) -> list[float]:
    """Every budget holds some stage."""
    return budgets_above(artifacts, ABOVE_NEED)


def config(artifacts, out, **kw) -> SimConfig:
    base = dict(plan="fedavg", artifacts=str(artifacts), out=str(out), dataset="digits", devices=6, per_round=4,
                rounds=1, lr=0.05, epochs=1, workers=2, seed=1, fleet=fleet_for(artifacts), pace=PACE,
                speed_spread=1.0)
    return SimConfig(**{**base, **kw})


def rounds(run) -> list[dict]:
    return json.loads((run / "history.json").read_text())["rounds"]


def test_a_device_over_the_deadline_is_dropped_and_logged_one_under_it_kept(artifacts, tmp_path, caplog):
    free = rounds(run_simulation(config(artifacts, tmp_path / "free"), quiet=True))[0]
    times = {d["id"]: d["seconds"] for d in free["devices"]}
    assert len(times) == 4 and free["late"] == [] and free["round_seconds"] == max(times.values())
    for d in free["devices"]:  # both times are recorded: the simulated one and the one measured on this machine
        assert d["measured_seconds"] > 0 and d["seconds"] != d["measured_seconds"]
    ordered = sorted(times.values())
    deadline = (ordered[-2] + ordered[-1]) / 2  # the slowest device is over it, the others under
    slowest = max(times, key=times.get)
    with caplog.at_level(logging.WARNING, logger="progfl.server"):
        run = run_simulation(config(artifacts, tmp_path / "deadline", deadline=deadline), quiet=True)
    r = rounds(run)[0]
    assert r["selected"] == free["selected"]
    assert [x["id"] for x in r["late"]] == [slowest] and r["late"][0]["seconds"] == times[slowest]
    assert r["late"][0]["measured_seconds"] > 0
    assert sorted(r["participants"]) == sorted(set(times) - {slowest})
    assert {d["id"]: d["seconds"] for d in r["devices"]} == {i: s for i, s in times.items() if i != slowest}
    assert r["round_seconds"] == deadline  # the server waited until the deadline
    logged = [m.getMessage() for m in caplog.records if m.name == "progfl.server"]
    assert any(f"device {slowest} missed the {deadline:g} s deadline of round 1" in m for m in logged), logged
    a, b = load_state(tmp_path / "free").arrays, load_state(run).arrays
    assert any(not np.array_equal(a[n], b[n]) for n in a), "the late update was aggregated anyway"


def test_every_device_late_keeps_the_model_and_is_not_divergence(artifacts, tmp_path):
    """A deadline nobody meets: nothing is aggregated, yet the run is slow, not diverged: it trains its budget."""
    run = run_simulation(config(artifacts, tmp_path / "tight", deadline=1e-6, rounds=4, max_rejected_rounds=2),
                         quiet=True)
    for r in rounds(run):
        assert r["participants"] == [] and len(r["late"]) == len(r["selected"]) == 4 and r["kept_previous"]
    initial = Manifest.load(artifacts).initial_weights(artifacts)
    final = load_state(run).arrays
    assert all(np.array_equal(final[n], initial[n]) for n in initial)


def test_simulated_times_come_from_the_seed_not_the_clock():
    a, b = speed_factors(3, 50, 0.5), speed_factors(3, 50, 0.5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, speed_factors(4, 50, 0.5))
    assert np.all(speed_factors(3, 50, 0.0) == 1.0)  # spread 0: identical devices
    assert 0.7 < np.median(speed_factors(0, 2001, 0.5)) < 1.4

    def simulated(measured: float) -> float:
        u = TrainUpdate(round=1, stage="full", weights={}, num_samples=120, metrics={"seconds": measured})
        simulate_time(u, factor=0.5, cost=0.8, epochs=2, sample_seconds=0.01)
        assert u.metrics["measured_seconds"] == measured
        assert u.metrics["samples_per_s"] == pytest.approx(240 / u.metrics["seconds"])
        return u.metrics["seconds"]

    assert simulated(0.3) == simulated(7.0) == pytest.approx(2 * 120 * 0.01 * 0.8 / 0.5)


def test_a_deadline_run_resumes_exactly(artifacts, tmp_path):
    """SmartFreeze under a deadline, stopped after round 1 and resumed: the same late devices, choices and weights."""
    kw = dict(plan="smartfreeze", rounds=3, per_round=3, deadline=1.2, sample_seconds=0.01)
    whole = run_simulation(config(artifacts, tmp_path / "whole", **kw), quiet=True)
    with pytest.raises(Stopped):
        run_simulation(config(artifacts, tmp_path / "split", **kw), quiet=True, stop_after=1)
    resumed = run_simulation(config(artifacts, tmp_path / "split", **kw), resume=True, quiet=True)
    ha, hb = rounds(whole), rounds(resumed)
    assert any(r["late"] for r in ha) and any(r["participants"] for r in ha), "the deadline must bite, not drop all"
    def seen(h):  # what the server decided and timed (measured_seconds is this machine's clock: it varies)
        return [(r["selected"], r["participants"], [(x["id"], x["seconds"]) for x in r["late"]], r["round_seconds"],
                 [d["seconds"] for d in r["devices"]]) for r in h]

    assert seen(ha) == seen(hb)
    a, b = load_state(whole), load_state(resumed)
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)


def _state(plan, manifest, artifacts, history, deadline) -> ServerState:
    state = ServerState(round=len(history), plan=plan.name, plan_state={}, arrays=manifest.initial_weights(artifacts),
                        pace={}, rng=np.random.default_rng(0).bit_generator.state, config={"deadline": deadline})
    plan.start(state)
    state.history = history
    return state


def test_the_selector_sees_measured_speeds_only(artifacts):
    """Speeds come from the times of earlier rounds (on time or late), never from what DeviceInfo carried in (where
    a simulation would have its hidden factor); under a deadline they become the predicted on-time share."""
    manifest = Manifest.load(artifacts)
    plan = make_plan("smartfreeze", manifest, PlanConfig(rounds=10, per_round=2, epochs=2, pace=_pace()))
    history = [{"stage": "grow-1", "devices": [{"id": 0, "seconds": 2.0, "samples": 100}],
                "late": [{"id": 1, "seconds": 20.0, "samples": 100}]}]

    def speeds(history, deadline, hidden):
        devices = [DeviceInfo(i, 4096.0, 100, np.ones(10), speed=hidden[i]) for i in range(3)]
        state = _state(plan, manifest, artifacts, history, deadline)
        return {d.id: d.speed for d in plan.candidates(devices, state)}

    assert speeds([], None, [50.0, 0.01, 3.0]) == {0: 1.0, 1: 1.0, 2: 1.0}  # nothing measured: all equal
    c1, c0 = stage_cost(manifest, "grow-1"), stage_cost(manifest, "grow-0")
    rate = {0: 2 * 100 * c1 / 2.0, 1: 2 * 100 * c1 / 20.0}
    assert measured_rates(history, manifest, 2) == pytest.approx(rate)
    for hidden in ([50.0, 0.01, 3.0], [0.01, 50.0, 1.0]):
        assert speeds(history, None, hidden) == pytest.approx({**rate, 2: (rate[0] + rate[1]) / 2})
        # deadline 4 s on grow-0 (the active stage): predicted seconds = 2 epochs x 100 samples x cost / rate
        predicted = {i: 2 * 100 * c0 / r for i, r in {**rate, 2: (rate[0] + rate[1]) / 2}.items()}
        assert speeds(history, 4.0, hidden) == pytest.approx({i: min(1.0, 4.0 / p) for i, p in predicted.items()})


def _pace():
    from progfl.server.pace import PaceConfig

    return PaceConfig(window=2, slope_window=2, min_rounds=1)


class _FakeGrid:
    """Replies to each pushed training message after a set delay (None: never)."""

    def __init__(self, delays: dict[int, float | None]):
        self.delays, self.pushed, self.t0 = delays, {}, 0.0

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        self.pushed = {f"m{m.dst}": m.dst for m in messages}
        return list(self.pushed)

    def pull_messages(self, ids):
        now = time.monotonic() - self.t0
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids
                if self.delays[self.pushed[i]] is not None and self.delays[self.pushed[i]] <= now]


def test_flower_stops_waiting_at_the_deadline():
    grid = DeadlineGrid(_FakeGrid({1: 0.0, 2: 0.3, 3: 2.0, 4: None}), deadline=0.8, poll=0.05)
    train = [SimpleNamespace(dst=n, metadata=SimpleNamespace(message_type=MessageType.TRAIN)) for n in (1, 2, 3, 4)]
    t0 = time.monotonic()
    replies = grid.send_and_receive(train, timeout=3600.0)
    assert time.monotonic() - t0 < 1.5, "waited past the deadline"
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m2"]  # m3 would come after it
    assert set(grid.arrived) == {"m1", "m2"} and grid.arrived["m2"] >= 0.3 and 0.8 <= grid.waited < 1.5


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bad_deadline_is_one_line_and_exit_2(artifacts, tmp_path, value):
    fleet = tmp_path / "fleet.json"
    fleet.write_text(json.dumps(fleet_for(artifacts)))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "progfl.cli", "simulate", "--artifacts", str(artifacts), "--out",
                        str(out), "--dataset", "digits", "--fleet", str(fleet), "--deadline", value],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.strip().splitlines() == [f"error: deadline must be a number of seconds > 0, got {float(value)}"]
    assert not out.exists()


def test_flower_nodes_that_miss_the_deadline_are_late(artifacts, tmp_path):
    """On Flower's simulation engine the deadline is wall time: no node trains in a millisecond, so every selected
    node is late, logged in the record with the time waited, and nothing is aggregated."""
    from progfl.server.flower_sim import run_flower_simulation

    cfg = config(artifacts, tmp_path / "run", plan="smartfreeze", devices=4, per_round=3, rounds=2, fleet=[4096.0] * 4,
                 deadline=1e-3)
    run = run_flower_simulation(cfg, quiet=True)
    for r in rounds(run):
        assert r["participants"] == [] and r["failed"] == [] and r["round_seconds"] == 1e-3
        assert [x["id"] for x in r["late"]] == r["selected"] and len(r["selected"]) == 3
        assert all(1e-3 <= x["seconds"] < 5.0 and x["samples"] > 0 for x in r["late"])
