"""Every `progfl` command through its command line (issue 13, part 3): --help on every command and subcommand, every
option the README shows, run at least once on a tiny model, and the user errors no other test file drives through the
CLI (each: exit code 2, one `error:` line, nothing written).

User errors already driven through the CLI elsewhere, not repeated here:
- export (test_export_io, test_output_modules): unknown zoo model, malformed --input-shape, opset outside 17..21,
  unknown stage kind, a device class below the smallest stage, non-empty / parentless / unwritable --out,
  an unknown --output-module;
- simulate / compare (test_simulation, test_stragglers, test_scale): every bad --pace / --option key or value,
  --fleet of the wrong length, a fleet that holds no stage, --resume without a checkpoint (also on a foreign folder),
  --outlier-k < 0, --alpha 0, --deadline 0 / -1 / nan / inf, shards too few for the fleet, divergence (simulate,
  compare);
- device train (test_device_runtime, test_simulation, test_torch_backend): empty / missing / wrongly shaped /
  NaN-pixel / out-of-range-label shards, weights of the wrong shape, a NaN weight file, a damaged artifact, a budget
  below the stage, a diverging round, every backend-not-available case;
- apply-profile (test_torch_backend): a profile with a bad result row.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from progfl.cli import main
from progfl.manifest import Manifest
from progfl.server.state import load_state

from fleets import budgets_above

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEVICES = [{"name": "small", "memory_mb": 120}, {"name": "big", "memory_mb": 1024}]
# the fleet: MB above what the export's most expensive stage needs (its measured peak + the 10 % margin), so every
# device holds every stage whatever the runtime's baseline (the first fleet, 75..120 MB, was copied from one
# measurement of ~69 MB a stage). Written to work/fleet.json by the `exported` fixture.
ABOVE_NEED = (5.0, 10.0, 20.0, 50.0)

# (command path, option) of every invocation that exited 0: test_every_option_ran_once checks the set at the end
USED: set[tuple[str, str]] = set()


def commands(group: click.Group = main, path: tuple[str, ...] = ()):
    """Every command and subcommand of the group, recursively: a new command is covered without editing this file."""
    for name, cmd in sorted(group.commands.items()):
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*path, name))


COMMANDS = dict(commands())


def opts_of(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} | {"--help", "-h"}


def record(args: list[str]) -> None:
    path: tuple[str, ...] = ()
    while len(path) < len(args) and (*path, args[len(path)]) in COMMANDS:
        path = (*path, args[len(path)])
    known = opts_of(COMMANDS.get(path, main))
    for a in args[len(path):]:
        flag = a.split("=", 1)[0]
        if flag in known:
            USED.add((" ".join(path), flag))


def cli(*args, ok: bool = True) -> "click.testing.Result":
    """progfl in this process; with ok, it must exit 0 (the output is in the message when it does not)."""
    args = [str(a) for a in args]
    r = CliRunner().invoke(main, args, prog_name="progfl")
    if ok:
        assert r.exit_code == 0, (args, r.output[-3000:], r.exception)
        record(args)
    return r


def run(*args, ok: bool = True, **kw) -> subprocess.CompletedProcess:
    """progfl in its own process (`python -m progfl.cli`), where a real process matters."""
    args = [str(a) for a in args]
    r = subprocess.run([sys.executable, "-m", "progfl.cli", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, **kw)
    if ok:
        assert r.returncode == 0, (args, r.stderr[-3000:])
        record(args)
    return r


def listing(*folders: Path) -> dict[str, bytes]:
    """Every file under the folders with its bytes: 'nothing written' is this, unchanged."""
    return {str(p): p.read_bytes() for f in folders if f.exists() for p in sorted(f.rglob("*")) if p.is_file()} | {
        str(p): b"<dir>" for f in folders if f.exists() for p in f.rglob("*") if p.is_dir()}


def assert_one_error_line(stderr: str, message: str, whole: bool = True) -> None:
    """Exit 2 is checked by the caller. whole: stderr is the error line alone; else progress lines may come first,
    and the error is the last line (and the only `error:` one)."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], stderr
    assert message in lines[-1], (message, stderr)
    if whole:
        assert len(lines) == 1, stderr


# ---- fixtures: one export of each kind, one run ----

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("cli")
    (w / "devices.json").write_text(json.dumps(DEVICES))
    from progfl.data import load_dataset

    train, _ = load_dataset("digits", seed=0)  # 8x8 grey digits: the tiny models' input
    np.savez(w / "shard.npz", x=train.x[:48], y=train.y[:48])
    return w


