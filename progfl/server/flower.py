"""A Flower ServerApp: the Flower transport of progfl's round engine (rounds.py).

One run: wait for `min-nodes` SuperNodes, then rounds driven by Flower's `Strategy.start`, each as the engine
wants it:
    configure_train   ask every connected node for its capabilities (memory, transport baseline, samples, label
                      histogram, held-out samples, stages it holds: asked again every round, so a node that joined,
                      left or whose free memory changed is sized again), then engine.configure -> one message per
                      chosen node (the stage's arrays, the task, the stage's files the first time it meets them)
    aggregate_train   replies -> engine.aggregate (a reply with an error is logged and recorded as failed)
    configure_evaluate / aggregate_evaluate   the round's participants score the new global model on their own
                      held-out data (federated evaluation; nodes without eval-data-path are skipped)
    evaluate_round    Flower's server-side hook: engine.commit (test-set accuracy, history.json, checkpoint)

Run config ([tool.flwr.app.config] of progfl/flower_app/pyproject.toml, or `flwr run --run-config`):
    artifacts, out (run folder), plan, rounds, per-round, lr, epochs, seed, pace/options (JSON strings of the
    --pace/--option keys), outlier-k, max-rejected-rounds, target, test-data (.npz from progfl.data.write_dataset;
    "" = no server-side evaluation), min-nodes, round-timeout, query-timeout, federated-eval (true/false),
    deadline (seconds; "" = none), resume (true: continue the run folder's checkpoint), sim-fleet (simulation engine
    only, read by the ClientApp).

Deadline: the strategy waits at most `deadline` seconds of wall time (from sending) for the training replies
(DeadlineGrid); a node that has not answered by then is late: its update, if it comes, is never pulled, and the
round record lists it with the time waited (a lower bound of its round). round-timeout still bounds the other
exchanges (the evaluation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

from ..device_runtime.flower import (
    arrays_to_record,
    content_to_update,
    held_key,
    record_to_arrays,
    stage_files,
    task_to_content,
)
from ..manifest import MANIFEST_NAME, Manifest, sha256_file
from .deadline import Late
from .evaluate import Evaluator
from .rounds import Round, RoundEngine, RunSettings
from .selection import DeviceInfo
from .settings import parse_settings

log = logging.getLogger("progfl.server")


@dataclass(kw_only=True)
class FlowerRunConfig(RunSettings):
    test_data: str = ""
    min_nodes: int = 2
    round_timeout: float = 3600.0
    query_timeout: float = 120.0
    federated_eval: bool = True

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> tuple[FlowerRunConfig, bool]:
        """(settings, resume) from Flower's run config: its keys are the fields with '-' for '_', pace and options
        as JSON strings; an unknown key or a bad value is refused with the known keys listed."""
        values = {k.replace("-", "_"): v for k, v in rc.items() if k not in ("sim-fleet", "resume")}
        for key in ("pace", "options"):
            raw = values.get(key, "")
            try:
                values[key] = json.loads(raw) if isinstance(raw, str) and raw.strip() else (raw or {})
            except ValueError as e:
                raise ValueError(f"run config {key}: not JSON ({e})") from None
        resume = parse_settings(_Resume, {"resume": rc.get("resume", False)}, "run config").resume
        return parse_settings(cls, values, "run config"), resume


@dataclass
class _Resume:
    resume: bool = False


@dataclass
class Node:
    """What a node answered to the capability query."""

    device: DeviceInfo
    node_id: int
    held: set[str]
    eval_samples: int


def query_nodes(grid: Grid, manifest: Manifest, timeout: float) -> dict[int, Node]:
    """Ask every connected node for its capabilities: device id -> Node. A node that cannot answer, or claims a
    device id another node already has, is left out of this round (and logged)."""
    nodes = sorted(grid.get_node_ids())
    msgs = [Message(RecordDict({"config": ConfigRecord({"kind": "capabilities", "num-classes": manifest.num_classes})}),
                    dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}  # ids are set when the grid pushes
    out: dict[int, Node] = {}
    for r in sorted(replies, key=lambda r: node_of.get(r.metadata.reply_to_message_id, -1)):
        # by the message it answers: for a node that missed its heartbeats the SuperLink itself replies (src 1)
        n = node_of.get(r.metadata.reply_to_message_id)
        if n is None:
            continue
        if r.has_error():
            log.warning("node %s did not answer the capability query: %s", n, r.error.reason)
            continue
        c = dict(r.content["caps"])
        did = int(c.get("device-id", n))
        if did in out:
            log.warning("nodes %s and %s both claim device id %s: %s left out", out[did].node_id, n, did, n)
            continue
        baseline = float(c.get("baseline-mb", 0.0))
        device = DeviceInfo(did, round(float(c["memory-mb"]) - baseline, 1), int(c["num-samples"]), np.asarray(c["label-hist"]),
                            backend=str(c.get("backend", "ort")), baseline_mb=baseline)
        out[did] = Node(device, n, set(c.get("held", [])), int(c.get("eval-samples", 0)))
    return out


class DeadlineGrid(Grid):
    """A Grid that waits for training replies only until the round's deadline, and notes when each arrived.

    Flower's Strategy.start waits for training and evaluation replies with one timeout; a deadline must cut only
    the training wait. Replies are pulled every `poll` seconds (Flower's own gRPC grid pulls every 3 s, too coarse
    for a deadline of seconds); a reply not pulled by the deadline is left on the SuperLink and never read. Every
    other call goes to the wrapped grid unchanged."""

    def __init__(self, grid: Grid, deadline: float, poll: float = 0.25):
        self.grid, self.deadline, self.poll = grid, deadline, poll
        self.arrived: dict[str, float] = {}  # the last training exchange: sent message id -> seconds to its reply
        self.waited = 0.0  # how long the last training exchange waited

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self.grid.send_and_receive(messages, timeout=timeout)
        limit = self.deadline if timeout is None else min(self.deadline, timeout)
        t0 = time.monotonic()
        waiting = set(self.grid.push_messages(messages))
        self.arrived, replies = {}, []
        while waiting:
            for r in self.grid.pull_messages(waiting):
                if r.metadata.reply_to_message_id in waiting:
                    waiting.discard(r.metadata.reply_to_message_id)
                    self.arrived[r.metadata.reply_to_message_id] = time.monotonic() - t0
                    replies.append(r)
            left = limit - (time.monotonic() - t0)
            if not waiting or left <= 0:
                break
            time.sleep(min(self.poll, left))
        self.waited = time.monotonic() - t0
        return replies


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while len(grid.get_node_ids()) < min_nodes:
        if time.time() > deadline:
            raise TimeoutError(f"only {len(grid.get_node_ids())} of {min_nodes} nodes connected within {timeout:g} s")
        time.sleep(1.0)


class ProgflStrategy(Strategy):
    """Flower strategy over the round engine: per-node messages, capabilities every round, federated evaluation."""

    def __init__(self, engine: RoundEngine, cfg: FlowerRunConfig):
        self.engine, self.cfg = engine, cfg
        self.artifacts = Path(cfg.artifacts)
        self.manifest_sha = sha256_file(self.artifacts / MANIFEST_NAME)
        self.nodes: dict[int, Node] = {}
        self._round: Round | None = None
        self._sent: list[Message] = []  # this round's train messages (their ids match the replies)
        self._record: dict[str, Any] | None = None
        self.timer: DeadlineGrid | None = None  # set by run_server under a deadline: when each reply arrived

    def summary(self) -> None:
        log.info("progfl plan %s, %d stages, round engine at round %d", self.engine.plan.name,
                 len(self.engine.manifest.stages), self.engine.state.round)

    def _files(self, stage: str, backend: str) -> tuple[ArrayRecord, ConfigRecord]:
        arrays, meta = {}, {}
        for rel, path in stage_files(self.artifacts, self.engine.manifest, stage, backend).items():
            data = path.read_bytes()
            arrays[rel] = Array(np.frombuffer(data, np.uint8))
            meta[rel] = hashlib.sha256(data).hexdigest()
        return ArrayRecord(arrays), ConfigRecord(meta)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._round, self._record = None, None
        if self.engine.done:
            return []
        self.nodes = query_nodes(grid, self.engine.manifest, self.cfg.query_timeout)
        rnd = self._round = self.engine.configure([n.device for n in self.nodes.values()])
        files: dict[tuple[str, str], tuple[ArrayRecord, ConfigRecord]] = {}  # per stage and backend, read once a round
        messages = self._sent = []
        for d, task in rnd.tasks:
            task.manifest_sha256 = self.manifest_sha
            node = self.nodes[d.id]
            content = task_to_content(task)
            if held_key(self.manifest_sha, task.stage) not in node.held:  # a width plan's devices train different stages
                if (task.stage, d.backend) not in files:
                    files[task.stage, d.backend] = self._files(task.stage, d.backend)
                content["files"], content["files-meta"] = files[task.stage, d.backend]
            messages.append(Message(content, dst_node_id=node.node_id, message_type=MessageType.TRAIN,
                                    group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self._round
        if rnd is None:
            return None, None  # the plan had finished: nothing was sent
        device_of = {self.nodes[d.id].node_id: d for d, _ in rnd.tasks}
        # a reply is matched by the message it answers (an unreachable node's error comes from the SuperLink)
        sent = {m.metadata.message_id: device_of[m.metadata.dst_node_id] for m in self._sent}
        results, failed, late = [], [], []
        arrived = self.timer.arrived if self.timer is not None else {}
        wall: dict[int, float] = {}
        for r in replies:
            d = sent.pop(r.metadata.reply_to_message_id, None)
            if d is None:
                continue  # not a message of this round
            seconds = arrived.get(r.metadata.reply_to_message_id)
            if self.timer is not None and seconds is not None and seconds > self.cfg.deadline:
                late.append(Late(d.id, seconds, d.num_samples))  # pulled just after the deadline: dropped as well
            elif r.has_error():
                failed.append((d.id, r.error.reason))
            else:
                results.append((d, content_to_update(r.content)))
                if seconds is not None:
                    wall[d.id] = seconds
        if self.timer is not None and self.cfg.deadline <= self.cfg.round_timeout:
            late += [Late(d.id, self.timer.waited, d.num_samples) for d in sent.values()]
        else:
            failed += [(d.id, "no reply before the round timeout") for d in sent.values()]
        record = self._record = self.engine.aggregate(rnd, results, failed, late)
        for entry in record["devices"]:
            entry["node_id"] = self.nodes[entry["id"]].node_id
            if entry["id"] in wall:
                entry["wall_seconds"] = wall[entry["id"]]  # from sending the task to pulling the reply
        metrics = {"participants": len(record["devices"]), "failed": len(failed), "late": len(record["late"])}
        if record.get("train_loss") is not None:
            metrics["train_loss"] = float(record["train_loss"])
        return arrays_to_record(self.engine.state.arrays), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The round's participants hold the files of the stage they trained: they score the new global model as that
        stage sees it on their own held-out data (a width plan's device: its sub-model, the first channels)."""
        if self._record is None or not self.cfg.federated_eval:
            return []
        m, trained = self.engine.manifest, {d.id: task.stage for d, task in self._round.tasks}
        messages = []
        for d in self._record["devices"]:
            if self.nodes[d["id"]].eval_samples == 0:
                continue
            stage = m.stage(trained[d["id"]])
            cfg = ConfigRecord({"stage": stage.name, "manifest_sha256": self.manifest_sha})
            messages.append(Message(RecordDict({"arrays": arrays_to_record(stage.take(self.engine.state.arrays, m)),
                                                "config": cfg}),
                                    dst_node_id=self.nodes[d["id"]].node_id, message_type=MessageType.EVALUATE,
                                    group_id=str(server_round)))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self._record is None:
            return None
        n, acc, loss = 0, 0.0, 0.0
        for r in replies:
            if r.has_error():
                log.warning("a device could not evaluate round %d: %s", server_round, r.error.reason)
                continue
            m = r.content["metrics"]
            k = int(m["num-examples"])
            n, acc, loss = n + k, acc + k * float(m["accuracy"]), loss + k * float(m["loss"])
        self._record["device_eval"] = {"accuracy": acc / n, "loss": loss / n, "samples": n} if n else None
        return MetricRecord({"device_accuracy": acc / n, "device_loss": loss / n}) if n else None

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's server-side evaluation hook, the round's last step: the engine scores and writes the round."""
        if self._record is None:
            return None
        record, self._record = self._record, None
        self.engine.commit(record)
        out = {"round": float(self.engine.state.round)}
        if record["accuracy"] is not None:
            out.update(accuracy=float(record["accuracy"]), test_loss=float(record["test_loss"]))
        return MetricRecord(out)


def run_server(grid: Grid, cfg: FlowerRunConfig, engine: RoundEngine) -> RoundEngine:
    """The server side of one run over an opened engine (the ServerApp's, or progfl.server.flower_sim's)."""
    if cfg.test_data and engine.evaluator is None:
        from ..data import read_dataset

        test = read_dataset(cfg.test_data)
        engine.evaluator = Evaluator(cfg.artifacts, engine.manifest, test.x, test.y)
    wait_for_nodes(grid, cfg.min_nodes, cfg.query_timeout)
    strategy = ProgflStrategy(engine, cfg)
    if cfg.deadline is not None:
        grid = strategy.timer = DeadlineGrid(grid, cfg.deadline)
    try:
        strategy.start(grid, arrays_to_record(engine.state.arrays), num_rounds=cfg.rounds - engine.state.round,
                       timeout=cfg.round_timeout, evaluate_fn=strategy.evaluate_round)
    finally:  # also when the run stopped (Diverged): the report covers the rounds that were written
        engine.report(quietly=True)
    return engine


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, resume = FlowerRunConfig.from_run_config(dict(context.run_config))
    run_server(grid, cfg, RoundEngine(cfg, resume, {"engine": "flower"}, quiet=True))


__all__ = ["DeadlineGrid", "FlowerRunConfig", "Node", "ProgflStrategy", "app", "query_nodes", "record_to_arrays", "run_server"]
