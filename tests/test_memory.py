"""Every device trains within its memory at realistic shard sizes: the promise the sizing makes, checked in a run."""

from __future__ import annotations

import json

import torch

from progfl.exporter import export_model
from progfl.manifest import DeviceClass, predicted_peak_mb
from progfl.models import build_model
from progfl.server.simulation import SimConfig, run_simulation


def test_simulation_with_500_samples_a_device_stays_within_every_budget(tmp_path):
    """8 devices x 500 MNIST-5k samples, every budget just large enough for grow-1 at micro-batch 32 (a 10 % safety
    margin is the only headroom). The run walks grow-0, grow-1, grow-2; the highest measured peak of any
    device-round must stay within its budget. Holding grow-1's features for the shard (12 MB at width 8) and the
    touched pages of a memory-mapped cache (12 MB more) took devices over; streaming must not."""
    torch.manual_seed(0)
    art = tmp_path / "art"
    manifest = export_model(build_model("resnet18", 10, (1, 28, 28), width=8), art, [DeviceClass("any", 4096.0)],
                            kinds=("grow", "full"), batch_size=32, measure_batches=[1, 8, 32], safety_margin=0.1,
                            backends=("ort",))
    budget = round(predicted_peak_mb(manifest.stage("grow-1"), 32) / (1 - manifest.safety_margin) + 0.5, 1)
    cfg = SimConfig(plan="smartfreeze", artifacts=str(art), out=str(tmp_path / "run"), dataset="mnist5k", devices=8,
                    per_round=4, rounds=3, epochs=1, workers=2, seed=0, fleet=[budget] * 8,
                    pace={"window": 1, "slope_window": 2, "min_rounds": 1, "max_rounds": 1})
    run = run_simulation(cfg, quiet=True)
    history = json.loads((run / "history.json").read_text())
    assert [r["stage"] for r in history["rounds"]] == ["grow-0", "grow-1", "grow-2"]
    grow1 = next(r for r in history["rounds"] if r["stage"] == "grow-1")
    assert len(grow1["devices"]) == 4, "every device's budget holds grow-1"
    rows = [d for r in history["rounds"] for d in r["devices"]]
    assert {d["samples"] for d in rows} == {500}
    worst = max(d["peak_mb"] / d["budget_mb"] for d in rows)
    assert worst <= 1.0, f"a device went over its budget: peak/budget {worst:.3f}"