@pytest.fixture(scope="module")
def exported(work):
    """The tiny CNN, measured (ORT, micro-batches 1 and 16), every option that changes the manifest given."""
    out = work / "art"
    r = cli("export", "--model", "cnn", "--input-shape", "1,8,8", "--width", "4", "--norm", "batch", "--num-classes",
            "10", "--stages", "grow,distill,full", "--batch", "16", "--measure", "--measure-batches", "1,16",
            "--backends", "ort", "--devices", work / "devices.json", "--margin", "0.1", "--seed", "3", "--opset", "18",
            "--output-module", "conv", "--breakdown", "--out", out)
    (work / "fleet.json").write_text(json.dumps(budgets_above(out, ABOVE_NEED, max, kinds=None)))
    return out, r


@pytest.fixture(scope="module")
def user_model(work):
    """`--model module:function` (the example progfl ships), TorchScript files too, AdamW, NeuLite's weights."""
    out = work / "user"
    r = cli("export", "--model", "progfl.models.examples:depthwise_separable", "--input-shape", "1,8,8",
            "--stages", "grow,neulite,full", "--batch", "8", "--no-measure", "--backends", "ort,torch",
            "--optimizer", "adamw", "--momentum", "0.8", "--weight-decay", "0.02", "--neulite-l1", "0.3",
            "--neulite-l2", "0.6", "--output-module", "light", "--explain", "--out", out)
    return out, r


SIM = ["--dataset", "digits", "--per-round", "3", "--rounds", "3", "--epochs", "1", "--lr", "0.05", "--seed", "1",
       "--workers", "2", "--partition", "label-dirichlet", "--alpha", "0.7", "--full-share", "0.2", "--target", "0.2",
       "--deadline", "0.7", "--speed-spread", "0.6", "--sample-seconds", "0.01", "--pace", "window=2",
       "--pace", "min_rounds=1", "--option", "shrink_rounds=1", "--option", "distill_rounds=1",
       "--max-rejected-rounds", "2", "--outlier-k", "20"]


@pytest.fixture(scope="module")
def simulated(exported, work):
    art, _ = exported
    out = work / "run"
    args = ["simulate", "--plan", "profl", "--engine", "progfl", "--artifacts", art, "--fleet", work / "fleet.json",
            "--devices", "4", *SIM, "--out", out]
    r = cli(*args)
    return out, args, r


# ---- --help everywhere, the README against the options ----

def test_the_group_has_the_documented_commands():
    names = {" ".join(p) for p in COMMANDS}
    assert {"export", "explain", "simulate", "compare", "demo", "device", "device train", "device profile",
            "apply-profile"} <= names, names


@pytest.mark.parametrize("path", [(), *COMMANDS], ids=lambda p: " ".join(p) or "progfl")
def test_help(path):
    cmd = COMMANDS.get(path, main)
    for flag in ("--help", "-h"):
        r = CliRunner().invoke(main, [*path, flag], prog_name="progfl")
        assert r.exit_code == 0, r.output
        assert r.stdout.splitlines()[0].startswith(" ".join(["Usage: progfl", *path]) + " ["), r.stdout
        for opt in opts_of(cmd) - {"-h"}:
            assert opt in r.stdout, (path, opt)
        if isinstance(cmd, click.Group):
            for sub in cmd.commands:
                assert sub in r.stdout


def test_simulate_help_lists_the_pace_and_option_keys():
    """README: `--pace` and `--option` keys are declared with their types (`progfl simulate -h` lists them)."""
    out = " ".join(CliRunner().invoke(main, ["simulate", "-h"]).stdout.split())
    for key in ("window", "slope_window", "min_rounds", "max_rounds", "em_threshold", "shrink_rounds", "distill_rounds",
                "distill_lr", "order", "alpha", "explore"):
        assert key in out, key


def test_version():
    r = cli("--version")
    assert re.search(r"\d+\.\d+", r.stdout), r.stdout


def readme_invocations() -> list[tuple[tuple[str, ...], list[str]]]:
    """Every `progfl <command> ...` the README shows (code blocks and inline code), as (command path, tokens)."""
    found = []
    for line in README.read_text().splitlines():
        for m in re.finditer(r"(?<![\w/.-])progfl ([a-z][^`\n]*)", line):
            tokens = m.group(1).split("#")[0].split()
            path: tuple[str, ...] = ()
            while tokens and (*path, tokens[0]) in COMMANDS:
                path, tokens = (*path, tokens[0]), tokens[1:]
            if path:
                found.append((path, tokens))
    return found


