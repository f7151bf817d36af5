"""`progfl simulate`: N virtual devices on this machine, each local round run by the real device runtime on the
real artifacts in a fresh process, each device's peak memory measured; a checkpoint after every round.

This is the local transport of the round engine (rounds.py): the engine configures a round, DevicePool runs each
device's task in its own process (device_runtime.trainer.train_round, ONNX Runtime), the engine aggregates,
evaluates and writes history.json and the checkpoint. A device whose process fails or dies is logged as failed
for that round; the round goes on with the others. All devices share this machine, so a device's round time is
simulated from a seeded speed factor and a cost model (deadline.py): reproducible, so a deadline drops the same
devices in a resumed run as in one run straight through.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import (DATASETS, DataError, DeviceShards, dirichlet, iid, label_dirichlet, load_dataset, read_dataset,
                    shards, write_dataset, write_partition)
from ..device_runtime import ort_backend as _preload  # noqa: F401  (ORT imported once, in the fork server)
from ..manifest import Manifest, ManifestError, TrainTask, TrainUpdate
from .deadline import simulate_time, speed_factors, stage_cost
from .evaluate import Evaluator
from .fleet import profl_fleet
from .plans import Plan
from .rounds import RoundEngine, RunSettings, Stopped
from .selection import DeviceInfo
from .workers import DevicePool, JobFailed

log = logging.getLogger("progfl.server")


PARTITIONS = ("iid", "dirichlet", "label-dirichlet", "shards")


@dataclass(kw_only=True)
class SimConfig(RunSettings):
    dataset: str = "mnist5k"
    data_path: str | None = None
    partition: str = "iid"  # iid | dirichlet | label-dirichlet | shards
    alpha: float = 0.5
    devices: int = 20
    workers: int = 2
    full_share: float = 0.08
    fleet: list[float] | None = None  # explicit budgets (MB), one per device; default: ProFL's fleet
    feature_cache: bool = True
    # the simulated fleet's speeds (deadline.py): lognormal factors of this spread (0: identical devices), and the
    # seconds one sample-epoch of the largest stage takes on the median device
    speed_spread: float = 0.5
    sample_seconds: float = 0.005

    def check(self) -> tuple[Manifest, Plan]:
        """The run settings (RunSettings.check), then the simulation's own."""
        manifest, plan = super().check()
        self.check_simulation(manifest, plan)
        return manifest, plan

    def check_simulation(self, manifest: Manifest, plan: Plan) -> None:
        """Data and fleet settings: a known data set and partition, as many budgets as devices, and at least one
        budget that holds a stage of the plan."""
        if self.devices < 1 or self.workers < 1:
            raise ValueError("devices and workers must be >= 1")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"unknown partition {self.partition!r}: use {', '.join(PARTITIONS)}")
        if not self.alpha > 0 or not 0 < self.full_share < 1:
            raise ValueError("alpha must be > 0 and full-share in (0, 1)")
        if not (np.isfinite(self.speed_spread) and self.speed_spread >= 0) or not (
                np.isfinite(self.sample_seconds) and self.sample_seconds > 0):
            raise ValueError("speed-spread must be >= 0 and sample-seconds > 0")
        if self.fleet is not None and (len(self.fleet) != self.devices or not min(self.fleet) > 0):
            raise ValueError(f"the fleet lists {len(self.fleet)} budgets for {self.devices} devices (one per device, "
                             f"all > 0 MB)")
        plan.check_fleet([DeviceInfo(i, b, 0, np.zeros(0)) for i, b in enumerate(self.budgets(manifest))])

    def budgets(self, manifest: Manifest) -> list[float]:
        return self.fleet or profl_fleet(manifest, self.devices, np.random.default_rng([self.seed, 1]), self.full_share)


def _train_device(artifacts: str, shard: str, cache_dir: str | None, task: TrainTask) -> TrainUpdate:
    """One device, one round, in its own process (one thread: the device processes share the cores)."""
    from ..device_runtime.backend import RuntimeOptions
    from ..device_runtime.cache import FeatureCache
    from ..device_runtime.ort_backend import OrtStage
    from ..device_runtime.shard import Shard
    from ..device_runtime.trainer import train_round

    m = Manifest.load(artifacts)
    backend = OrtStage(artifacts, m, task.stage, RuntimeOptions(threads=1))
    cache = FeatureCache(cache_dir) if cache_dir else None
    with Shard(shard, scratch=cache_dir) as data:
        data.validate(m.input_shape, m.num_classes)
        return train_round(backend, m.stage(task.stage), task, data, cache)


# ---- server side ----
@dataclass
class SimData:
    """A run's data as the server holds it: one small record per device that holds samples (budget, sample count,
    label histogram: what selection weighs), the shard store, which writes a device's shard when the device is first
    selected, and the test set. Nothing else grows with the fleet."""

    devices: list[DeviceInfo]  # in id order; devices the partition left without samples are not here: they never train
    shards: DeviceShards
    test_x: np.ndarray
    test_y: np.ndarray


