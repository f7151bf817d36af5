"""The server end to end on a tiny model: every plan runs, budgets are respected, a stopped run resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from progfl.exporter import export_model
from progfl.manifest import DeviceClass, Manifest, size_stage
from progfl.models import build_model
from progfl.server.plans import PLANS
from progfl.server.simulation import SimConfig, Stopped, run_simulation
from progfl.server.state import load_state

from fleets import budgets_above


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sim") / "a"
    export_model(build_model("cnn", 10, (1, 8, 8), width=4), folder, [DeviceClass("any", 4096.0)],
                 kinds=("grow", "distill", "neulite", "full", "width", "depth"), batch_size=16, measure_batches=[1, 16],
                 backends=("ort",))
    return folder


# Six budgets, MB above what the cheapest grow stage needs: derived from the export's measured peaks, so each keeps its
# place among the stages' needs when the runtime's baseline moves (the first fleet, 75..120 MB, was copied from one
# measurement at ~73.6-77 MB a stage). The smallest holds only the cheapest stages, the largest every stage.
ABOVE_NEED = (1.5, 5.0, 8.0, 11.0, 16.0, 46.0)


def fleet_for(artifacts) -> list[float]:
    return budgets_above(artifacts, ABOVE_NEED)


def config(artifacts, out, plan, **kw) -> SimConfig:
    base = dict(plan=plan, artifacts=str(artifacts), out=str(out), dataset="digits", devices=6, per_round=3,
                rounds=2, lr=0.05, epochs=1, workers=2, seed=1, fleet=fleet_for(artifacts), pace={"window": 2, "slope_window": 2, "min_rounds": 1})
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
        trained = {i: name for name, ids in r.get("sub_models", {}).items() for i in ids}  # width plans: per device
        for d in r["devices"]:
            assert d["peak_mb"] > 0 and d["samples"] > 0
            assert not d["torch_imported"], "a simulated device must run torch-free"
            stage = manifest.stage(trained.get(d["id"], r["stage"]))
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
    assert a.plan_state == b.plan_state
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)
    ha = json.loads((whole / "history.json").read_text())["rounds"]
    hb = json.loads((resumed / "history.json").read_text())["rounds"]
    assert [r["participants"] for r in ha] == [r["participants"] for r in hb]


def test_a_fleet_that_fits_no_stage_is_refused(artifacts, tmp_path):
    """Every round would run without participants: refused before the run folder exists. The budgets are 1-3 MB
    below what the cheapest stage needs (derived: with copied numbers a smaller runtime would make them fit)."""
    below = budgets_above(artifacts, (-3.0, -2.0, -1.0), kinds=None)
    with pytest.raises(ValueError, match="no device of the fleet .* can hold any of its stages"):
        run_simulation(config(artifacts, tmp_path / "none", "exclusive", devices=3, fleet=below), quiet=True)
    assert not (tmp_path / "none").exists()


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
    fleet.write_text(json.dumps(fleet_for(artifacts)))
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
    for r in h["rounds"]:  # every device refused to send its diverged update: failed, none accepted
        assert r["selected"] and not r["participants"] and r["kept_previous"]
        assert [d for d, _ in r["failed"]] == r["selected"]
        assert all("training diverged" in why for _, why in r["failed"]), r["failed"]
    assert load_state(out).round == 3


def test_resume_in_the_middle_of_an_em_window_continues_it(artifacts, tmp_path):
    """SmartFreeze freezes by effective movement: stopped after round 3 of a 2-round window, the resumed run's EM
    values, freezes and weights are the straight run's (a resume that started the window again would differ)."""
    cfg = dict(plan="smartfreeze", rounds=6, pace={"window": 2, "slope_window": 2, "min_rounds": 2, "max_rounds": 3})
    whole = run_simulation(config(artifacts, tmp_path / "whole", **cfg), quiet=True)
    with pytest.raises(Stopped):
        run_simulation(config(artifacts, tmp_path / "split", **cfg), quiet=True, stop_after=3)
    resumed = run_simulation(config(artifacts, tmp_path / "split", **cfg), resume=True, quiet=True)
    ha = json.loads((whole / "history.json").read_text())["rounds"]
    hb = json.loads((resumed / "history.json").read_text())["rounds"]
    assert [r["em"] for r in ha][2:] == [r["em"] for r in hb][2:] and any(r["em"] is not None for r in ha[3:])
    assert [(r["stage"], r["froze"]) for r in ha] == [(r["stage"], r["froze"]) for r in hb]
    assert len({r["stage"] for r in ha}) > 1, "the run must move past its first stage"
    a, b = load_state(whole), load_state(resumed)
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)