def test_every_option_the_readme_shows_exists():
    calls = readme_invocations()
    assert {" ".join(p) for p, _ in calls} >= {"export", "explain", "simulate", "compare", "device train",
                                               "device profile", "apply-profile"}, calls
    for path, tokens in calls:
        known = opts_of(COMMANDS[path])
        for t in tokens:
            if t.startswith("-") and t not in ("-", "--"):
                assert t.split("=")[0].rstrip(").,") in known, f"README shows progfl {' '.join(path)} {t}"


OTHER_TOOLS = {  # flags the README shows for flower-superlink/-supernode, flwr, pip, git, ORT's build.sh, benchmarks
    "--auth-list-public-keys", "--auth-supernode-private-key", "--branch", "--build", "--cmake", "--config",
    "--database", "--disable-runtime-dependency-installation", "--enable", "--enable-supernode-auth", "--format",
    "--host", "--insecure", "--neulite-sweep", "--no-deps", "--node-config", "--parallel", "--port", "--recursive",
    "--root-certificates", "--run-config", "--skip", "--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile",
    "--stream", "--superlink", "--trials"}


def test_every_flag_in_the_readme_is_a_progfl_option_or_another_tools():
    """The prose names options without their command (`--fleet FILE`, `--deadline SECONDS`, ...): each must exist."""
    progfl = set().union(*(opts_of(c) for c in COMMANDS.values()))
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", README.read_text()))
    assert flags - progfl - OTHER_TOOLS == set()
    assert {"--fleet", "--deadline", "--pace", "--option", "--outlier-k", "--max-rejected-rounds"} <= flags & progfl


# ---- export, explain ----

def test_export_measured(exported, work):
    art, r = exported
    m = Manifest.load(art)
    assert [s.name for s in m.stages] == ["grow-0", "grow-1", "grow-2", "distill-1", "distill-2", "full"]
    assert (m.model, m.input_shape, m.num_classes, m.opset, m.batch_size, m.safety_margin) == (
        "cnn", [1, 8, 8], 10, 18, 16, 0.1)
    assert m.model_config["norm"] == "batch" and m.model_config["width"] == 4
    assert m.model_config["output_module"] == "conv"
    assert [(c.name, c.memory_mb) for c in m.device_classes] == [("small", 120.0), ("big", 1024.0)]
    for s in m.stages:
        assert {(p.backend, p.batch) for p in s.memory if p.measured_mb} == {("ort", 1), ("ort", 16)}, s.name
        assert not any(f.startswith("torch") for f in s.files), s.files  # --backends ort: no TorchScript
    assert not list(art.rglob("*.pt"))
    # --breakdown: the table, then each stage's phases
    for s in m.stages:
        assert s.name in r.stdout
    assert "budgets: small=120 MB (ort), big=1024 MB (ort)" in r.stdout
    assert "training session created" in r.stdout and "floor:" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == f"wrote 6 stages to {art}"
    # --seed: the initial weights follow it
    r2 = cli("export", "--model", "cnn", "--input-shape", "1,8,8", "--width", "4", "--stages", "grow", "--batch",
             "16", "--no-measure", "--backends", "ort", "--devices", work / "devices.json", "--seed", "4",
             "--norm", "group", "--out", work / "seed4")
    other = Manifest.load(work / "seed4")
    assert other.model_config["norm"] == "group" and "output modules" not in r2.stdout  # no --explain: no table
    a, b = m.initial_weights(art), other.initial_weights(work / "seed4")
    assert not np.array_equal(a["blocks.0.0.0.weight"], b["blocks.0.0.0.weight"])


def test_export_user_model(user_model):
    art, r = user_model
    m = Manifest.load(art)
    assert m.model == "progfl.models.examples:depthwise_separable" and m.batch_size == 8
    assert m.model_config["output_module"] == "light"
    grows = [s for s in m.stages if s.kind == "grow"]
    neulite = [s for s in m.stages if s.kind == "neulite"]
    assert len(grows) == len(neulite) == 3 and m.stage("full")
    for s in m.stages:
        opt = s.optimizer
        assert (opt["name"], opt["momentum"], opt["weight_decay"]) == ("adamw", 0.8, 0.02), opt
        assert s.has_backend("torch") and s.has_backend("ort"), s.name
        assert not any(p.measured_mb for p in s.memory), "--no-measure measured"
    t = len(grows)
    for s in neulite:  # block t gets l1*(T-t)/T and l2*(t+1)/T
        cfg = s.loss_config
        assert cfg["l1"] == pytest.approx(0.3 * (t - s.block) / t)
        assert cfg["l2"] == pytest.approx(0.6 * (s.block + 1) / t)
    assert list(art.rglob("torch_*.pt"))
    assert "output modules: light basic layers" in r.stdout and "neulite-2" in r.stdout  # --explain


