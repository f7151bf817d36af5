"""`progfl simulate`: N virtual devices on this machine, each local round run by the real device runtime on the
real artifacts in worker processes, each device's peak memory measured; a checkpoint after every round.

One round, top to bottom: plan.configure_train picks devices and writes tasks -> workers run
device_runtime.trainer.train_round (ORT) -> plan.aggregate_train averages and may freeze the block ->
Evaluator scores the global model -> history.json and the checkpoint are written atomically. A run whose every
update is rejected for `max_rejected_rounds` consecutive rounds stops with divergence.Diverged.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from ..device_runtime import ort_backend as _preload  # noqa: F401  (ORT imported once, in the fork server)
from ..manifest import Manifest, ManifestError, TrainTask, TrainUpdate, write_atomic
from .divergence import check_divergence
from .evaluate import Evaluator
from .fleet import profl_fleet
from .pace import PaceConfig
from .plans import PlanConfig, make_plan
from .selection import DeviceInfo
from .state import ServerState, StateError, load_state, restore_rng, save_state


@dataclass
class SimConfig:
    plan: str
    artifacts: str
    out: str
    dataset: str = "mnist5k"
    data_path: str | None = None
    partition: str = "iid"  # iid | dirichlet | label-dirichlet | shards
    alpha: float = 0.5
    devices: int = 20
    per_round: int = 5
    rounds: int = 30
    epochs: int = 5  # local epochs, as ProFL's authors
    lr: float = 0.01  # SGD lr, as ProFL's authors (momentum 0.9, weight decay 5e-4 and batch 32 are set at export)
    seed: int = 0
    workers: int = 2
    full_share: float = 0.08
    fleet: list[float] | None = None  # explicit budgets (MB), one per device; default: ProFL's fleet
    feature_cache: bool = True
    target: float | None = None
    pace: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    max_rejected_rounds: int = 3  # stop (Diverged) after this many rounds in a row with every update rejected; 0: never

    def check(self) -> Manifest:
        """Settings and artifacts both engines need valid before any work starts; returns the manifest."""
        manifest = Manifest.load(self.artifacts)
        manifest.verify_files(self.artifacts)
        if self.devices < 1 or self.per_round < 1 or self.rounds < 1:
            raise ValueError("devices, per-round and rounds must be positive")
        if self.epochs < 1 or not self.lr > 0 or self.max_rejected_rounds < 0:
            raise ValueError("epochs must be >= 1, lr > 0 and max-rejected-rounds >= 0")
        if self.fleet is not None and (len(self.fleet) != self.devices or min(self.fleet) <= 0):
            raise ValueError(f"the fleet lists {len(self.fleet)} budgets for {self.devices} devices (all must be > 0 MB)")
        return manifest


log = logging.getLogger("progfl.server")


# ---- worker side: one process is one device for one round ----
_worker: dict[str, Any] = {}


def _worker_init(artifacts: str) -> None:
    from ..device_runtime.backend import RuntimeOptions

    _worker.update(artifacts=artifacts, manifest=Manifest.load(artifacts),
                   options=RuntimeOptions(threads=1))  # one thread per worker: the workers share the cores


def _worker_train(shard: str, cache_dir: str | None, task: TrainTask) -> TrainUpdate:
    from ..device_runtime.cache import FeatureCache
    from ..device_runtime.ort_backend import OrtStage
    from ..device_runtime.shard import Shard
    from ..device_runtime.trainer import train_round

    m = _worker["manifest"]
    backend = OrtStage(_worker["artifacts"], m, task.stage, _worker["options"])
    cache = FeatureCache(cache_dir) if cache_dir else None
    with Shard(shard, scratch=cache_dir) as data:
        data.validate(m.input_shape, m.num_classes)
        return train_round(backend, m.stage(task.stage), task, data, cache)


# ---- server side ----
def prepare_data(cfg: SimConfig, manifest: Manifest, run: Path) -> tuple[list[DeviceInfo], np.ndarray, np.ndarray]:
    from ..data import dirichlet, iid, label_dirichlet, load_dataset, read_dataset, shards, write_dataset, write_shards

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
        if cfg.partition not in parts:
            raise ValueError(f"unknown partition {cfg.partition!r}: use iid, dirichlet, label-dirichlet or shards")
        write_shards(train, parts[cfg.partition](), data_dir)
        write_dataset(test, run / "test.npz")
    index = json.loads((data_dir / "index.json").read_text())
    budgets = cfg.fleet or profl_fleet(manifest, cfg.devices, np.random.default_rng([cfg.seed, 1]), cfg.full_share)
    devices = [DeviceInfo(i, budgets[i], int(index["counts"][i]), np.asarray(index["label_histograms"][i]))
               for i in range(cfg.devices)]
    test = read_dataset(run / "test.npz")
    return devices, test.x, test.y


def _progress(r: int, total: int, record: dict) -> None:
    acc = record.get("accuracy")
    line = (f"round {r:>3}/{total} {record['stage']:<10} acc {acc if acc is None else f'{acc:.3f}'} "
            f"devices {len(record['participants']):>2} em {record['em'] if record['em'] is None else round(record['em'], 3)}")
    bar = "#" * int(30 * r / total)
    sys.stderr.write(f"\r[{bar:<30}] {line}" if sys.stderr.isatty() else f"[{bar:<30}] {line}\n")
    sys.stderr.flush()


class Stopped(Exception):
    """The run was stopped on purpose after a round (tests; a user presses Ctrl-C instead)."""


def run_simulation(cfg: SimConfig, resume: bool = False, quiet: bool = False, stop_after: int | None = None) -> Path:
    run = Path(cfg.out)
    manifest = cfg.check()
    plan = make_plan(cfg.plan, manifest, PlanConfig(rounds=cfg.rounds, per_round=cfg.per_round, lr=cfg.lr,
                                                    epochs=cfg.epochs, seed=cfg.seed, pace=PaceConfig(**cfg.pace),
                                                    options=cfg.options))
    if run.exists() and any(run.iterdir()) and not resume:
        raise ValueError(f"{run}: run folder exists and is not empty (use --resume to continue it)")
    run.mkdir(parents=True, exist_ok=True)
    devices, tx, ty = prepare_data(cfg, manifest, run)
    evaluator = Evaluator(cfg.artifacts, manifest, tx, ty)
    config = json.loads(json.dumps(asdict(cfg)))  # as it reads back from the checkpoint
    if resume and (run / "checkpoint").exists():
        state = load_state(run)
        if state.config != config:
            raise StateError(f"{run}: the checkpoint was made with other settings; resume with the same ones")
        plan.restore(state)
    else:
        state = ServerState(round=0, plan=plan.name, plan_state={}, arrays=manifest.initial_weights(cfg.artifacts),
                            pace={}, rng=np.random.default_rng([cfg.seed, 2]).bit_generator.state, config=config)
        plan.start(state)
    fleet = [{"id": d.id, "budget_mb": d.budget_mb} for d in devices]
    warned = False
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # A fresh process per device-round: a device runs only its own job, so its peak must not include what the
    # allocator kept from other devices' rounds (long-lived workers measured up to 1.5x the probe's peak). Each
    # forks from a server that has imported numpy and ONNX Runtime but built no session: clean and cheap.
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(["progfl.server.simulation"])
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(str(cfg.artifacts),), max_tasks_per_child=1) as pool:
        while not plan.done(state):
            t0 = time.perf_counter()
            rng = restore_rng(state.rng)
            eligible = len(plan.candidates(devices, state))
            tasks = plan.configure_train(state, devices, rng)
            state.rng = rng.bit_generator.state
            futures = [(d, pool.submit(_worker_train, str(run / "data" / f"device_{d.id:04d}.npz"),
                                       str(run / "cache" / f"device_{d.id:04d}") if cfg.feature_cache else None, t))
                       for d, t in tasks]
            results = [(d, f.result()) for d, f in futures]
            if any(u.metrics.get("torch_imported") for _, u in results) and not warned:
                # spawn/forkserver children re-import the caller's main module: a script that imports torch at
                # the top puts torch (~220 MB) into every device process and its measured peak
                log.warning("device processes imported torch (through your main module): their peak memory "
                            "includes it; import torch inside functions, or run `progfl simulate`")
                warned = True
            stage = plan.stage(state).name
            record = plan.aggregate_train(state, results)
            record["accuracy"], record["test_loss"] = evaluator.evaluate(stage, state.arrays)
            record["eligible"] = eligible
            record["devices"] = [{"id": d.id, "budget_mb": d.budget_mb, "peak_mb": u.metrics["peak_mb"],
                                  "seconds": u.metrics["seconds"], "samples": u.num_samples,
                                  "over_budget": bool(u.metrics.get("over_budget")),
                                  "torch_imported": bool(u.metrics.get("torch_imported"))} for d, u in results]
            record["round_seconds"] = max((u.metrics["seconds"] for _, u in results), default=0.0)  # none eligible: 0
            record["wall_seconds"] = time.perf_counter() - t0
            state.history.append(record)
            save_state(state, run)
            write_history(run, plan.name, config, fleet, state)
            if not quiet:
                _progress(state.round, cfg.rounds, record)
            try:
                check_divergence(state.history, cfg.max_rejected_rounds, cfg.lr, cfg.epochs)
            except ValueError:
                if not quiet and sys.stderr.isatty():
                    sys.stderr.write("\n")
                _report_quietly(run, cfg.target)
                raise
            if stop_after is not None and state.round >= stop_after:
                raise Stopped(f"stopped after round {state.round}")
    if not quiet and sys.stderr.isatty():
        sys.stderr.write("\n")
    from .report import write_report

    write_report([run], run, cfg.target)
    return run


def _report_quietly(run: Path, target: float | None) -> None:
    """report.md and plots for a run that stops with an error: helpful, but never the error the user sees."""
    from .report import write_report

    try:
        write_report([run], run, target)
    except Exception as e:  # noqa: BLE001
        log.warning("could not write the report of %s: %s", run, e)


def write_history(run: Path, plan: str, config: dict, fleet: list[dict], state: ServerState) -> None:
    last = state.history[-1]
    doc = {"plan": plan, "config": config, "fleet": fleet, "rounds": state.history,
           "final": {"accuracy": last["accuracy"], "rounds": state.round, "stage": last["stage"]}}
    write_atomic(run / "history.json", json.dumps(doc, indent=1, default=float).encode())
