"""A fleet far larger than the data and the rounds: the server's per-device state stays a small record, shards are
written only for devices that train (the same bytes whenever they are written), selection sizes a 10,000-device
fleet with a few size_stage calls and the same answers."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import progfl.server.selection as selection
from progfl.cli import main
from progfl.data import DataError, iid, load_dataset, read_shard, write_shards
from progfl.data.shards import DeviceShards
from progfl.exporter import export_model
from progfl.manifest import DeviceClass, Manifest
from progfl.models import build_model
from progfl.server.fleet import required_mb
from progfl.server.rounds import RoundEngine
from progfl.server.selection import DeviceInfo, SmartFreezeSelector, StageSizer, eligible
from progfl.server.simulation import SimConfig, open_data, prepare_data, run_simulation
from progfl.server.state import load_state

FLEET = [75.0, 79.0, 82.0, 85.0, 90.0, 120.0] * 2  # the tiny model's stages need ~73-78 MB


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("scale") / "a"
    export_model(build_model("cnn", 10, (1, 8, 8), width=4), folder, [DeviceClass("any", 4096.0)],
                 kinds=("grow", "distill", "full"), batch_size=16, measure_batches=[1, 16], backends=("ort",))
    return folder


def config(artifacts, out, **kw) -> SimConfig:
    base = dict(plan="profl", artifacts=str(artifacts), out=str(out), dataset="digits", devices=12, per_round=3,
                rounds=2, lr=0.05, epochs=1, workers=2, seed=1, fleet=FLEET,
                pace={"window": 2, "slope_window": 2, "min_rounds": 1})
    return SimConfig(**{**base, **kw})


def spread_fleet(manifest: Manifest, n: int, seed: int = 0) -> list[DeviceInfo]:
    """n devices with budgets from below the smallest stage's need to above full training's, unrounded."""
    need = [required_mb(manifest, s.name) for s in manifest.stages]
    budgets = np.random.default_rng(seed).uniform(min(need) - 5.0, max(need) + 20.0, n)
    return [DeviceInfo(i, float(b), 50, np.full(10, 5)) for i, b in enumerate(budgets)]


class CountingSizeStage:
    """selection.size_stage, counted."""

    def __init__(self) -> None:
        self.calls, self.inner = 0, selection.size_stage

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_stage_sizer_gives_size_stage_answers_with_few_calls(artifacts, monkeypatch):
    manifest = Manifest.load(artifacts)
    devices = spread_fleet(manifest, 3000)
    devices += [DeviceInfo(3000 + i, round(d.budget_mb, 1), 50, np.full(10, 5)) for i, d in enumerate(devices[:500])]
    batch, margin = manifest.batch_size, manifest.safety_margin
    for stage in manifest.stages:
        expected = [d.sizing(stage, batch, margin) for d in devices]
        counter = CountingSizeStage()
        monkeypatch.setattr(selection, "size_stage", counter)
        sizer = StageSizer(stage, batch, margin)
        assert [sizer(d) for d in devices] == expected, stage.name
        assert counter.calls < 150, f"{stage.name}: {counter.calls} size_stage calls for {len(devices)} devices"
        monkeypatch.setattr(selection, "size_stage", counter.inner)
        assert eligible(devices, stage, batch, margin) == [d for d, z in zip(devices, expected) if z.fits]
    stage = manifest.stage("grow-0")
    pool = eligible(devices, stage, batch, margin)
    smart = SmartFreezeSelector()
    scores = smart.scores(pool, stage, batch, margin)
    monkeypatch.setattr(selection, "StageSizer", lambda stage, batch, margin: lambda d: d.sizing(stage, batch, margin))
    assert len(pool) > 100 and np.array_equal(scores, smart.scores(pool, stage, batch, margin))


def test_shards_are_written_lazily_for_selected_devices_only(artifacts, tmp_path):
    """A run writes the shards of the devices it selected and no other; each holds its partition's rows (as the
    shards written up front before) and is the same file whenever it is written; a run whose shards were all
    written up front ends with the same weights."""
    run = run_simulation(config(artifacts, tmp_path / "lazy"), quiet=True)
    h = json.loads((run / "history.json").read_text())
    selected = {i for r in h["rounds"] for i in r["selected"]}
    written = {int(p.stem.split("_")[1]) for p in (run / "data").glob("device_*.npz")}
    assert written == selected and 0 < len(written) < 12

    train, _ = load_dataset("digits", None, seed=1)
    parts = iid(train.y, 12, np.random.default_rng(1))  # progfl simulate's partition for these settings
    eager = write_shards(train, parts, tmp_path / "eager")
    store = DeviceShards.open(run / "data")
    for i in range(12):
        x, y = read_shard(store.path(i))
        xe, ye = read_shard(eager[i])
        np.testing.assert_array_equal(x, xe)
        np.testing.assert_array_equal(y, ye)
    first = store.path(5).read_bytes()
    store.path(5).unlink()
    assert store.path(5).read_bytes() == first, "a shard must be the same bytes whenever it is written"

    up_front = config(artifacts, tmp_path / "upfront")
    engine = RoundEngine(up_front, quiet=True)
    prepare_data(up_front, engine.manifest, engine.run)  # every shard now, then the run resumes on that data
    assert len(list((tmp_path / "upfront" / "data").glob("device_*.npz"))) == 12
    del engine
    other = run_simulation(up_front, resume=True, quiet=True)
    a, b = load_state(run), load_state(other)
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)
    for p in (run / "data").glob("device_*.npz"):
        assert p.read_bytes() == (other / "data" / p.name).read_bytes(), p.name


def test_devices_without_samples_are_never_selected(artifacts, tmp_path):
    """3,000 devices over 1,438 training samples (iid): one sample each for the first 1,438, none for the rest.
    Those are registered (data/index.json) but never selected, and the fleet of history.json lists the others."""
    fleet = [75.0 + (i % 50) for i in range(3000)]
    run = run_simulation(config(artifacts, tmp_path / "big", devices=3000, fleet=fleet, per_round=5), quiet=True)
    index = json.loads((run / "data" / "index.json").read_text())
    counts = np.asarray(index["counts"])
    assert len(counts) == 3000 and set(counts.tolist()) == {0, 1}
    h = json.loads((run / "history.json").read_text())
    holders = set(np.flatnonzero(counts).tolist())
    assert {d["id"] for d in h["fleet"]} == holders
    for r in h["rounds"]:
        assert r["selected"] and set(r["selected"]) <= holders and not r["failed"] and r["server_seconds"] > 0
        assert r["server_peak_mb"] >= r["server_rss_mb"] > 0
    assert h["server_peak_mb"] >= max(r["server_peak_mb"] for r in h["rounds"])
    assert len(list((run / "data").glob("device_*.npz"))) <= 2 * 5
    with pytest.raises(DataError, match="get no samples"):  # Flower's engine needs a shard for every node
        cfg = config(artifacts, tmp_path / "eager", devices=3000, fleet=fleet)
        prepare_data(cfg, Manifest.load(artifacts), tmp_path / "eager")


def test_a_partition_that_cannot_serve_the_fleet_is_refused_in_one_line(artifacts, tmp_path):
    out = tmp_path / "shards"
    result = CliRunner().invoke(main, ["simulate", "--artifacts", str(artifacts), "--out", str(out), "--dataset",
                                       "digits", "--partition", "shards", "--devices", "1000", "--rounds", "1"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "too few for 1000 devices" in lines[0], lines
    assert not out.exists()


def test_the_engine_keeps_a_small_record_per_device(artifacts, tmp_path, monkeypatch):
    """10,000 devices: one round configured with a few hundred size_stage calls (not three per device), and what
    the engine holds or allocates while it writes history.json grows by well under a kilobyte a device."""
    manifest = Manifest.load(artifacts)

    def one_round(n: int, name: str) -> tuple[int, int, int]:
        devices = spread_fleet(manifest, n)
        counter = CountingSizeStage()
        monkeypatch.setattr(selection, "size_stage", counter)
        engine = RoundEngine(config(artifacts, tmp_path / name, per_round=20), quiet=True)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        rnd = engine.configure(devices)
        engine.commit(engine.aggregate(rnd, [], []))  # no device trained: the server's own work only
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        monkeypatch.setattr(selection, "size_stage", counter.inner)
        assert len(json.loads((tmp_path / name / "history.json").read_text())["fleet"]) == n
        assert len(rnd.tasks) == 20
        return held - base, peak - base, counter.calls

    small_held, small_peak, _ = one_round(100, "small")
    held, peak, calls = one_round(10_000, "large")
    assert calls < 600, f"{calls} size_stage calls to configure one round of 10,000 devices"
    assert (held - small_held) / 9_900 < 300, f"{(held - small_held) / 9_900:.0f} bytes held a device"
    assert (peak - small_peak) / 9_900 < 650, f"{(peak - small_peak) / 9_900:.0f} bytes allocated a device"


def test_open_data_holds_counts_not_shards(artifacts, tmp_path):
    cfg = config(artifacts, tmp_path / "r", devices=1000, fleet=None, partition="label-dirichlet")
    engine = RoundEngine(cfg, quiet=True)
    data = open_data(cfg, engine.manifest, engine.run)
    assert len(data.devices) == 1000 and sum(d.num_samples for d in data.devices) == 1438
    assert not list((tmp_path / "r" / "data").glob("device_*.npz"))
    assert all(d.label_hist.sum() == d.num_samples for d in data.devices)
