"""progfl on a Flower 1.41 loopback deployment with TLS and SuperNode authentication.

The SuperLink serves TLS with a throw-away CA (tests/loopback.py) and runs with --enable-supernode-auth; two
SuperNodes whose public keys were registered with `flwr supernode register` train the progfl app (fedavg, 2 rounds);
a third SuperNode with a key pair the SuperLink never saw is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from progfl.data import iid, load_dataset, write_dataset, write_shards
from progfl.exporter import export_model
from progfl.manifest import DeviceClass
from progfl.models import build_model

from loopback import Deployment, make_node_keys

APP = Path(__file__).resolve().parent.parent / "progfl" / "flower_app"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("flower-secure") / "a"
    export_model(build_model("cnn", 10, (1, 8, 8), width=4), folder, [DeviceClass("any", 4096.0)],
                 kinds=("full",), batch_size=16, measure_batches=[16], backends=("ort",))
    return folder


def test_tls_supernode_auth_run_and_unregistered_node_refused(artifacts, tmp_path):
    train, test = load_dataset("digits", seed=0)
    write_shards(train, iid(train.y, 2, np.random.default_rng(0)), tmp_path / "data")
    write_dataset(test, tmp_path / "test.npz")

    keys = tmp_path / "keys"
    registered = [make_node_keys(keys, f"node{i}") for i in range(2)]
    rogue_key, _ = make_node_keys(keys, "rogue")  # never registered

    def node_config(i: int, cache: str) -> str:
        return (f'memory-mb=4096 data-path="{tmp_path / "data" / f"device_{min(i, 1):04d}.npz"}" '
                f'artifacts-dir="{tmp_path / cache}" backend="ort" threads=1 device-id={i}')

    with Deployment(tmp_path / "deploy", tls=True, auth=True) as d:
        d.start_superlink()
        ids = [d.register(pub, name=f"node{i}") for i, (_, pub) in enumerate(registered)]
        assert {n["node-id"]: n["status"] for n in d.supernodes()} == {str(i): "registered" for i in ids}
        for i, (key, _) in enumerate(registered):
            d.start_supernode(f"node{i}", node_config(i, f"cache{i}"), private_key=key)
        rogue = d.start_supernode("rogue", node_config(2, "cache-rogue"), private_key=rogue_key)
        d.wait_online(ids)

        # Refusal, as Flower 1.41 does it: with --enable-supernode-auth the SuperLink creates no node for an
        # unknown key (Fleet RegisterNode is disabled; a SuperNode given a private key does not even try it) and its
        # ActivateNode, which looks the node up by public key, fails with HTTP 412 "Failed to activate SuperNode".
        # 412 is not retried: the SuperNode logs Flower exit code 305 (SUPERNODE_CONNECTION_ERROR) and exits (process
        # status 1) before it ever gets a node id, so it can pull no message. Shown by its exit and log, by the
        # SuperLink's node list (only the two registered ids) and below by the run's fleet (two devices) and its
        # empty artifacts cache.
        assert rogue.wait(timeout=60) == 1, d.log("rogue")[-2000:]
        log = d.log("rogue")
        assert "Exit Code: 305" in log and "Failed to initialize the connection to the SuperLink" in log, log
        assert "[code: 2004] Failed to activate SuperNode." in log, log
        link = d.log("superlink")
        assert "Uvicorn running on https://127.0.0.1" in link  # TLS: Fleet, Control and Runtime APIs
        assert "[/v1/fleet/activate-node][ApiError:2004]" in link
        assert "No SuperNode found with the given public key" in link
        nodes = d.supernodes()
        assert sorted(n["node-id"] for n in nodes) == sorted(str(i) for i in ids), nodes
        assert all(n["status"] == "online" for n in nodes), nodes

        run_cfg = (f'artifacts="{artifacts}" out="{tmp_path / "run"}" test-data="{tmp_path / "test.npz"}" '
                   f'plan="fedavg" rounds=2 per-round=2 seed=1 lr=0.05 epochs=1 min-nodes=2 query-timeout=60.0 '
                   f'round-timeout=120.0')
        d.run_to_completion(APP, run_cfg, timeout=120, logs=("node0",))
        assert sorted(n["node-id"] for n in d.supernodes()) == sorted(str(i) for i in ids)
    assert not d.left, f"processes left running: {d.left}"
    assert all(p.returncode is not None for p in d.procs)

    h = json.loads((tmp_path / "run" / "history.json").read_text())
    assert sorted(dev["id"] for dev in h["fleet"]) == [0, 1]  # the rogue (device-id=2) is not in the fleet
    assert [r["round"] for r in h["rounds"]] == [1, 2]
    for r in h["rounds"]:
        assert not r["failed"], r["failed"]
        assert sorted(r["participants"]) == [0, 1]
        assert 0.0 <= r["accuracy"] <= 1.0
    assert any((tmp_path / "cache0").rglob("*")) and any((tmp_path / "cache1").rglob("*"))
    assert not (tmp_path / "cache-rogue").exists() or not any((tmp_path / "cache-rogue").rglob("*"))
