"""A Flower ServerApp whose strategy delegates to progfl's plans.

One run: wait for `min-nodes` SuperNodes -> ask each for its capabilities (memory budget, samples, label
histogram, stages it already holds) -> progfl DeviceInfo records -> rounds driven by Flower's
`Strategy.start`: `configure_train` asks the plan for (device, TrainTask) pairs and writes one message per node
(the stage's arrays, the task, the stage's files the first time the node meets that stage); `aggregate_train`
runs `Plan.aggregate_train` (partial updates merged into the full global arrays of a ServerState) and returns
the full global arrays; the server-side evaluation function scores the global model with progfl's Evaluator
and writes history.json + the checkpoint after every round, like `progfl simulate`.

Run config ([tool.flwr.app.config] of progfl/flower_app/pyproject.toml, or `flwr run --run-config`):
    artifacts, plan, rounds, per-round, lr, epochs, seed, test-data (.npz from progfl.data.write_dataset; ""
    = no evaluation), out (run folder), min-nodes, round-timeout, query-timeout, pace/options (JSON strings),
    max-rejected-rounds (stop with divergence.Diverged after this many rounds in a row whose every update was
    rejected; 0: never), sim-fleet (simulation engine only, read by the ClientApp).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from ..device_runtime.flower import (
    arrays_to_record,
    content_to_update,
    held_key,
    record_to_arrays,
    stage_files,
    task_to_content,
)
from ..manifest import MANIFEST_NAME, Manifest, sha256_file
from .divergence import check_divergence
from .evaluate import Evaluator
from .pace import PaceConfig
from .plans import Plan, PlanConfig, make_plan
from .selection import DeviceInfo
from .simulation import write_history
from .state import ServerState, restore_rng, save_state


@dataclass
class FlowerRunConfig:
    artifacts: str
    out: str
    plan: str = "profl"
    rounds: int = 2
    per_round: int = 5
    lr: float = 0.01
    epochs: int = 5
    seed: int = 0
    test_data: str = ""
    min_nodes: int = 2
    round_timeout: float = 3600.0
    query_timeout: float = 120.0
    pace: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    max_rejected_rounds: int = 3

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> FlowerRunConfig:
        def js(key: str) -> dict[str, Any]:
            v = rc.get(key, "")
            return json.loads(v) if isinstance(v, str) and v.strip() else {}

        return cls(artifacts=str(rc["artifacts"]), out=str(rc["out"]), plan=str(rc.get("plan", "profl")),
                   rounds=int(rc.get("rounds", 2)), per_round=int(rc.get("per-round", 5)), lr=float(rc.get("lr", 0.01)),
                   epochs=int(rc.get("epochs", 5)), seed=int(rc.get("seed", 0)), test_data=str(rc.get("test-data", "")),
                   min_nodes=int(rc.get("min-nodes", 2)), round_timeout=float(rc.get("round-timeout", 3600)),
                   query_timeout=float(rc.get("query-timeout", 120)), pace=js("pace"), options=js("options"),
                   max_rejected_rounds=int(rc.get("max-rejected-rounds", 3)))


def query_devices(grid: Grid, manifest: Manifest, min_nodes: int, timeout: float) -> tuple[list[DeviceInfo], dict[int, int], dict[int, set[str]]]:
    """Wait for min_nodes nodes, ask each for its capabilities. Returns the DeviceInfo list, device id -> node id,
    and node id -> stages it holds ('<manifest sha>:<stage>')."""
    deadline = time.time() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes:
            break
        if time.time() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {min_nodes} nodes connected within {timeout:g} s")
        time.sleep(1.0)
    msgs = [Message(RecordDict({"config": ConfigRecord({"kind": "capabilities", "num-classes": manifest.num_classes})}),
                    dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = [r for r in grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.time()))]
    caps: dict[int, dict[str, Any]] = {}
    for r in replies:
        if r.has_error():
            continue  # a node that cannot answer is left out of the fleet
        caps[r.metadata.src_node_id] = dict(r.content["caps"])
    if not caps:
        raise RuntimeError("no node answered the capability query")
    devices, node_of, held = [], {}, {}
    ordered = sorted(caps)
    for i, n in enumerate(ordered):
        c = caps[n]
        did = int(c["device-id"]) if "device-id" in c else i
        if did in node_of:
            raise ValueError(f"two nodes claim device id {did}")
        devices.append(DeviceInfo(did, float(c["memory-mb"]), int(c["num-samples"]), np.asarray(c["label-hist"]),
                                  backend=str(c.get("backend", "ort"))))
        node_of[did] = n
        held[n] = set(c.get("held", []))
    devices.sort(key=lambda d: d.id)
    return devices, node_of, held


class ProgflStrategy(Strategy):
    """Flower strategy over a progfl Plan: per-node messages, partial-update aggregation, progfl checkpoints."""

    def __init__(self, plan: Plan, state: ServerState, devices: list[DeviceInfo], node_of: dict[int, int],
                 held: dict[int, set[str]], artifacts: str | Path, run: str | Path, evaluator: Evaluator | None,
                 config: dict[str, Any], fleet: list[dict[str, Any]], max_rejected_rounds: int = 3):
        self.plan, self.state, self.devices = plan, state, devices
        self.max_rejected_rounds = max_rejected_rounds
        self.node_of, self.held = node_of, held
        self.device_of = {n: d for d, n in node_of.items()}
        self.artifacts, self.run = Path(artifacts), Path(run)
        self.manifest_sha = sha256_file(self.artifacts / MANIFEST_NAME)
        self.evaluator, self.config, self.fleet = evaluator, config, fleet
        self._round: dict[str, Any] | None = None  # what the current round sent, until it is recorded

    def summary(self) -> None:
        from flwr.supercore import log
        from logging import INFO

        log(INFO, "\t├── progfl plan %s, %d devices, %d stages", self.plan.name, len(self.devices),
            len(self.plan.manifest.stages))

    def _files(self, stage: str, backend: str) -> tuple[ArrayRecord, ConfigRecord]:
        arrays, meta = {}, {}
        for rel, path in stage_files(self.artifacts, self.plan.manifest, stage, backend).items():
            data = path.read_bytes()
            arrays[rel] = Array(np.frombuffer(data, np.uint8))
            meta[rel] = hashlib.sha256(data).hexdigest()
        return ArrayRecord(arrays), ConfigRecord(meta)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._round = None
        if self.plan.done(self.state):
            return []
        t0 = time.perf_counter()
        rng = restore_rng(self.state.rng)
        eligible = len(self.plan.candidates(self.devices, self.state))
        tasks = self.plan.configure_train(self.state, self.devices, rng)
        self.state.rng = rng.bit_generator.state
        stage = self.plan.stage(self.state).name
        files: dict[str, tuple[ArrayRecord, ConfigRecord]] = {}  # per backend, read once a round
        messages = []
        for d, task in tasks:
            task.manifest_sha256 = self.manifest_sha
            node = self.node_of[d.id]
            content = task_to_content(task)
            if held_key(self.manifest_sha, stage) not in self.held[node]:
                if d.backend not in files:
                    files[d.backend] = self._files(stage, d.backend)
                content["files"], content["files-meta"] = files[d.backend]
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=str(server_round)))
        self._round = {"t0": t0, "stage": stage, "eligible": eligible, "sent": {d.id: task for d, task in tasks}}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._round is None:
            return None, None  # the plan had finished: nothing was sent
        results, failed = [], []
        for r in replies:
            d = self.device_of.get(r.metadata.src_node_id)
            if d is None:
                continue
            if r.has_error():
                failed.append([d, r.error.reason])
                continue
            results.append((next(x for x in self.devices if x.id == d), content_to_update(r.content)))
            self.held[r.metadata.src_node_id].add(held_key(self.manifest_sha, self._round["stage"]))
        missing = set(self._round["sent"]) - {d.id for d, _ in results} - {f[0] for f in failed}
        failed += [[d, "no reply before the round timeout"] for d in sorted(missing)]
        record = self.plan.aggregate_train(self.state, results)
        record["eligible"] = self._round["eligible"]
        record["failed"] = failed
        record["devices"] = [{"id": d.id, "node_id": self.node_of[d.id], "budget_mb": d.budget_mb,
                              "peak_mb": u.metrics.get("peak_mb"), "seconds": u.metrics.get("seconds"),
                              "samples": u.num_samples, "over_budget": bool(u.metrics.get("over_budget"))}
                             for d, u in results]
        record["round_seconds"] = max((u.metrics.get("seconds", 0.0) for _, u in results), default=0.0)
        self._round["record"] = record
        metrics = {"participants": len(results), "failed": len(failed)}
        if record.get("train_loss") is not None:
            metrics["train_loss"] = float(record["train_loss"])
        return arrays_to_record(self.state.arrays), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # the global model is scored on the server (evaluate_round)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's server-side evaluation hook: score the stage just trained, then write history + checkpoint."""
        if server_round == 0 or self._round is None or "record" not in self._round:
            return None
        record, stage = self._round.pop("record"), self._round["stage"]
        if self.evaluator is not None:
            record["accuracy"], record["test_loss"] = self.evaluator.evaluate(stage, self.state.arrays)
        else:
            record["accuracy"], record["test_loss"] = None, None
        record["wall_seconds"] = time.perf_counter() - self._round["t0"]
        self.state.history.append(record)
        save_state(self.state, self.run)
        write_history(self.run, self.plan.name, self.config, self.fleet, self.state)
        check_divergence(self.state.history, self.max_rejected_rounds, self.plan.config.lr, self.plan.config.epochs)
        out = {"round": float(self.state.round)}
        if record["accuracy"] is not None:
            out.update(accuracy=float(record["accuracy"]), test_loss=float(record["test_loss"]))
        return MetricRecord(out)