def test_explain(exported):
    art, _ = exported
    r = cli("explain", art)
    table = r.stdout
    assert "grow-0" in table and "full" in table and "budgets: small=120 MB" in table
    assert "training session created" not in table
    r = cli("explain", art, "--breakdown")
    assert r.stdout.startswith(table.rstrip("\n")) and "training session created" in r.stdout


# ---- device train, device profile, apply-profile ----

def test_device_train_every_option(exported, work, tmp_path):
    art, _ = exported
    m = Manifest.load(art)
    initial = m.initial_weights(art)
    start = {k: v * 0.5 for k, v in initial.items()}  # --weights: training starts from these, not the initial ones
    np.savez(tmp_path / "w.npz", **start)
    out, cache = tmp_path / "update.npz", tmp_path / "cache"
    args = ["device", "train", "--artifacts", art, "--stage", "grow-1", "--data", work / "shard.npz", "--budget-mb",
            "75", "--weights", tmp_path / "w.npz", "--lr", "0.05", "--epochs", "2", "--seed", "1", "--threads", "1",
            "--cache", cache, "--out", out, "--backend", "ort"]
    args = [str(a) for a in args]
    r = run(*args)  # its own process: the peak it reports is the device's, not this test process's
    info = json.loads(r.stdout)
    assert "warning" not in r.stderr, r.stderr
    assert (info["stage"], info["backend"], info["num_samples"]) == ("grow-1", "ort", 48)
    assert info["micro_batch"] * info["accum_steps"] == 16 and not info["over_budget"]
    assert info["peak_mb"] > 0 and info["torch_imported"] == 0
    with np.load(out) as z:
        update = dict(z)
    stage = m.stage("grow-1")
    assert set(update) == set(stage.updated_names)
    trained = stage.trainable_names[0]
    assert not np.allclose(update[trained], start[trained]) and not np.allclose(update[trained], initial[trained])
    frozen = [n for n in stage.updated_names if n.startswith("blocks.0.")]  # grow-1 sends only what it trains
    assert not frozen
    assert any(cache.iterdir()), "--cache: the frozen prefix's features were not cached"
    # the same task again (stage by index, features from the cache) gives the same update
    again = tmp_path / "again.npz"
    args2 = [a if a != "grow-1" else "1" for a in args]
    args2[args2.index(str(out))] = str(again)
    run(*args2)
    with np.load(again) as z:
        for n in update:
            np.testing.assert_allclose(z[n], update[n], atol=1e-6, err_msg=n)


def test_device_train_torch_backend(user_model, work, tmp_path):
    art, _ = user_model
    r = run("device", "train", "--artifacts", art, "--stage", "grow-1", "--data", work / "shard.npz", "--epochs", "1",
            "--backend", "torch", "--out", tmp_path / "u.npz")
    info = json.loads(r.stdout)
    assert info["backend"] == "torch" and info["stage"] == "grow-1"
    with np.load(tmp_path / "u.npz") as z:
        assert set(z.files) == set(Manifest.load(art).stage("grow-1").updated_names)


def test_device_profile_then_apply_profile(exported, work, tmp_path):
    art0, _ = exported
    art = tmp_path / "art"
    shutil.copytree(art0, art)
    m = Manifest.load(art)
    # --stages: only those; no --out: nothing written
    r = cli("device", "profile", "--artifacts", art, "--stages", "grow-0,full", "--batches", "2,3", "--steps", "1",
            "--backend", "ort")
    rows = [line.split()[:4] for line in r.stdout.splitlines()]
    assert rows == [["grow-0", "ort", "batch", "2:"], ["grow-0", "ort", "batch", "3:"], ["full", "ort", "batch", "2:"],
                    ["full", "ort", "batch", "3:"]], r.stdout
    prof = tmp_path / "board.json"
    cli("device", "profile", "--artifacts", art, "--batches", "1,4", "--steps", "1", "--threads", "1", "--out", prof)
    p = json.loads(prof.read_text())
    assert p["backend"] == "ort" and p["threads"] == 1 and p["model"] == "cnn"
    assert {(row["stage"], row["batch"]) for row in p["results"]} == {(s.name, b) for s in m.stages for b in (1, 4)}
    # an existing class, then two new ones: one the board's peaks fit, one they do not
    r = cli("apply-profile", art, prof, "--device-class", "small")
    assert "small is sized by its board's profile" in r.stdout
    cli("apply-profile", art, prof, "--device-class", "board", "--memory-mb", "2048")
    r = cli("apply-profile", art, prof, "--device-class", "tiny", "--memory-mb", "30")
    assert "tiny=30 MB" in r.stdout
    m = Manifest.load(art)
    assert m.device_class("board").memory_mb == 2048 and m.device_class("board").profile == "board"
    for s in m.stages:
        assert s.sizing_for("board").fits and not s.sizing_for("tiny").fits, s.name
        assert {pt.batch: pt.measured_mb for pt in s.memory if pt.source == "small"} == {
            row["batch"]: row["peak_mb"] for row in p["results"] if row["stage"] == s.name}
    assert cli("explain", art).stdout == r.stdout  # apply-profile printed the re-sized table


