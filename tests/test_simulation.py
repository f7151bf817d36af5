"""The server end to end on a tiny model: every plan runs, budgets are respected, a stopped run resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from progfl.exporter import export_model
from progfl.manifest import DeviceClass, Manifest, size_stage
from progfl.models import build_model
from progfl.server.plans import PLANS
from progfl.server.simulation import SimConfig, Stopped, run_simulation
from progfl.server.state import load_state


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sim") / "a"
    export_model(build_model("cnn", 10, (1, 8, 8), width=4), folder, [DeviceClass("any", 4096.0)],
                 kinds=("grow", "distill", "neulite", "full"), batch_size=16, measure_batches=[1, 16], backends=("ort",))
    return folder


FLEET = [75.0, 79.0, 82.0, 85.0, 90.0, 120.0]  # the tiny model's stages need ~73-78 MB (runtime baseline)


def config(artifacts, out, plan, **kw) -> SimConfig:
    base = dict(plan=plan, artifacts=str(artifacts), out=str(out), dataset="digits", devices=6, per_round=3,
                rounds=2, lr=0.05, epochs=1, workers=2, seed=1, fleet=FLEET, pace={"window": 2, "slope_window": 2, "min_rounds": 1})
    return SimConfig(**{**base, **kw})


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_every_plan_runs_two_rounds(artifacts, tmp_path, plan):
    run = run_simulation(config(artifacts, tmp_path / plan, plan), quiet=True)
    h = json.loads((run / "history.json").read_text())
    assert [r["round"] for r in h["rounds"]] == [1, 2]
    manifest = Manifest.load(artifacts)
    for r in h["rounds"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["test_loss"])
        assert r["participants"] and not r["dropped"]
        stage = manifest.stage(r["stage"])
        for d in r["devices"]:
            assert d["peak_mb"] > 0 and d["samples"] > 0
            assert not d["torch_imported"], "a simulated device must run torch-free"
            if plan != "fedavg":  # fedavg ignores memory on purpose; everyone else must fit
                assert size_stage(stage, d["budget_mb"], manifest.batch_size, manifest.safety_margin).fits
    assert (run / "report.md").exists() and (run / "accuracy.png").exists()
    initial = manifest.initial_weights(artifacts)
    final = load_state(run).arrays
    assert any(not np.array_equal(final[n], initial[n]) for n in initial), "the global model did not change"


def test_exclusive_only_uses_devices_that_hold_full_training(artifacts, tmp_path):
    run = run_simulation(config(artifacts, tmp_path / "ex", "exclusive", devices=20, full_share=0.3, fleet=None),
                         quiet=True)
    h = json.loads((run / "history.json").read_text())
    manifest = Manifest.load(artifacts)
    full = manifest.stage("full")
    budgets = {d["id"]: d["budget_mb"] for d in h["fleet"]}
    holders = {i for i, b in budgets.items() if size_stage(full, b, manifest.batch_size, manifest.safety_margin).fits}
    assert 0 < len(holders) < 20
    for r in h["rounds"]:
        assert set(r["participants"]) <= holders and r["eligible"] == len(holders)


def test_resume_gives_the_same_weights(artifacts, tmp_path):
    cfg = dict(plan="profl", rounds=5, options={"shrink_rounds": 1, "distill_rounds": 1})
    whole = run_simulation(config(artifacts, tmp_path / "whole", **cfg), quiet=True)
    with pytest.raises(Stopped):
        run_simulation(config(artifacts, tmp_path / "split", **cfg), quiet=True, stop_after=2)
    assert load_state(tmp_path / "split").round == 2
    resumed = run_simulation(config(artifacts, tmp_path / "split", **cfg), resume=True, quiet=True)
    a, b = load_state(whole), load_state(resumed)
    assert a.round == b.round == 5
    position = ("phase", "rounds_in_phase")  # 'speed' holds measured wall-clock rates: they differ run to run
    assert {k: a.plan_state[k] for k in position} == {k: b.plan_state[k] for k in position}
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)
    ha = json.loads((whole / "history.json").read_text())["rounds"]
    hb = json.loads((resumed / "history.json").read_text())["rounds"]
    assert [r["participants"] for r in ha] == [r["participants"] for r in hb]


def test_round_without_eligible_devices_keeps_weights(artifacts, tmp_path):
    run = run_simulation(config(artifacts, tmp_path / "none", "exclusive", devices=3, fleet=[60.0, 61.0, 62.0]),
                         quiet=True)
    h = json.loads((run / "history.json").read_text())
    assert all(r["participants"] == [] and r["kept_previous"] for r in h["rounds"])
    initial = Manifest.load(artifacts).initial_weights(artifacts)
    for name, value in load_state(run).arrays.items():
        np.testing.assert_array_equal(value, initial[name])


def test_bad_simulation_input(artifacts, tmp_path):
    with pytest.raises(ValueError, match="unknown plan"):
        run_simulation(config(artifacts, tmp_path / "x", "nope"), quiet=True)
    with pytest.raises(ValueError, match="has samples of shape"):
        run_simulation(config(artifacts, tmp_path / "y", "profl", dataset="mnist5k"), quiet=True)
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        run_simulation(config(artifacts, tmp_path / "z", "profl"), quiet=True)


def test_divergence_stops_the_run_with_exit_code_2(artifacts, tmp_path):
    """lr 1e30 makes every local update NaN: the run stops after exactly k = 3 rounds (the default), keeping what it
    wrote."""
    from click.testing import CliRunner

    from progfl.cli import main

    fleet = tmp_path / "fleet.json"
    fleet.write_text(json.dumps(FLEET))
    out = tmp_path / "nan"
    result = CliRunner().invoke(main, [
        "simulate", "--plan", "fedavg", "--artifacts", str(artifacts), "--out", str(out), "--dataset", "digits",
        "--fleet", str(fleet), "--per-round", "2", "--rounds", "6", "--epochs", "1", "--lr", "1e30", "--seed", "1",
        "--workers", "2"])
    assert result.exit_code == 2, result.output
    message = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "diverged" in message[0] and "rounds 1, 2, 3" in message[0], result.output
    assert "--lr" in message[0] and "--epochs" in message[0] and "normalised output module" in message[0]
    h = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in h["rounds"]] == [1, 2, 3]
    for r in h["rounds"]:
        assert r["participants"] and len(r["dropped"]) == len(r["participants"]) and r["kept_previous"]
        assert all("NaN or Inf" in why for _, why in r["dropped"])
    assert load_state(out).round == 3


def test_compare_runs_every_plan_when_one_diverges(artifacts, tmp_path):
    """fedavg at lr 1e30 diverges; compare still runs exclusive after it, tables both, and exits 2 naming fedavg."""
    from click.testing import CliRunner

    from progfl.cli import main

    fleet = tmp_path / "fleet.json"
    fleet.write_text(json.dumps(FLEET))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(main, [
        "compare", "--plans", "fedavg,exclusive", "--artifacts", str(artifacts), "--out", str(out), "--dataset",
        "digits", "--fleet", str(fleet), "--per-round", "2", "--rounds", "4", "--epochs", "1", "--lr", "1e30",
        "--seed", "1", "--workers", "2", "--max-rejected-rounds", "2"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: fedavg: training diverged"), result.output
    assert "exclusive: training diverged" in errors[0], "exclusive ran after fedavg diverged (and diverged too)"
    for plan in ("fedavg", "exclusive"):
        assert [r["round"] for r in json.loads((out / plan / "history.json").read_text())["rounds"]] == [1, 2]
    assert "| fedavg |" in result.output and "| exclusive |" in result.output and (out / "report.md").exists()