def open_data(cfg: SimConfig, manifest: Manifest, run: Path) -> SimData:
    """The run's data: on a new run, load the data set, partition it and write the partition (no shard yet); on a
    resumed one, read what was written. Shards come later, from `shards.path(id)`, always with the same bytes."""
    data_dir = run / "data"
    if not (data_dir / "index.json").exists():
        train, test = load_dataset(cfg.dataset, cfg.data_path, seed=cfg.seed)
        if list(train.x.shape[1:]) != list(manifest.input_shape):
            raise ManifestError(f"dataset {cfg.dataset} has samples of shape {list(train.x.shape[1:])}, the exported "
                                f"model takes {manifest.input_shape}: export with --input-shape "
                                f"{','.join(map(str, train.x.shape[1:]))}")
        rng = np.random.default_rng(cfg.seed)
        parts = {"iid": lambda: iid(train.y, cfg.devices, rng),
                 "dirichlet": lambda: dirichlet(train.y, cfg.devices, cfg.alpha, rng),
                 "label-dirichlet": lambda: label_dirichlet(train.y, cfg.devices, cfg.alpha, rng),
                 "shards": lambda: shards(train.y, cfg.devices, 2, rng)}
        write_dataset(test, run / "test.npz")  # before the partition: its index.json marks the data complete
        write_partition(train, parts[cfg.partition](), data_dir)
    store = DeviceShards.open(data_dir)
    budgets = cfg.budgets(manifest)
    devices = [DeviceInfo(i, budgets[i], int(store.counts[i]), store.label_histograms[i])
               for i in np.flatnonzero(store.counts).tolist()]
    test = read_dataset(run / "test.npz")
    return SimData(devices, store, test.x, test.y)


def prepare_data(cfg: SimConfig, manifest: Manifest, run: Path) -> tuple[list[DeviceInfo], np.ndarray, np.ndarray]:
    """open_data with every device's shard written now, for transports and tools that hand each device its file up
    front (Flower's simulation engine starts one node per device, which reads its shard when first asked). Refuses a
    partition that leaves a device without samples: such a node could only fail."""
    data = open_data(cfg, manifest, run)
    if len(data.devices) < cfg.devices:
        raise DataError(f"{cfg.devices - len(data.devices)} of {cfg.devices} devices get no samples from the "
                        f"{cfg.partition} partition of {cfg.dataset}: this engine needs a shard for every device; use "
                        f"fewer devices, or progfl's own engine (which never selects them)")
    for d in data.devices:
        data.shards.path(d.id)
    return data.devices, data.test_x, data.test_y


def run_simulation(cfg: SimConfig, resume: bool = False, quiet: bool = False, stop_after: int | None = None) -> Path:
    engine = RoundEngine(cfg, resume, quiet=quiet, stop_after=stop_after)
    try:
        data = open_data(cfg, engine.manifest, engine.run)
        engine.plan.check_fleet(data.devices)  # those that hold data
    except BaseException:
        engine.abandon()
        raise
    engine.evaluator = Evaluator(cfg.artifacts, engine.manifest, data.test_x, data.test_y)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warned = False
    factors = speed_factors(cfg.seed, cfg.devices, cfg.speed_spread)  # hidden from the engine and the plan
    # A fresh process per device-round: a device runs only its own job, so its peak must not include what the
    # allocator kept from other devices' rounds (long-lived workers measured up to 1.5x the probe's peak). Each
    # forks from a server that has imported numpy and ONNX Runtime but built no session: clean and cheap.
    pool = DevicePool(cfg.workers, preload=["progfl.server.simulation"])
    while not engine.done:
        rnd = engine.configure(data.devices)
        started = time.perf_counter()
        shard_paths = [str(data.shards.path(d.id)) for d, _ in rnd.tasks]  # a device's shard appears when first chosen
        rnd.server_seconds += time.perf_counter() - started
        outcomes = pool.map(_train_device, [
            (str(cfg.artifacts), path, str(engine.run / "cache" / f"device_{d.id:04d}") if cfg.feature_cache else None,
             task) for (d, task), path in zip(rnd.tasks, shard_paths)])
        results = [(d, u) for (d, _), u in zip(rnd.tasks, outcomes) if not isinstance(u, JobFailed)]
        stages = {d.id: task.stage for d, task in rnd.tasks}  # a width plan's devices train different stages
        for d, u in results:  # each device's simulated time: the engine drops those over the deadline
            simulate_time(u, float(factors[d.id]), stage_cost(engine.manifest, stages[d.id]), cfg.epochs,
                          cfg.sample_seconds)
        failed = [(d.id, u.reason) for (d, _), u in zip(rnd.tasks, outcomes) if isinstance(u, JobFailed)]
        if any(u.metrics.get("torch_imported") for _, u in results) and not warned:
            # spawn/forkserver children re-import the caller's main module: a script that imports torch at
            # the top puts torch (~220 MB) into every device process and its measured peak
            log.warning("device processes imported torch (through your main module): their peak memory "
                        "includes it; import torch inside functions, or run `progfl simulate`")
            warned = True
        engine.commit(engine.aggregate(rnd, results, failed))
    engine.report()
    return engine.run


__all__ = ["SimConfig", "SimData", "Stopped", "open_data", "prepare_data", "run_simulation"]
