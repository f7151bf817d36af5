"""Flower's refusal and integrity paths (issue 13, part 4): what a node refuses and what the server sends once.

Device side (progfl/device_runtime/flower.py): `store_files` checks every received file against its sha256, the file
list against its sha256 list and the manifest against the task's, and `_safe_path` keeps every path inside the
export's folder and that folder (named by the task's manifest sha256) inside the cache; a refused message writes
nothing. `held_stages` reports only cached exports whose manifest hashes to
its folder's name and whose stage files are intact. `train` refuses a stage this node's memory cannot hold, whatever
the server says. Server side (progfl/server/flower.py): a stage's files go to a node only when its capability reply
does not list the stage as held, so once per (node, stage) while the cache stays intact.

No Flower process is started: messages are built as Flower builds them and go through protobuf (as on the wire) to
the real ClientApp, called with a Context per node (InProcessGrid below, the Grid contract of Flower's InMemoryGrid);
the training itself (a fresh ONNX Runtime process per round, covered by tests/test_flower.py) is a stub that checks
the node holds the stage's files intact.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from progfl.device_runtime import job as job_module
from progfl.device_runtime.flower import (
    content_to_update,
    held_key,
    held_stages,
    make_client_app,
    stage_files,
    store_files,
    task_to_content,
)
from progfl.device_runtime.job import Job
from progfl.device_runtime.shard import Shard, read_labels
from progfl.exporter import export_model
from progfl.manifest import MANIFEST_NAME, DeviceClass, Manifest, ManifestError, TrainTask, TrainUpdate, sha256_file
from progfl.models import build_model
from progfl.server.flower import FlowerRunConfig, ProgflStrategy, run_server
from progfl.server.rounds import RoundEngine

BACKEND = "ort"
Export = tuple[Path, Manifest, str]  # the export's folder, its manifest, the manifest's sha256


# ---- fixtures and helpers ----
@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Export:
    """A tiny ProFL export (3 blocks: grow-0..2, distill-1..2), unmeasured: every stage's estimate is ~68 MB, so a
    node of 1024 MB holds each stage and one of 50 MB none. (folder, manifest, manifest sha256)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("integrity") / "a"
    manifest = export_model(build_model("cnn", 10, (1, 8, 8), width=4), folder, [DeviceClass("any", 4096.0)],
                            kinds=("grow", "distill"), batch_size=16, measure=False, backends=(BACKEND,))
    return folder, manifest, sha256_file(folder / MANIFEST_NAME)


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower 1.41 stamps every new message with the identity of the task running in this process (TaskIdentity, set
    by its ServerApp and ClientApp runners): here, the ServerApp of run 1; restored after each test."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


def payload(folder: Path, manifest: Manifest, stage: str) -> tuple[ArrayRecord, ConfigRecord]:
    """A stage's files exactly as the server attaches them: ProgflStrategy._files itself (uint8 arrays by relative
    path, and path -> sha256), called without building a round engine."""
    server = SimpleNamespace(artifacts=folder, engine=SimpleNamespace(manifest=manifest))
    return ProgflStrategy._files(server, stage, BACKEND)  # type: ignore[arg-type]


def replaced(files: ArrayRecord, rel: str, data: bytes) -> ArrayRecord:
    """A copy of `files` whose `rel` carries other bytes (the sha256 list is left as sent)."""
    out = ArrayRecord({k: files[k] for k in files})
    out[rel] = Array(np.frombuffer(data, np.uint8).copy())
    return out


def tree(root: Path) -> dict[str, str]:
    """Every entry under root: relative path -> 'dir', 'link -> target' or the file's sha256."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = f"link -> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else sha256_file(p)
    return out


def node_config(cache: Path, data: Path, memory_mb: float, device_id: int | None = None) -> dict[str, Any]:
    """A node's config as `flower-supernode --node-config` gives it; the transport baseline is fixed at 0 (this
    pytest process is no board's transport) and the feature cache off."""
    cfg: dict[str, Any] = {"memory-mb": float(memory_mb), "baseline-mb": 0.0, "data-path": str(data),
                           "artifacts-dir": str(cache), "backend": BACKEND, "threads": 1, "feature-cache": "off"}
    if device_id is not None:
        cfg["device-id"] = device_id
    return cfg