# ---- simulate, compare ----

def test_simulate_every_option(simulated, work):
    out, _, r = simulated
    budgets = json.loads((work / "fleet.json").read_text())
    assert r.stdout.strip() == f"report: {out / 'report.md'}"
    h = json.loads((out / "history.json").read_text())
    cfg = h["config"]
    expected = dict(plan="profl", rounds=3, per_round=3, epochs=1, lr=0.05, seed=1, workers=2, dataset="digits",
                    partition="label-dirichlet", alpha=0.7, full_share=0.2, target=0.2, deadline=0.7, speed_spread=0.6,
                    sample_seconds=0.01, pace={"window": 2, "min_rounds": 1},
                    options={"shrink_rounds": 1, "distill_rounds": 1}, max_rejected_rounds=2, outlier_k=20.0,
                    fleet=budgets, devices=4)
    assert {k: cfg[k] for k in expected} == expected
    assert [d["budget_mb"] for d in h["fleet"]] == budgets
    assert [x["round"] for x in h["rounds"]] == [1, 2, 3]
    # shrink_rounds=distill_rounds=1 with min_rounds 1: one round a shrinking step
    assert [x["stage"] for x in h["rounds"]] == ["grow-2", "distill-2", "grow-1"]
    late = on_time = 0
    for x in h["rounds"]:
        assert len(x["selected"]) <= 3
        for d in x["devices"]:
            assert d["seconds"] <= 0.7 and d["budget_mb"] in budgets
            on_time += 1
        for entry in x["late"]:
            late += 1
            assert entry["seconds"] > 0.7 and entry["id"] in x["selected"], entry
    assert on_time and late, "--deadline 0.7 should drop some devices and keep others (seed 1)"
    for f in ("report.md", "accuracy.png", "memory.png", "checkpoint/state.json"):
        assert (out / f).exists(), f
    assert "Target accuracy: 0.200" in (out / "report.md").read_text()


def test_simulate_resume(simulated):
    """The last checkpoint damaged on disk: --resume falls back to the previous round's, says so, redoes the last
    round, and ends with the weights of the run straight through (a real process: the warning is a log line)."""
    out, args, _ = simulated
    done = load_state(out)
    path = out / "checkpoint" / "arrays.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    r = run(*args[:-2], "--out", out, "--resume")
    assert "arrays.npz: does not match its sha256" in r.stderr and "Traceback" not in r.stderr
    assert "resuming from the previous checkpoint (round 2)" in r.stderr, r.stderr
    resumed = load_state(out)
    assert resumed.round == done.round == 3
    for name in done.arrays:
        np.testing.assert_array_equal(resumed.arrays[name], done.arrays[name], err_msg=name)
    h = json.loads((out / "history.json").read_text())
    assert [x["round"] for x in h["rounds"]] == [1, 2, 3]


