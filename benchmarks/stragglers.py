"""Stragglers: SmartFreeze's selector against uniform selection, with and without a per-round deadline.

Same seeds, data, memory fleet and simulated speed fleet for every cell; only the selector (plan smartfreeze,
--option selector=smart | uniform) and the deadline change. Set-up: width-8 ResNet-18 on MNIST-5k (1x28x28),
Dirichlet(0.5) partition (device sizes vary), 20 devices, 5 a round, ProFL's memory fleet, the demo's pace
settings, lr 0.01, the simulated speed fleet of progfl simulate (lognormal factors, spread 0.5, from the seed).

The deadline is set from the fleet, not tuned on results: the 70th percentile, over the devices, of the simulated
time of a grow-0 round (the most expensive stage) if every device trained it. The benchmark knows the hidden speed
factors to compute it; the server never sees them. Later stages are cheaper (deadline.stage_cost), so a fixed
deadline bites mostly in grow-0 and grow-1.

Columns: late share = device-rounds dropped as late / device-rounds selected; final and best test accuracy; rounds
and simulated device time (sum of round times: the slowest on-time device, or the deadline when one was late) to
the target accuracy.

    python benchmarks/stragglers.py [--seeds 0,1] [--rounds 24] [--epochs 5] [--target 0.7] [--out benchmarks/out]

Writes out/stragglers.{json,md} after every cell and copies both to benchmarks/results/ at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Light imports only at the top: the device job processes (forkserver children) import this main module again.
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import DEFAULT_OUT, Settings, ensure_export, md_table, write_json, write_text  # noqa: E402

PACE = {"window": 3, "slope_window": 3, "min_rounds": 3, "max_rounds": 6, "slope_threshold": 0.05,
        "em_threshold": 0.5}  # the demo's (progfl.cli.DEMO_PACE)
SETTINGS = Settings(model="resnet18", width=8, input_shape=(1, 28, 28), batches=(32,), kinds=("grow", "full"))
QUANTILE = 0.7


@dataclass
class Cell:
    """One run of the grid and what it showed."""

    seed: int
    selector: str
    deadline: float | None
    selected: int
    late: int
    late_share: float
    final_acc: float | None
    best_acc: float | None
    rounds_to_target: int | None
    time_to_target: float | None
    total_time: float
    wall_seconds: float


def fleet_deadline(artifacts: Path, run: Path, seed: int, epochs: int, spread: float, sample_seconds: float) -> float:
    """The QUANTILE of the devices' simulated grow-0 round times (the benchmark may know the hidden factors)."""
    from progfl.manifest import Manifest
    from progfl.server.deadline import speed_factors, stage_cost

    counts = np.asarray(json.loads((run / "data" / "index.json").read_text())["counts"], np.float64)
    cost = stage_cost(Manifest.load(artifacts), "grow-0")
    times = epochs * counts * sample_seconds * cost / speed_factors(seed, len(counts), spread)
    return float(np.quantile(times, QUANTILE))


def summarize(run: Path, seed: int, selector: str, deadline: float | None, target: float, wall: float) -> Cell:
    rounds = json.loads((run / "history.json").read_text())["rounds"]
    selected = sum(len(r["selected"]) for r in rounds)
    late = sum(len(r.get("late", [])) for r in rounds)
    acc = [r["accuracy"] for r in rounds]
    times = np.cumsum([r["round_seconds"] for r in rounds])
    hit = next((i for i, a in enumerate(acc) if a is not None and a >= target), None)
    return Cell(seed, selector, deadline, selected, late, round(late / max(selected, 1), 3), acc[-1],
                max(a for a in acc if a is not None), None if hit is None else hit + 1,
                None if hit is None else round(float(times[hit]), 1), round(float(times[-1]), 1), round(wall, 1))


def write(out: Path, cells: list[Cell], meta: dict[str, Any]) -> None:
    write_json(out / "stragglers.json", {"meta": meta, "cells": [asdict(c) for c in cells]})
    rows = [[c.seed, c.selector, "none" if c.deadline is None else f"{c.deadline:.1f}", f"{c.late}/{c.selected}",
             f"{100 * c.late_share:.0f} %", _f(c.final_acc, ".3f"), _f(c.best_acc, ".3f"), _f(c.rounds_to_target, "d"),
             _f(c.time_to_target, ".0f"), f"{c.total_time:.0f}"] for c in cells]
    header = ["seed", "selector", "deadline (s)", "late / selected", "late share", "final acc", "best acc",
              f"rounds to {meta['target']}", f"sim. time to {meta['target']} (s)", "sim. time total (s)"]
    text = (f"# Stragglers: SmartFreeze selector vs uniform, with and without a deadline\n\n"
            f"Settings: `{json.dumps(meta)}`\n\n" + md_table(header, rows))
    write_text(out / "stragglers.md", text)


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--spread", type=float, default=0.5)
    ap.add_argument("--sample-seconds", type=float, default=0.005)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    from progfl.server.simulation import SimConfig, run_simulation

    artifacts = ensure_export(SETTINGS, args.out)
    runs = args.out / "stragglers-runs"
    meta = {"model": SETTINGS.tag, "dataset": "mnist5k", "partition": "dirichlet", "alpha": 0.5, "devices": 20,
            "per_round": 5, "rounds": args.rounds, "epochs": args.epochs, "lr": 0.01, "speed_spread": args.spread,
            "sample_seconds": args.sample_seconds, "deadline": f"{QUANTILE:g} quantile of grow-0 round times",
            "target": args.target, "pace": PACE}
    cells: list[Cell] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        deadline_s: float | None = None
        for deadline_on in (False, True):
            for selector in ("smart", "uniform"):
                name = f"seed{seed}-{selector}-{'deadline' if deadline_on else 'free'}"
                run = runs / name
                shutil.rmtree(run, ignore_errors=True)
                cfg = SimConfig(plan="smartfreeze", artifacts=str(artifacts), out=str(run), dataset="mnist5k",
                                partition="dirichlet", alpha=0.5, devices=20, per_round=5, rounds=args.rounds,
                                epochs=args.epochs, lr=0.01, seed=seed, workers=2, pace=dict(PACE),
                                options={"selector": selector}, target=args.target, speed_spread=args.spread,
                                sample_seconds=args.sample_seconds, deadline=deadline_s if deadline_on else None)
                t0 = time.perf_counter()
                run_simulation(cfg, quiet=True)
                cell = summarize(run, seed, selector, cfg.deadline, args.target, time.perf_counter() - t0)
                if deadline_s is None:  # every cell of a seed has the same data: the deadline from the first's
                    deadline_s = round(fleet_deadline(artifacts, run, seed, args.epochs, args.spread,
                                                      args.sample_seconds), 2)
                cells.append(cell)
                write(args.out, cells, meta)
                print(f"{name}: {asdict(cell)}", flush=True)
    results = HERE / "results"
    for ext in ("json", "md"):
        shutil.copy2(args.out / f"stragglers.{ext}", results / f"stragglers.{ext}")
    print(f"wrote {results / 'stragglers.md'}")


if __name__ == "__main__":
    main()