def context(node_id: int, cfg: dict[str, Any]) -> Context:
    """The Context a SuperNode gives its ClientApp: this node's config, run 1."""
    return Context(run_id=1, node_id=node_id, node_config=dict(cfg), state=RecordDict(), run_config={})


def over_the_wire(msg: Message) -> Message:
    """The message as the other side receives it: through Flower's protobuf serialisation."""
    return message_from_proto(message_to_proto(msg))


def deliver(app: ClientApp, msg: Message, ctx: Context) -> Message:
    """What a SuperNode does with a pushed message: run the ClientApp; an exception becomes the error reply, built as
    flwr/supernode/runtime/run_clientapp.py builds it (code CLIENT_APP_RAISED_EXCEPTION, reason "<type>:<'text'>")."""
    msg.metadata.__dict__["_message_id"] = msg.metadata.message_id or str(uuid4())  # set on push, as InMemoryGrid
    wire = over_the_wire(msg)
    try:
        reply = app(message=wire, context=ctx)
    except Exception as ex:  # noqa: BLE001 - Flower's runtime catches every exception of a ClientApp
        reason = str(type(ex)) + ":<'" + str(ex) + "'>"
        reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=wire)
    reply.metadata.__dict__["_message_id"] = str(uuid4())
    return over_the_wire(reply)


def fake_train(calls: list[tuple[str, str]]) -> Callable[[Job, TrainTask], TrainUpdate]:
    """job.train without its process: it checks the node holds the task's stage intact (what the real job would
    load), notes (cache folder, stage), and returns the stage's updated arrays shrunk by 1% (an honest-looking
    update: same direction as the global weights)."""
    def train(j: Job, task: TrainTask) -> TrainUpdate:
        m = Manifest.load(j.artifacts)
        stage = m.stage(task.stage)
        m.verify_files(j.artifacts, stage, j.backend)
        calls.append((str(Path(j.artifacts).parent), task.stage))
        return TrainUpdate(round=task.round, stage=task.stage, num_samples=len(read_labels(j.data)),
                           weights={n: (task.weights[n] * 0.99).astype(task.weights[n].dtype)
                                    for n in stage.updated_names},
                           metrics={"loss": 1.0, "peak_mb": 70.0, "seconds": 0.01})
    return train