def test_simulate_reads_a_user_dataset(work, tmp_path):
    """--data-path: a CIFAR-10 folder (the python pickles, here 50 + 10 random images), on a 3x32x32 export."""
    import pickle

    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name, n in [*((f"data_batch_{i}", 10) for i in range(1, 6)), ("test_batch", 10)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        (root / name).write_bytes(pickle.dumps(batch))
    art = tmp_path / "art"
    cli("export", "--model", "cnn", "--input-shape", "3,32,32", "--width", "4", "--stages", "grow,full", "--no-measure",
        "--backends", "ort", "--devices", work / "devices.json", "--out", art)
    (tmp_path / "fleet.json").write_text(json.dumps([200.0, 300.0]))
    out = tmp_path / "run"
    cli("simulate", "--plan", "fedavg", "--artifacts", art, "--dataset", "cifar10", "--data-path", tmp_path,
        "--fleet", tmp_path / "fleet.json", "--per-round", "2", "--rounds", "1", "--epochs", "1", "--out", out)
    h = json.loads((out / "history.json").read_text())
    assert h["config"]["dataset"] == "cifar10" and h["config"]["data_path"] == str(tmp_path)
    (x,) = h["rounds"]
    assert sorted(x["participants"]) == [0, 1] and sum(d["samples"] for d in x["devices"]) == 50
    with np.load(out / "test.npz") as z:
        assert z["x"].shape == (10, 3, 32, 32)


def test_compare(exported, work, tmp_path):
    art, _ = exported
    out = tmp_path / "cmp"
    r = cli("compare", "--plans", "profl,fedavg", "--artifacts", art, "--fleet", work / "fleet.json", "--devices", "4",
            *SIM[:-8], "--max-rejected-rounds", "2", "--outlier-k", "20", "--out", out)
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| plan")]
    assert [row.split("|")[1].strip() for row in rows] == ["profl", "fedavg"], r.stdout
    assert r.stdout.strip().splitlines()[-1] == f"report: {out / 'report.md'}"
    fleets = []
    for plan in ("profl", "fedavg"):
        h = json.loads((out / plan / "history.json").read_text())
        assert h["plan"] == plan and [x["round"] for x in h["rounds"]] == [1, 2, 3]
        fleets.append(h["fleet"])
    assert fleets[0] == fleets[1], "the plans ran on different fleets"
    assert (out / "report.md").exists() and (out / "accuracy.png").exists()


def test_simulate_on_flower(exported, work, tmp_path):
    """One round on Flower's simulation engine (Ray): about 15 s on 2 cores; its own process, so Ray starts and
    stops with it."""
    art, _ = exported
    out = tmp_path / "flower"
    r = run("simulate", "--engine", "flower", "--plan", "fedavg", "--artifacts", art, "--dataset", "digits", "--fleet",
            work / "fleet.json", "--per-round", "2", "--rounds", "1", "--epochs", "1", "--workers", "2", "--out", out)
    assert r.stdout.strip().splitlines()[-1] == f"report: {out / 'report.md'}"
    h = json.loads((out / "history.json").read_text())
    (x,) = h["rounds"]
    assert len(x["participants"]) == 2 and not x["failed"] and 0 <= x["accuracy"] <= 1
    assert (out / "flower" / "fleet.json").exists() and (out / "eval").is_dir()


# ---- user errors: exit 2, one line, nothing written ----

EXPORT = ["export", "--model", "cnn", "--input-shape", "1,8,8", "--width", "4", "--stages", "grow,full", "--batch",
          "16", "--no-measure", "--backends", "ort", "--devices", "{work}/devices.json", "--out", "{out}"]
SIMULATE = ["simulate", "--artifacts", "{art}", "--dataset", "digits", "--fleet", "{work}/fleet.json", "--rounds", "1",
            "--epochs", "1", "--out", "{out}"]
COMPARE = ["compare", "--artifacts", "{art}", "--dataset", "digits", "--fleet", "{work}/fleet.json", "--rounds", "1",
           "--epochs", "1", "--out", "{out}"]
TRAIN = ["device", "train", "--artifacts", "{art}", "--data", "{work}/shard.npz", "--epochs", "1", "--out", "{out}"]
PROFILE = ["device", "profile", "--artifacts", "{art}", "--backend", "ort", "--steps", "1", "--out", "{out}"]

ERRORS = [
    # export (progress lines may precede an error found while compiling: whole=False)
    (EXPORT + ["--measure-batches", "0,16"], "--measure-batches must be comma-separated positive integers", True),
    (EXPORT + ["--devices", "{work}/missing.json"], "missing.json: no such device-class file", True),
    (EXPORT + ["--devices", "{work}/not.json"], "not.json: not a JSON list of {name, memory_mb, backend}", True),
    (EXPORT + ["--backends", "ort,tpu"], "unknown backend(s) ['tpu']", True),
    (EXPORT[:-4] + ["--out", "{out}"], "device class pi-zero-2w trains with torch, which is not among the backends "
                                       "exported (ort)", True),
    (EXPORT + ["--model", "progfl.models.examples:nosuch"], "cannot load model 'progfl.models.examples:nosuch'", True),
    (EXPORT + ["--model", "no_such_package.models:make"], "No module named 'no_such_package'", True),
    (EXPORT + ["--model", "builtins:dict"], "builtins:dict returned dict, expected an nn.Sequential", True),
    (EXPORT + ["--model", "progfl.models.examples:depthwise_separable", "--stages", "width"],
     "width stages need a zoo model with a channel width", False),
    (EXPORT + ["--num-classes", "0"], "--num-classes and --width must be >= 1", True),
    (EXPORT + ["--width", "0"], "--num-classes and --width must be >= 1", True),
    (EXPORT + ["--batch", "0"], "batch size must be >= 1", True),
    (EXPORT + ["--margin", "1.5"], "safety margin in [0, 1)", True),
    (EXPORT + ["--momentum", "-1"], "momentum must be in [0, 1)", True),
    (EXPORT + ["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan", True),
    (EXPORT + ["--neulite-l1", "-1"], "--neulite-l1 must be a finite number >= 0", True),
    # explain
    (["explain", "{work}/nothing"], "no manifest (run `progfl export` first)", True),
    (["explain", "{work}/badmanifest"], "manifest.json: not valid JSON", True),
    # simulate
    (SIMULATE + ["--plan", "nosuch"], "unknown plan 'nosuch': choose from profl", True),
    (SIMULATE + ["--plan", "heterofl"], "plan heterofl needs stage kinds ['width']: export with --stages width", True),
    (SIMULATE + ["--plan", "depthfl"], "plan depthfl needs stage kinds ['depth']", True),
    (SIMULATE + ["--dataset", "nosuch"], "unknown dataset 'nosuch'", True),
    (SIMULATE + ["--dataset", "mnist5k"], "dataset mnist5k has samples of shape [1, 28, 28], the exported model takes "
                                          "[1, 8, 8]", True),
    (SIMULATE + ["--dataset", "cifar10"], "dataset 'cifar10' needs a path to its downloaded files", True),
    (SIMULATE + ["--dataset", "cifar10", "--data-path", "{work}/no-cifar"], "no-cifar: path does not exist", True),
    (SIMULATE + ["--fleet", "{work}/not.json"], "not.json: not a JSON list of budgets in MB", True),
    (SIMULATE + ["--fleet", "{work}/devices.json"], "devices.json: not a JSON list of budgets in MB", True),
    (SIMULATE + ["--fleet", "{work}/missing.json"], "missing.json", True),
    (SIMULATE + ["--fleet", "{work}/negative.json"], "all > 0 MB", True),
    (SIMULATE + ["--per-round", "0"], "per-round, rounds and epochs must be >= 1", True),
    (SIMULATE + ["--rounds", "0"], "per-round, rounds and epochs must be >= 1", True),
    (SIMULATE + ["--epochs", "0"], "per-round, rounds and epochs must be >= 1", True),
    (SIMULATE + ["--lr", "0"], "lr must be > 0", True),
    (SIMULATE + ["--max-rejected-rounds", "-1"], "max-rejected-rounds >= 0", True),
    (SIMULATE + ["--workers", "0"], "devices and workers must be >= 1", True),
    (SIMULATE + ["--speed-spread", "-1"], "speed-spread must be >= 0 and sample-seconds > 0", True),
    (SIMULATE + ["--sample-seconds", "0"], "speed-spread must be >= 0 and sample-seconds > 0", True),
    (SIMULATE + ["--full-share", "1.5"], "full-share in (0, 1)", True),
    (SIMULATE + ["--artifacts", "{work}/nothing"], "no manifest (run `progfl export` first)", True),
    (SIMULATE[:-1] + ["{work}/occupied"], "run folder exists and is not empty", True),
    # compare: every plan's settings and run folder checked before any plan runs
    (COMPARE + ["--plans", "profl,nosuch"], "unknown plan 'nosuch'", True),
    (COMPARE + ["--plans", "profl,heterofl"], "plan heterofl needs stage kinds ['width']", True),
    (COMPARE + ["--plans", " , "], "--plans names no plan", True),
    (COMPARE + ["--plans", "profl,fedavg", "--option", "shrink_rounds=1"],  # --option goes to every plan compared
     "plan fedavg --option: unknown key 'shrink_rounds' (known keys: none)", True),
    (COMPARE[:-1] + ["{work}/occupied-cmp", "--plans", "profl,fedavg"], "fedavg: run folder exists and is not empty",
     True),
    # device train
    (TRAIN + ["--stage", "nosuch"], "no stage 'nosuch' in manifest (stages: 0:grow-0", True),
    (TRAIN + ["--stage", "99"], "no stage '99' in manifest", True),
    (TRAIN + ["--stage", "grow-1", "--epochs", "0"], "bad task", True),
    (TRAIN + ["--stage", "grow-1", "--lr", "-1"], "--lr must be > 0, got -1.0", True),
    (TRAIN + ["--stage", "grow-1", "--lr", "nan"], "--lr must be > 0, got nan", True),
    (TRAIN + ["--stage", "grow-1", "--budget-mb", "nan"], "it cannot take part", True),
    (TRAIN + ["--stage", "grow-1", "--backend", "torch"], "these artifacts have no torch files", True),
    (TRAIN[:-1] + ["{work}/no-folder/update.npz", "--stage", "grow-1"], "No such file or directory", True),
    # device profile
    (PROFILE + ["--batches", "0"], "--batches must be comma-separated positive integers, got '0'", True),
    (PROFILE + ["--steps", "0"], "--steps must be >= 1, got 0", True),
    (PROFILE + ["--stages", "grow-0,nosuch"], "no stage 'nosuch' in manifest", True),
    (PROFILE + ["--backend", "torch"], "these artifacts have no torch files", True),
    (["device", "profile", "--artifacts", "{work}/nothing", "--out", "{out}"], "no manifest", True),
    # apply-profile
    (["apply-profile", "{art}", "{work}/missing.json", "--device-class", "small"], "missing.json: no such profile",
     True),
    (["apply-profile", "{art}", "{work}/not.json", "--device-class", "small"], "not.json: not valid JSON", True),
    (["apply-profile", "{art}", "{work}/profile-other.json", "--device-class", "small"],
     "the profile was measured on other artifacts", True),
    (["apply-profile", "{art}", "{work}/profile-part.json", "--device-class", "small"],
     "the profile has fewer than two micro-batch sizes for", True),
    (["apply-profile", "{art}", "{work}/profile.json", "--device-class", "newclass"],
     "no device class 'newclass': give --memory-mb to add it", True),
    (["apply-profile", "{art}", "{work}/profile.json", "--device-class", "newclass", "--memory-mb", "0"],
     "memory must be a positive number of MB, got 0.0", True),
    (["apply-profile", "{art}", "{work}/profile.json", "--device-class", "newclass", "--memory-mb", "nan"],
     "memory must be a positive number of MB, got nan", True),
    (["apply-profile", "{work}/nothing", "{work}/profile.json", "--device-class", "small"], "no manifest", True),
]


@pytest.fixture(scope="module")
def error_inputs(exported, work):
    """The bad files the error cases read (made once), and a profile of the export (good, partial, foreign)."""
    art, _ = exported
    (work / "not.json").write_text("{not json")
    (work / "negative.json").write_text(json.dumps([80.0, -1.0, 90.0, 120.0]))
    (work / "badmanifest").mkdir()
    (work / "badmanifest" / "manifest.json").write_text("{")
    for name in ("occupied", "occupied-cmp/fedavg"):
        (work / name).mkdir(parents=True)
        (work / name / "mine.txt").write_text("mine")
    from progfl.device_runtime.probe import make_profile

    m = Manifest.load(art)
    rows = [{"stage": s.name, "batch": b, "peak_mb": 60.0 + b} for s in m.stages for b in (1, 16)]
    profile = make_profile(m, "ort", rows, {})
    (work / "profile.json").write_text(json.dumps(profile))
    (work / "profile-part.json").write_text(json.dumps(dict(profile, results=rows[:4])))
    (work / "profile-other.json").write_text(json.dumps(dict(profile, files_digest="0" * 64)))
    return art


@pytest.mark.parametrize("args, message, whole", ERRORS,
                         ids=[f"{' '.join(a[:2] if a[0] == 'device' else a[:1])}: {m[:40]}" for a, m, _ in ERRORS])
def test_user_error(error_inputs, work, tmp_path, args, message, whole):
    art = error_inputs
    out = tmp_path / "out"
    args = [a.format(art=art, work=work, out=out) for a in args]
    before = listing(work, tmp_path)
    r = cli(*args, ok=False)
    assert r.exit_code == 2, (args, r.exit_code, r.output[-2000:])
    assert_one_error_line(r.stderr, message, whole)
    assert not out.exists(), "a refused command wrote its output"
    assert listing(work, tmp_path) == before, "a refused command changed files"


def test_every_option_ran_once(request):
    """Every option of the commands this file runs, used at least once in a run that exited 0 (a new option fails
    here until a test runs it). Only meaningful when the whole file ran."""
    names = {item.name for item in request.session.items}
    if not {"test_export_measured", "test_simulate_every_option", "test_compare", "test_device_train_every_option",
            "test_device_profile_then_apply_profile", "test_simulate_on_flower", "test_explain",
            "test_export_user_model", "test_device_train_torch_backend", "test_simulate_resume"} <= names:
        pytest.skip("only with the whole file")
    # not in a run that exits 0: compare's --data-path (simulate's is run; it is the same option), and compare's
    # --option (every compared plan must know the key, and no two plans share one: an error case above)
    exempt = {"compare --data-path", "compare --option"}
    missing = []
    for path in (("export",), ("explain",), ("simulate",), ("compare",), ("device", "train"), ("device", "profile"),
                 ("apply-profile",)):
        cmd = COMMANDS[path]
        for p in cmd.params:
            if isinstance(p, click.Option):
                if not any((" ".join(path), o) in USED for o in (*p.opts, *p.secondary_opts)):
                    missing.append(f"{' '.join(path)} {p.opts[0]}")
    assert sorted(set(missing) - exempt) == [], missing