def run_server(grid: Grid, cfg: FlowerRunConfig, fleet_config: dict[str, Any] | None = None) -> ServerState:
    """The whole server side of one run (used by the ServerApp and by progfl.server.flower_sim)."""
    manifest = Manifest.load(cfg.artifacts)
    manifest.verify_files(cfg.artifacts)
    plan = make_plan(cfg.plan, manifest, PlanConfig(rounds=cfg.rounds, per_round=cfg.per_round, lr=cfg.lr,
                                                    epochs=cfg.epochs, seed=cfg.seed, pace=PaceConfig(**cfg.pace),
                                                    options=cfg.options))
    run = Path(cfg.out)
    if run.exists() and (run / "checkpoint").exists():
        raise ValueError(f"{run}: run folder already holds a checkpoint (resume is not supported on Flower yet)")
    run.mkdir(parents=True, exist_ok=True)
    evaluator = None
    if cfg.test_data:
        from ..data import read_dataset

        test = read_dataset(cfg.test_data)
        evaluator = Evaluator(cfg.artifacts, manifest, test.x, test.y)
    devices, node_of, held = query_devices(grid, manifest, cfg.min_nodes, cfg.query_timeout)
    config = json.loads(json.dumps({"engine": "flower", **vars(cfg), **(fleet_config or {})}))
    state = ServerState(round=0, plan=plan.name, plan_state={}, arrays=manifest.initial_weights(cfg.artifacts),
                        pace={}, rng=np.random.default_rng([cfg.seed, 2]).bit_generator.state, config=config)
    plan.start(state)
    fleet = [{"id": d.id, "node_id": node_of[d.id], "budget_mb": d.budget_mb} for d in devices]
    strategy = ProgflStrategy(plan, state, devices, node_of, held, cfg.artifacts, run, evaluator, config, fleet,
                              cfg.max_rejected_rounds)
    try:
        strategy.start(grid, arrays_to_record(state.arrays), num_rounds=cfg.rounds, timeout=cfg.round_timeout,
                       evaluate_fn=strategy.evaluate_round)
    finally:  # also when the run stopped (Diverged): the report covers the rounds that were written
        if state.history:
            from .report import write_report

            try:
                write_report([run], run, None)
            except Exception:  # noqa: BLE001  (plots need matplotlib, which a server may lack; history is written)
                pass
    return state


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, FlowerRunConfig.from_run_config(dict(context.run_config)))


__all__ = ["FlowerRunConfig", "ProgflStrategy", "app", "query_devices", "record_to_arrays", "run_server"]
