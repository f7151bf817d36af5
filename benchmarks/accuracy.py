"""Accuracy against the baselines: every plan on the same seed, data and fleet.

100 devices, 20 per round, ProFL's fleet (8 % hold full-model training), IID and Dirichlet(0.5), on MNIST-5k
and animal-mnist. Per run: final accuracy, rounds and simulated device-time to the target, share of devices
that took part, peak memory per device against its budget. Writes benchmarks/out/accuracy.{json,md} and one
report folder per dataset/partition with the accuracy, EM and memory plots.

    python benchmarks/accuracy.py                 # the full grid (long: about an hour on 2 cores)
    python benchmarks/accuracy.py --quick         # 20 devices, 5 per round, 12 rounds, MNIST-5k IID only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from progfl.manifest import Manifest, ManifestError, write_atomic
from progfl.server.report import compare_table, load_history, summarize, write_report
from progfl.server.simulation import SimConfig, run_simulation

PLANS = ("profl", "smartfreeze", "neulite", "exclusive", "fedavg")
PACE = {"window": 3, "slope_window": 3, "min_rounds": 4, "max_rounds": 12, "slope_threshold": 0.05, "em_threshold": 0.5}


def artifacts(out: Path, width: int) -> Path:
    """A ResNet-18 for 28x28 grey images with every stage kind, exported once and reused."""
    folder = out / f"accuracy-artifacts-w{width}"
    try:
        Manifest.load(folder).verify_files(folder)
        return folder
    except ManifestError:
        shutil.rmtree(folder, ignore_errors=True)
    # torch only in here: device processes re-import this script, and torch at the top would sit in their RSS
    import torch

    from progfl.exporter import export_model
    from progfl.exporter.sizing import load_device_classes
    from progfl.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 10, (1, 28, 28), width=width)
    export_model(model, folder, load_device_classes(None)[:1], kinds=("grow", "distill", "neulite", "full"),
                 batch_size=32, measure_batches=[1, 8, 32], progress=print)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--datasets", default=None)
    ap.add_argument("--partitions", default=None)
    ap.add_argument("--target", type=float, default=0.8)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    art = artifacts(out, a.width)
    devices, per_round, rounds = (20, 5, 12) if a.quick else (100, 20, 60)
    rounds = a.rounds or rounds
    datasets = (a.datasets or ("mnist5k" if a.quick else "mnist5k,animal-mnist")).split(",")
    partitions = (a.partitions or ("iid" if a.quick else "dirichlet,iid")).split(",")
    results: list[dict] = []
    for dataset in datasets:
        for partition in partitions:
            folder = out / f"accuracy-{dataset}-{partition}"
            shutil.rmtree(folder, ignore_errors=True)
            runs = []
            for plan in a.plans.split(","):
                cfg = SimConfig(plan=plan, artifacts=str(art), out=str(folder / plan), dataset=dataset,
                                partition=partition, alpha=0.5, devices=devices, per_round=per_round, rounds=rounds,
                                lr=0.05, seed=0, workers=os.cpu_count() or 2, target=a.target, pace=PACE)
                print(f"{dataset} {partition} {plan}", flush=True)
                runs.append(run_simulation(cfg, quiet=True))
            write_report(runs, folder, a.target)
            for r in runs:
                s = summarize(load_history(r), a.target)
                results.append({"dataset": dataset, "partition": partition, **{k: v for k, v in s.items() if k != "stages"}})
            print(compare_table([load_history(r) for r in runs], a.target), flush=True)
            write_results(out, results, devices, per_round, rounds, a.width, a.target)  # after each grid cell


def write_results(out: Path, results: list[dict], devices: int, per_round: int, rounds: int, width: int,
                  target: float) -> None:
    write_atomic(out / "accuracy.json", json.dumps({"devices": devices, "per_round": per_round, "rounds": rounds,
                                                     "width": width, "pace": PACE, "results": results},
                                                    indent=1, default=float).encode())
    lines = [f"{devices} devices, {per_round} per round, {rounds} rounds, ResNet-18 width {width}, target {target}",
             "", "| dataset | partition | plan | final acc | best acc | rounds to target | device-s to target "
             "| took part | max peak/budget | over-budget rounds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = lambda v, p=3: "—" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
        lines.append(f"| {r['dataset']} | {r['partition']} | {r['plan']} | {f(r['final_accuracy'])} | "
                     f"{f(r['best_accuracy'])} | {f(r['rounds_to_target'])} | {f(r['device_seconds_to_target'], 1)} | "
                     f"{r['participation_share']:.0%} | {f(r['max_peak_ratio'], 2)} | {r['over_budget_device_rounds']} |")
    write_atomic(out / "accuracy.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines), flush=True)

if __name__ == "__main__":
    main()
