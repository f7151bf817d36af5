"""`progfl simulate --engine flower`: the same experiment as progfl.server.simulation, on Flower's simulation
engine (Ray), one virtual SuperNode per device.

Flower 1.41's simulation engine gives every virtual node the same node config, {partition-id, num-partitions}
(flwr/server/superlink/fleet/vce/vce_api.py:_register_node_info_stores); neither run_simulation nor the
backend config can set per-node keys. So each node's settings (its memory budget from the fleet, its shard,
its artifact cache, its device id) go into a JSON file keyed by partition-id, which the ClientApp reads
(progfl.device_runtime.flower.NodeSettings). The same file works with `flwr run` on a simulation connection
through the run config key `sim-fleet`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..manifest import write_atomic
from .rounds import RoundEngine
from .selection import DeviceInfo
from .simulation import SimConfig, prepare_data


def write_held_out(devices: list[DeviceInfo], run: Path, seed: int) -> Path:
    """run/eval/device_XXXX.npz: each device's held-out shard for federated evaluation, drawn from the test set with
    the label mix of its training shard (progfl.data.held_out); written once, like the training shards."""
    from ..data import held_out, read_dataset, write_shards

    folder = run / "eval"
    if not (folder / "index.json").exists():
        test = read_dataset(run / "test.npz")
        size = max(1, len(test) // len(devices))
        write_shards(test, held_out(test.y, [d.label_hist for d in devices], size, np.random.default_rng([seed, 3])),
                     folder)
    return folder


def write_fleet(devices: list[DeviceInfo], run: Path, feature_cache: bool = True, threads: int = 1) -> Path:
    """run/flower/fleet.json: partition-id -> node settings. The artifact cache is shared by the virtual nodes
    (one machine; writes are atomic and hash-checked), the feature cache is per device as in progfl simulate. A
    virtual node's transport is a Ray actor, which no board runs: its baseline is 0, and each job's peak (measured
    in its own process) is compared with the whole budget."""
    folder = run / "flower"
    folder.mkdir(parents=True, exist_ok=True)
    fleet: dict[str, dict[str, Any]] = {}
    for d in devices:
        entry: dict[str, Any] = {"memory-mb": float(d.budget_mb), "baseline-mb": 0.0,
                                 "data-path": str(run / "data" / f"device_{d.id:04d}.npz"),
                                 "eval-data-path": str(run / "eval" / f"device_{d.id:04d}.npz"),
                                 "artifacts-dir": str(folder / "artifacts"), "backend": "ort", "threads": threads,
                                 "device-id": int(d.id)}
        if feature_cache:
            entry["feature-cache"] = str(run / "cache" / f"device_{d.id:04d}")
        fleet[str(d.id)] = entry
    path = folder / "fleet.json"
    write_atomic(path, json.dumps(fleet, indent=1).encode())
    return path


def run_flower_simulation(cfg: SimConfig, resume: bool = False, quiet: bool = False,
                          stop_after: int | None = None) -> Path:
    """Run cfg on Flower's simulation engine: cfg.devices virtual nodes, cfg.workers Ray actors (1 CPU each).
    Writes the same run folder as progfl simulate (data/, test.npz, history.json, checkpoint/, report), plus the
    devices' held-out shards (eval/) and the nodes' settings (flower/). A deadline here is wall time, as on a
    deployment: the simulated device speeds of progfl simulate (speed_spread, sample_seconds) do not apply."""
    import logging

    import ray
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from ..device_runtime.flower import make_client_app
    from .evaluate import Evaluator
    from .flower import FlowerRunConfig, run_server

    sim_config = {k: v for k, v in vars(cfg).items() if k not in ("out", "artifacts", "pace", "options")}
    fcfg = FlowerRunConfig(artifacts=str(Path(cfg.artifacts).resolve()), out=cfg.out, plan=cfg.plan, rounds=cfg.rounds,
                           per_round=cfg.per_round, lr=cfg.lr, epochs=cfg.epochs, seed=cfg.seed, pace=dict(cfg.pace),
                           options=dict(cfg.options), outlier_k=cfg.outlier_k, target=cfg.target,
                           max_rejected_rounds=cfg.max_rejected_rounds, deadline=cfg.deadline, min_nodes=cfg.devices)
    engine = RoundEngine(fcfg, resume, {"engine": "flower", "simulation": sim_config}, quiet=quiet,
                         stop_after=stop_after)
    try:  # the engine checked the run settings and the artifacts; the simulation's own settings come next
        cfg.check_simulation(engine.manifest, engine.plan)
        devices, tx, ty = prepare_data(cfg, engine.manifest, engine.run)
        write_held_out(devices, engine.run, cfg.seed)
        fleet = write_fleet(devices, engine.run, cfg.feature_cache)
    except BaseException:
        engine.abandon()
        raise
    engine.evaluator = Evaluator(fcfg.artifacts, engine.manifest, tx, ty)
    errors: list[BaseException] = []

    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            run_server(grid, fcfg, engine)
        except BaseException as e:  # surfaced below: Flower only logs a ServerApp's exception
            errors.append(e)
            raise

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    was_up = ray.is_initialized()
    level = logging.getLogger("flwr").level
    if quiet:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        run_simulation(server_app=server, client_app=make_client_app(str(fleet)), num_supernodes=cfg.devices,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": max(1, cfg.workers), "num_gpus": 0,
                                                     "include_dashboard": False}})
    finally:
        logging.getLogger("flwr").setLevel(level)
        if not was_up and ray.is_initialized():
            ray.shutdown()
    if errors:
        raise errors[0]
    if not (engine.run / "history.json").exists():
        raise RuntimeError(f"{engine.run}: the Flower simulation wrote no history (see Flower's log above)")
    return engine.run