def test_compare_runs_every_plan_when_one_diverges(artifacts, tmp_path):
    """fedavg at lr 1e30 diverges; compare still runs exclusive after it, tables both, and exits 2 naming fedavg."""
    from click.testing import CliRunner

    from progfl.cli import main

    fleet = tmp_path / "fleet.json"
    fleet.write_text(json.dumps(fleet_for(artifacts)))
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


def test_compare_reports_every_progressive_and_width_baseline_row(artifacts, tmp_path):
    from click.testing import CliRunner

    from progfl.cli import main

    plans = ["profl", "exclusive", "heterofl", "fedrolex", "allsmall"]
    fleet = tmp_path / "fleet.json"
    fleet.write_text(json.dumps(fleet_for(artifacts)))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(main, [
        "compare", "--plans", ",".join(plans), "--artifacts", str(artifacts), "--out", str(out), "--dataset", "digits",
        "--fleet", str(fleet), "--per-round", "3", "--rounds", "1", "--epochs", "1", "--seed", "1", "--workers", "2"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| ") and not line.startswith("| plan")]
    assert [row.split("|")[1].strip() for row in rows] == plans, result.output
    for plan in plans:
        (record,) = json.loads((out / plan / "history.json").read_text())["rounds"]
        assert record["participants"] and record["accuracy"] is not None
    assert set(json.loads((out / "heterofl" / "history.json").read_text())["rounds"][0]["sub_models"]) <= {
        "width-1", "width-2", "width-4", "width-8"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "progfl.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--pace", "windw=2"], "--pace: unknown key 'windw' (known keys: window, sample_size, slope_window"),
    (["--pace", "window=abc"], "--pace window must be an integer, got 'abc'"),
    (["--pace", "window"], "--pace must be KEY=VALUE, got 'window'"),
    (["--pace", "min_rounds=5", "--pace", "max_rounds=2"], "need 1 <= min_rounds <= max_rounds"),
    (["--option", "shrink_rounds=abc"], "plan profl --option shrink_rounds must be an integer, got 'abc'"),
    (["--option", "shrink_round=2"], "unknown key 'shrink_round' (known keys: shrink_rounds, distill_rounds"),
    (["--option", "distill_lr=nan"], "--option distill_lr must be a finite number"),
    (["--plan", "exclusive", "--option", "order=x"], "plan exclusive --option: unknown key 'order' (known keys: none)"),
    (["--plan", "neulite", "--option", "order=random"], "order must be one of sequential, round-robin"),
    (["--devices", "4"], "the fleet lists 2 budgets for 4 devices"),
    (["--fleet-budgets", "10,11"], "no device of the fleet (budgets 10..11 MB) can hold any of its stages"),
    (["--resume"], "no checkpoint to resume from"),
    (["--outlier-k", "-1"], "outlier-k >= 0"),
    (["--partition", "dirichlet", "--alpha", "0"], "alpha must be > 0"),
])
def test_simulate_refuses_bad_input_before_any_work(artifacts, tmp_path, args, message):
    """One line on stderr, exit 2, and nothing written: no run folder, no data, no round."""
    fleet = tmp_path / "fleet.json"
    budgets = [10.0, 11.0] if "--fleet-budgets" in args else fleet_for(artifacts)[:2]
    args = [a for a in args if a not in ("--fleet-budgets", "10,11")]
    fleet.write_text(json.dumps(budgets))
    out = tmp_path / "run"
    r = _cli("simulate", "--artifacts", str(artifacts), "--out", str(out), "--dataset", "digits", "--fleet", str(fleet),
             "--rounds", "2", "--epochs", "1", *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not out.exists(), "a refused run wrote its folder"


def test_resume_without_checkpoint_leaves_a_foreign_folder_alone(artifacts, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = _cli("simulate", "--artifacts", str(artifacts), "--out", str(out), "--dataset", "digits", "--resume")
    assert r.returncode == 2 and "no checkpoint to resume from" in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_device_never_writes_a_diverged_update(artifacts, tmp_path):
    """lr 1e30: the local round's weights go NaN; the device fails the task (exit 2, one line) and writes nothing,
    and its JSON line is never printed with NaN."""
    from progfl.data import load_dataset

    train, _ = load_dataset("digits", seed=0)
    np.savez(tmp_path / "shard.npz", x=train.x[:64], y=train.y[:64])
    out = tmp_path / "update.npz"
    r = _cli("device", "train", "--artifacts", str(artifacts), "--stage", "full", "--data", str(tmp_path / "shard.npz"),
             "--lr", "1e30", "--epochs", "1", "--out", str(out), "--backend", "ort")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "training diverged" in r.stderr, r.stderr
    assert not out.exists() and "NaN" not in r.stdout
    ok = _cli("device", "train", "--artifacts", str(artifacts), "--stage", "full", "--data", str(tmp_path / "shard.npz"),
              "--epochs", "1", "--out", str(out), "--backend", "ort")
    assert ok.returncode == 0 and out.exists(), ok.stderr
    json.loads(ok.stdout)  # valid JSON


def _start_simulate(artifacts, tmp_path, out, rounds: int) -> subprocess.Popen:
    """`progfl simulate` in its own session (a terminal's Ctrl-C reaches its whole process group)."""
    fleet = tmp_path / "fleet.json"
    fleet.write_text(json.dumps(fleet_for(artifacts)))
    return subprocess.Popen(
        [sys.executable, "-m", "progfl.cli", "simulate", "--plan", "fedavg", "--artifacts", str(artifacts), "--out",
         str(out), "--dataset", "digits", "--fleet", str(fleet), "--per-round", "3", "--rounds", str(rounds),
         "--epochs", "3", "--seed", "1", "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # as from a terminal: a background job of a shell (`make test &`) ignores SIGINT; children would inherit it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_jobs(p: subprocess.Popen, out, timeout: float = 120) -> list[int]:
    """Wait until a round has been checkpointed and device jobs run again; every descendant of p then."""
    from loopback import descendants

    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = descendants(p.pid)
        grandchildren = [k for k in kids if any(True for _ in descendants(k))]  # the forkserver has jobs
        if (out / "checkpoint" / "state.json").exists() and grandchildren:
            return kids
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.05)
    raise AssertionError("no round in progress seen")


def test_ctrl_c_finishes_the_checkpoint_and_exits_130(artifacts, tmp_path):
    out = tmp_path / "run"
    p = _start_simulate(artifacts, tmp_path, out, rounds=40)
    _wait_for_jobs(p, out)
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the server and its device processes
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted:"), err
    stopped = load_state(out)  # whole, and loadable
    assert 1 <= stopped.round < 40
    assert not list(out.glob(".checkpoint.tmp.*"))


def test_no_process_outlives_a_killed_server_and_resume_continues(artifacts, tmp_path):
    from loopback import alive

    out = tmp_path / "run"
    p = _start_simulate(artifacts, tmp_path, out, rounds=6)
    kids = _wait_for_jobs(p, out)
    assert kids, "no forkserver, tracker or device process seen"
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(k) for k in kids):
        time.sleep(0.2)
    assert not [k for k in kids if alive(k)], "processes of the killed server still run 10 s later"
    done = load_state(out).round
    r = _cli("simulate", "--plan", "fedavg", "--artifacts", str(artifacts), "--out", str(out), "--dataset", "digits",
             "--fleet", str(tmp_path / "fleet.json"), "--per-round", "3", "--rounds", "6", "--epochs", "3", "--seed",
             "1", "--workers", "2", "--resume")
    assert r.returncode == 0, r.stderr
    h = json.loads((out / "history.json").read_text())
    assert [x["round"] for x in h["rounds"]] == list(range(1, 7)) and done < 6


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start(artifacts, tmp_path):
    """Killed while round 1 ran: no checkpoint, but the folder is the run's own (run.json, its data). --resume
    starts it again on that data; the same folder with other settings, or no run.json, is refused."""
    from progfl.server.rounds import RoundEngine
    from progfl.server.simulation import prepare_data
    from progfl.server.state import StateError

    cfg = config(artifacts, tmp_path / "r1", "fedavg")
    engine = RoundEngine(cfg, quiet=True)
    prepare_data(cfg, engine.manifest, engine.run)  # ...and the process dies in round 1
    del engine
    with pytest.raises(StateError, match="other settings"):
        run_simulation(config(artifacts, tmp_path / "r1", "fedavg", lr=0.01), resume=True, quiet=True)
    with pytest.raises(ValueError, match="not empty"):
        run_simulation(config(artifacts, tmp_path / "r1", "fedavg"), quiet=True)
    resumed = run_simulation(config(artifacts, tmp_path / "r1", "fedavg"), resume=True, quiet=True)
    fresh = run_simulation(config(artifacts, tmp_path / "fresh", "fedavg"), quiet=True)
    a, b = load_state(resumed), load_state(fresh)
    assert a.round == b.round == 2
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)
    (tmp_path / "r1" / "run.json").unlink()
    for c in ("checkpoint", "checkpoint.old"):
        shutil.rmtree(tmp_path / "r1" / c, ignore_errors=True)
    with pytest.raises(StateError, match="no checkpoint to resume from"):
        run_simulation(config(artifacts, tmp_path / "r1", "fedavg"), resume=True, quiet=True)