def train_message(folder: Path, manifest: Manifest, sha: str, stage: str, micro_batch: int = 16,
                  files: tuple[ArrayRecord, ConfigRecord] | None = None, dst: int = 7,
                  budget_mb: float | None = None) -> Message:
    """A train message built as ProgflStrategy.configure_train builds it (the export's initial weights; budget_mb:
    the node's budget as the server sized it)."""
    weights = manifest.stage(stage).take(manifest.initial_weights(folder), manifest)
    task = TrainTask(round=1, stage=stage, epochs=1, batch_size=16, micro_batch=micro_batch,
                     accum_steps=max(1, 16 // micro_batch), lr=0.05, seed=1, weights=weights, manifest_sha256=sha,
                     budget_mb=budget_mb)
    content = task_to_content(task)
    if files is not None:
        content["files"], content["files-meta"] = files
    return Message(content, dst_node_id=dst, message_type=MessageType.TRAIN, group_id="1")


# ---- 1. sha256 and file-list checks: a refused message writes nothing ----
def test_store_files_accepts_the_servers_payload(export: Export, tmp_path: Path) -> None:
    """The positive control for the refusals below: the server's own payload is stored byte for byte."""
    folder, manifest, sha = export
    files, meta = payload(folder, manifest, "grow-1")
    out = store_files(tmp_path / "cache", sha, files, meta)
    assert out == tmp_path / "cache" / sha
    for rel in files:
        assert (out / rel).read_bytes() == (folder / rel).read_bytes()
    assert held_stages(tmp_path / "cache", BACKEND) == [held_key(sha, "grow-1")]


def test_store_files_refuses_bytes_that_do_not_match_their_sha256(export: Export, tmp_path: Path) -> None:
    """One file's bytes changed in transit (its sha256 left as the server computed it). The corrupt file is the
    payload's last, after the manifest and the stage's other files, so a device that wrote each file as it checked
    it would have written those: nothing at all may be written, not even the export's folder."""
    folder, manifest, sha = export
    files, meta = payload(folder, manifest, "grow-1")
    last = list(files)[-1]
    assert last != MANIFEST_NAME and len(files) > 2
    good = (folder / last).read_bytes()
    for bad in (good[:-1] + bytes([good[-1] ^ 1]), good[:-1], good + b"\0", b""):  # flipped, truncated, padded, empty
        cache = tmp_path / "cache"
        with pytest.raises(ManifestError, match=f"artifact {last}: received bytes do not match their sha256"):
            store_files(cache, sha, replaced(files, last, bad), meta)
        assert not cache.exists() or tree(cache) == {}, tree(cache)


def test_store_files_refuses_a_file_list_unlike_its_sha256_list(export: Export, tmp_path: Path) -> None:
    """The files and the path -> sha256 list must name the same paths: a file without a sha256, or a sha256 without
    its file, refuses the whole message before anything is written."""
    folder, manifest, sha = export
    files, meta = payload(folder, manifest, "grow-1")
    extra_file = replaced(files, "stage_01_grow-1/extra.onnx", b"not announced")
    extra_sha = ConfigRecord({**dict(meta), "stage_01_grow-1/extra.onnx": hashlib.sha256(b"x").hexdigest()})
    fewer_files = ArrayRecord({k: files[k] for k in list(files)[:-1]})
    for f, m in ((extra_file, meta), (files, extra_sha), (fewer_files, meta)):
        cache = tmp_path / "cache"
        with pytest.raises(ManifestError, match="artifact files and their sha256 list do not match"):
            store_files(cache, sha, f, m)
        assert not cache.exists() or tree(cache) == {}, tree(cache)


def test_store_files_refuses_a_manifest_other_than_the_tasks(export: Export, tmp_path: Path) -> None:
    """A payload whose manifest is intact but is not the one the task names (another export's): refused, nothing
    written (a folder named by one sha256 must hold the manifest of that sha256, which held_stages relies on)."""
    folder, manifest, sha = export
    files, meta = payload(folder, manifest, "grow-0")
    other = (folder / MANIFEST_NAME).read_bytes() + b"\n"
    forged = replaced(files, MANIFEST_NAME, other)
    forged_meta = ConfigRecord({**dict(meta), MANIFEST_NAME: hashlib.sha256(other).hexdigest()})
    with pytest.raises(ManifestError, match="received manifest is not the one the task names"):
        store_files(tmp_path / "cache", sha, forged, forged_meta)
    assert not (tmp_path / "cache").exists() or tree(tmp_path / "cache") == {}


def test_train_refuses_a_corrupt_payload_before_any_training(export: Export, tmp_path: Path, shard_1x12x12: Shard,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check through the ClientApp as a SuperNode runs it: a train message carrying a corrupt file gets an
    error reply naming the file; the node wrote nothing and started no training."""
    folder, manifest, sha = export
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(job_module, "train", fake_train(calls))
    files, meta = payload(folder, manifest, "grow-0")
    last = list(files)[-1]
    bad = replaced(files, last, (folder / last).read_bytes()[:-1])
    cache = tmp_path / "cache"
    ctx = context(7, node_config(cache, shard_1x12x12.path, 1024.0))
    reply = deliver(make_client_app(), train_message(folder, manifest, sha, "grow-0", files=(bad, meta)), ctx)
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "ManifestError" in reply.error.reason and f"artifact {last}: received bytes" in reply.error.reason
    assert calls == [] and (not cache.exists() or tree(cache) == {})
    # the same message with the file intact trains (the refusal was the corrupt byte, nothing else)
    reply = deliver(make_client_app(), train_message(folder, manifest, sha, "grow-0", files=(files, meta)), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert calls == [(str(cache), "grow-0")] and content_to_update(reply.content).stage == "grow-0"


# ---- 2. paths: nothing is written outside the export's folder ----
TRAVERSALS = ["../x", "../../x", "../../../x", "a/../../x", "a/b/../../../x", "./../x", "a/./../../x", "..", "",
              ".", "a/.."]


@pytest.mark.parametrize("rel", TRAVERSALS + ["ABSOLUTE"])
def test_store_files_refuses_a_path_leaving_the_export_folder(export: Export, tmp_path: Path, rel: str) -> None:
    """A relative path that climbs out of <cache>/<sha>/ (into the cache beside it, or above), an absolute path, or one
    naming the folder itself: refused with ManifestError, whatever else the message carries (a valid manifest and
    stage files come first), and nothing is written anywhere under tmp_path."""
    folder, manifest, sha = export
    if rel == "ABSOLUTE":
        rel = str(tmp_path / "abs" / "x")
    files, meta = payload(folder, manifest, "grow-0")
    data = b"payload outside"
    evil = replaced(files, rel, data)
    evil_meta = ConfigRecord({**dict(meta), rel: hashlib.sha256(data).hexdigest()})
    (tmp_path / "cache").mkdir()
    before = tree(tmp_path)
    with pytest.raises(ManifestError, match="leaves the cache folder"):
        store_files(tmp_path / "cache", sha, evil, evil_meta)
    assert tree(tmp_path) == before


def test_store_files_refuses_a_path_through_a_symlink(export: Export, tmp_path: Path) -> None:
    """_safe_path resolves symlinks: a link already in the export's folder (a directory link, or a file link) cannot
    carry a write outside it; the link's target is left untouched."""
    folder, manifest, sha = export
    files, meta = payload(folder, manifest, "grow-0")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"keep me")
    export_dir = tmp_path / "cache" / sha
    export_dir.mkdir(parents=True)
    (export_dir / "dirlink").symlink_to(outside, target_is_directory=True)
    (export_dir / "filelink").symlink_to(outside / "victim")
    for rel in ("dirlink/x", "dirlink/victim", "filelink"):
        data = b"through the link"
        evil = replaced(files, rel, data)
        evil_meta = ConfigRecord({**dict(meta), rel: hashlib.sha256(data).hexdigest()})
        before = tree(tmp_path)
        with pytest.raises(ManifestError, match="leaves the cache folder"):
            store_files(tmp_path / "cache", sha, evil, evil_meta)
        assert tree(tmp_path) == before, rel
    assert (outside / "victim").read_bytes() == b"keep me" and sorted(os.listdir(outside)) == ["victim"]

NOT_SHAS = ["../outside", "../../outside", "ABSOLUTE", "", ".", "A" * 64, "a" * 63, "a" * 64 + "/..", "a" * 64 + "\n"]


@pytest.mark.parametrize("name", NOT_SHAS)
def test_store_files_refuses_a_manifest_name_that_is_not_a_sha256(export: Export, tmp_path: Path, name: str) -> None:
    """The export's folder is named by the task's manifest_sha256, a string from the message like the paths: a
    payload without the manifest (nothing then ties that name to a sha256) must not make it a way out of the cache
    folder either; anything but 64 lowercase hex digits is refused."""
    folder, manifest, _ = export
    if name == "ABSOLUTE":
        name = str(tmp_path / "abs")
    files, meta = payload(folder, manifest, "grow-0")
    del files[MANIFEST_NAME], meta[MANIFEST_NAME]
    (tmp_path / "cache").mkdir()
    before = tree(tmp_path)
    with pytest.raises(ManifestError, match="is not a sha256"):
        store_files(tmp_path / "cache", name, files, meta)
    assert tree(tmp_path) == before


def test_train_without_files_refuses_a_manifest_name_that_is_not_a_sha256(export: Export, tmp_path: Path,
                                                                         shard_1x12x12: Shard,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A task that sends no files makes the node read <cache>/<manifest_sha256>: an export placed outside the cache
    (here a real one, one folder up) must not be loaded and trained through a name like ../export."""
    folder, manifest, sha = export
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(job_module, "train", fake_train(calls))
    cache = tmp_path / "cache"
    store_files(tmp_path, sha, *payload(folder, manifest, "grow-0"))  # a whole export at tmp_path/<sha>, outside
    ctx = context(7, node_config(cache, shard_1x12x12.path, 1024.0))
    reply = deliver(make_client_app(), train_message(folder, manifest, f"../{sha}", "grow-0"), ctx)
    assert reply.has_error() and "is not a sha256" in reply.error.reason and calls == []


def test_store_files_keeps_a_path_that_stays_inside(export: Export, tmp_path: Path) -> None:
    """The guard refuses only what leaves: 'a/../b' stays in the folder and is stored (as the folder's 'b')."""
    folder, manifest, sha = export
    files, meta = payload(folder, manifest, "grow-0")
    data = b"inside"
    ok = replaced(files, "a/../b", data)
    store_files(tmp_path / "cache", sha, ok, ConfigRecord({**dict(meta), "a/../b": hashlib.sha256(data).hexdigest()}))
    assert (tmp_path / "cache" / sha / "b").read_bytes() == data


# ---- 3. held_stages: only intact exports count; a re-sent stage repairs the cache ----
def query_held(cache: Path, data: Path) -> list[str]:
    """The 'held' list of the node's capability reply, through the ClientApp and the wire."""
    msg = Message(RecordDict({"config": ConfigRecord({"kind": "capabilities", "num-classes": 10})}), dst_node_id=7,
                  message_type=MessageType.QUERY)
    reply = deliver(make_client_app(), msg, context(7, node_config(cache, data, 1024.0)))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return list(reply.content["caps"]["held"])


def test_held_stages_ignores_a_tampered_export_until_it_is_sent_again(export: Export, tmp_path: Path,
                                                                     shard_1x12x12: Shard) -> None:
    """A node reports a stage as held only if its cached export is the one its folder names (manifest sha256) and the
    stage's files are intact; the server, told so, sends that stage again, and storing it repairs the cache."""
    folder, manifest, sha = export
    cache = tmp_path / "cache"
    names = [s.name for s in manifest.stages]
    for name in names:
        store_files(cache, sha, *payload(folder, manifest, name))
    everything = sorted(held_key(sha, n) for n in names)
    assert sorted(held_stages(cache, BACKEND)) == everything == sorted(query_held(cache, shard_1x12x12.path))

    # a manifest changed in the cache (still valid JSON, same stages): its sha256 is no longer the folder's name
    original = (cache / sha / MANIFEST_NAME).read_bytes()
    (cache / sha / MANIFEST_NAME).write_bytes(original + b" ")
    assert Manifest.load(cache / sha).stages  # loads fine: only the hash tells
    assert held_stages(cache, BACKEND) == [] and query_held(cache, shard_1x12x12.path) == []
    # the same export copied under another sha256's name: not held either
    (cache / ("0" * 64)).mkdir()
    (cache / ("0" * 64) / MANIFEST_NAME).write_bytes(original)
    assert held_stages(cache, BACKEND) == []
    # what happens next: the server, told nothing is held, sends the next stage's files with the manifest; the
    # manifest is written again (the cached one differs from its sha256), the other stages come back with it
    store_files(cache, sha, *payload(folder, manifest, "grow-0"))
    assert (cache / sha / MANIFEST_NAME).read_bytes() == original
    assert sorted(held_stages(cache, BACKEND)) == everything

    # one stage's file changed: that stage alone is dropped, and its re-sent files repair it
    target = cache / sha / manifest.stage("distill-1").files["training"].path
    good = target.read_bytes()
    target.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert sorted(held_stages(cache, BACKEND)) == sorted(set(everything) - {held_key(sha, "distill-1")})
    store_files(cache, sha, *payload(folder, manifest, "distill-1"))
    assert target.read_bytes() == good and sorted(held_stages(cache, BACKEND)) == everything
    # a missing file, too
    target.unlink()
    assert held_key(sha, "distill-1") not in held_stages(cache, BACKEND)


# ---- 4. a node refuses a stage its memory cannot hold, whatever the server says ----
@pytest.mark.parametrize("memory_mb, micro_batch, why", [
    (50.0, 16, "does not fit this node's 50 MB"),  # no micro-batch fits: the stage needs ~68 MB + 15% margin
    (1024.0, 32, "does not fit this node's 1024 MB"),  # fits at 16, the task asks for more
])
def test_train_refuses_a_stage_this_budget_cannot_hold(export: Export, tmp_path: Path, shard_1x12x12: Shard,
                                                       monkeypatch: pytest.MonkeyPatch, memory_mb: float,
                                                       micro_batch: int, why: str) -> None:
    """The server sized the task for 4096 MB (a stale or wrong view of the node), the node sizes it again from its
    own config: refused with a ManifestError naming the stage and the budget, which Flower returns as the error reply
    (the server logs it and records the device as failed, see the last test). No training starts. The files sent
    with the task are kept (the node sized the stage from their manifest): the next task of that stage comes without
    them."""
    folder, manifest, sha = export
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(job_module, "train", fake_train(calls))
    cache = tmp_path / "cache"
    ctx = context(7, node_config(cache, shard_1x12x12.path, memory_mb))
    msg = train_message(folder, manifest, sha, "grow-2", micro_batch, files=payload(folder, manifest, "grow-2"),
                        budget_mb=4096.0)
    with pytest.raises(ManifestError, match=f"task grow-2 at micro-batch {micro_batch} {why}"):
        make_client_app()(message=over_the_wire(msg), context=ctx)  # the handler as Flower calls it
    assert calls == []
    reply = deliver(make_client_app(), train_message(folder, manifest, sha, "grow-2", micro_batch, budget_mb=4096.0),
                    ctx)  # no files now: the node kept them
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason.startswith("<class 'progfl.manifest.ManifestError'>:<'task grow-2")
    assert why in reply.error.reason
    assert calls == [] and held_stages(cache, BACKEND) == [held_key(sha, "grow-2")]
    # the control: with room for it (and a micro-batch within the batch) the same node cache trains grow-2
    roomy = context(8, node_config(cache, shard_1x12x12.path, 4096.0))
    reply = deliver(make_client_app(), train_message(folder, manifest, sha, "grow-2", min(micro_batch, 16)), roomy)
    assert not reply.has_error() and calls == [(str(cache), "grow-2")]


# ---- 5. the server: a stage's files once per node, never to a node that holds them ----
class InProcessGrid(Grid):
    """Flower's Grid for a run in this process: a pushed message gets its id (as InMemoryGrid does), goes to its node's
    ClientApp through the wire format (deliver), and its reply waits to be pulled. `log` keeps every message sent and
    every reply; `on_query` runs before each round's capability query; `caps_override` changes what a node's reply
    says (a server told wrong)."""

    def __init__(self, app: ClientApp, nodes: dict[int, Context]):
        self.app, self.nodes = app, nodes
        self.log: list[tuple[Message, Message]] = []
        self.on_query: Callable[[], None] | None = None
        self.caps_override: dict[int, dict[str, Any]] = {}
        self._replies: dict[str, Message] = {}
        self._run: Run | None = None

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        assert self._run is not None
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if self.on_query and any(m.metadata.message_type == MessageType.QUERY for m in messages):
            self.on_query()
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid4())
            node = m.metadata.dst_node_id
            reply = deliver(self.app, m, self.nodes[node])
            if m.metadata.message_type == MessageType.QUERY and node in self.caps_override and not reply.has_error():
                caps = dict(reply.content["caps"])
                caps.update(self.caps_override[node])
                reply = over_the_wire(Message(RecordDict({"caps": ConfigRecord(caps)}), reply_to=m))
            self.log.append((m, reply))
            self._replies[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def test_server_sends_a_stages_files_once_per_node(export: Export, tmp_path: Path, shard_1x12x12: Shard,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A ProFL run of 7 rounds, one round per stage (grow-2, distill-2, grow-1, distill-1, grow-0, then grow-1 and
    grow-2 again), through run_server (Flower's Strategy.start over ProgflStrategy) and the real ClientApp on five
    nodes. Files are counted per (device, stage) in the train messages:
    - devices 0-2 (1024 MB) get each stage's files exactly once, when they first meet it, and none on a revisit;
    - device 1's cached manifest is tampered with before the first revisit: its capability reply then lists nothing,
      so that stage's files go to it a second time (and repair its cache);
    - device 3 has 50 MB but the server is told 4096: it is sent the tasks, refuses each (error reply), and the
      server records it as failed, every round, without stopping; the files it was sent, once, it keeps;
    - device 4 has 50 MB and says so: never chosen, never sent a file.
    And in every round, a train message carries files exactly when the node's capability reply did not list the
    stage as held, and then exactly the server's files of that stage (manifest included, no other stage's)."""
    folder, manifest, sha = export
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(job_module, "train", fake_train(calls))
    memory = {0: 1024.0, 1: 1024.0, 2: 1024.0, 3: 50.0, 4: 50.0}
    node_of = {d: 100 + d for d in memory}  # Flower node ids differ from device ids: the server must map them
    device_of = {n: d for d, n in node_of.items()}
    caches = {d: tmp_path / f"cache{d}" for d in memory}
    grid = InProcessGrid(make_client_app(), {node_of[d]: context(node_of[d], node_config(caches[d], shard_1x12x12.path,
                                                                                          memory[d], d))
                                             for d in memory})
    grid.caps_override[node_of[3]] = {"memory-mb": 4096.0}

    cfg = FlowerRunConfig(artifacts=str(folder), out=str(tmp_path / "run"), plan="profl", rounds=7, per_round=5,
                          lr=0.05, epochs=1, seed=1, min_nodes=5, query_timeout=5.0, round_timeout=5.0,
                          federated_eval=False, pace={"window": 1, "slope_window": 2, "min_rounds": 1, "max_rounds": 1},
                          options={"shrink_rounds": 1, "distill_rounds": 1})
    engine = RoundEngine(cfg, False, {"engine": "flower"}, quiet=True)
    monkeypatch.setattr(RoundEngine, "report", lambda self, quietly=False: None)  # plots: not this test's subject

    trained: dict[int, set[str]] = {d: set() for d in memory}  # what each device met before this round
    tampered: list[tuple[int, str]] = []  # (round, stage) of the tampering

    def before_query() -> None:
        """Before the first round whose stage device 1 already holds: change its cached manifest."""
        for m, _ in grid.log:  # the last round's train messages: who met which stage
            if m.metadata.message_type == MessageType.TRAIN:
                trained[device_of[m.metadata.dst_node_id]].add(str(m.content["config"]["stage"]))
        stage = engine.plan.stage(engine.state).name
        if not engine.done and not tampered and stage in trained[1]:
            path = caches[1] / sha / MANIFEST_NAME
            path.write_bytes(path.read_bytes() + b" ")
            tampered.append((engine.state.round + 1, stage))

    grid.on_query = before_query
    run_server(grid, cfg, engine)

    h = json.loads((tmp_path / "run" / "history.json").read_text())
    stages = [r["stage"] for r in h["rounds"]]
    assert stages == ["grow-2", "distill-2", "grow-1", "distill-1", "grow-0", "grow-1", "grow-2"], stages
    assert tampered == [(6, "grow-1")]

    # the messages, round by round: the query replies' held lists, then the train messages
    sent: Counter[tuple[int, str]] = Counter()
    tasks: Counter[tuple[int, str]] = Counter()
    held: dict[int, set[str]] = {}
    rnd = 0
    for m, reply in grid.log:
        d = device_of[m.metadata.dst_node_id]
        if m.metadata.message_type == MessageType.QUERY:
            held[d] = set(reply.content["caps"]["held"])
            continue
        assert m.metadata.message_type == MessageType.TRAIN  # federated evaluation is off
        stage = str(m.content["config"]["stage"])
        rnd = int(m.content["config"]["round"])
        tasks[d, stage] += 1
        has_files = "files" in m.content
        assert has_files == (held_key(sha, stage) not in held[d]), (rnd, d, stage, held[d])
        if has_files:
            sent[d, stage] += 1
            expected = stage_files(folder, manifest, stage, BACKEND)
            assert set(m.content["files"]) == set(expected) == set(m.content["files-meta"]), (rnd, d, stage)
        assert reply.has_error() == (d == 3), (rnd, d, reply.error.reason if reply.has_error() else "")
    assert rnd == 7

    met = {(d, s) for d in (0, 1, 2, 3) for s in set(stages)}
    assert set(tasks) == met and all(d != 4 for d, _ in tasks), "device 4 holds no stage: it gets no task"
    assert tasks[0, "grow-1"] == tasks[0, "grow-2"] == 2
    resent = {(1, "grow-1")}
    assert {k: v for k, v in sent.items() if v != 1} == {k: 2 for k in resent}, sent
    assert set(sent) == met, "every device that met a stage got its files"
    assert not caches[4].exists() or tree(caches[4]) == {}

    for r in h["rounds"]:  # the refusal is a failed device, the round goes on with the others
        assert r["eligible"] == 4 and r["participants"] == [0, 1, 2] and not r["kept_previous"], r
        assert [d for d, _ in r["failed"]] == [3] and "does not fit this node's 50 MB" in r["failed"][0][1], r["failed"]
    assert all(Path(c).name != "cache3" for c, _ in calls) and len(calls) == 3 * 7
    assert sha256_file(caches[1] / sha / MANIFEST_NAME) == sha, "the re-sent manifest repaired device 1's cache"
    for d in (0, 1, 2, 3):
        assert sorted(held_stages(caches[d], BACKEND)) == sorted(held_key(sha, s) for s in set(stages))
