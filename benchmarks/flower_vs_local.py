"""The same 2-round experiment on progfl's own simulation and on Flower's simulation engine (Ray).

Tiny CNN (width 4, 8x8 digits), ProFL, 10 devices that all hold every stage, per_round = devices (so both
engines train the same participants), same seed, 2 workers (local: processes; Flower: Ray actors, 1 CPU each),
one ORT thread per device. Reports wall time of each engine and the largest difference between the final
global weights (must be <= 1e-5).

    python benchmarks/flower_vs_local.py [--out DIR] [--devices 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_OUT, md_table, write_json, write_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import torch

    from progfl.exporter import export_model
    from progfl.manifest import DeviceClass, Manifest
    from progfl.models import build_model
    from progfl.server.fleet import required_mb
    from progfl.server.flower_sim import run_flower_simulation
    from progfl.server.simulation import SimConfig, run_simulation
    from progfl.server.state import load_state

    work = Path(tempfile.mkdtemp(prefix="flower_vs_local."))
    try:
        torch.manual_seed(0)
        art = work / "artifacts"
        export_model(build_model("cnn", 10, (1, 8, 8), width=4), art, [DeviceClass("any", 4096.0)],
                     kinds=("grow", "distill", "full"), batch_size=16, measure_batches=[1, 16])
        manifest = Manifest.load(art)
        top = max(required_mb(manifest, s.name) for s in manifest.stages)
        fleet = [round(top + 5.0 + 3.0 * i, 1) for i in range(args.devices)]  # everyone holds every stage
        common = dict(plan="profl", artifacts=str(art), dataset="digits", devices=args.devices,
                      per_round=args.devices, rounds=args.rounds, workers=args.workers, seed=3, lr=0.05,
                      fleet=fleet, pace={"window": 2, "slope_window": 2, "min_rounds": 1})
        runs, times = {}, {}
        for engine in ("local", "flower"):
            cfg = SimConfig(out=str(work / engine), **common)
            t0 = time.perf_counter()
            runs[engine] = run_simulation(cfg, quiet=True) if engine == "local" else run_flower_simulation(cfg, quiet=True)
            times[engine] = time.perf_counter() - t0
        hist = {e: json.loads((runs[e] / "history.json").read_text())["rounds"] for e in runs}
        a, b = load_state(runs["local"]).arrays, load_state(runs["flower"]).arrays
        diff = max(float(np.max(np.abs(a[n].astype(np.float64) - b[n]))) for n in a)
        same_participants = [sorted(r["participants"]) for r in hist["local"]] == [sorted(r["participants"]) for r in hist["flower"]]
        rows = []
        for e in ("local", "flower"):
            h = hist[e]
            rows.append([e, f"{times[e]:.1f}", " / ".join(f"{r['wall_seconds']:.1f}" for r in h),
                         " / ".join(r["stage"] for r in h), f"{h[-1]['accuracy']:.4f}",
                         f"{max(d['peak_mb'] for r in h for d in r['devices']):.0f}"])
        result = {"settings": {k: v for k, v in common.items() if k != "artifacts"}, "wall_seconds": times,
                  "max_abs_weight_diff": diff, "weights_equal_1e-5": diff <= 1e-5,
                  "same_participants": same_participants,
                  "rounds": {e: [{k: r[k] for k in ("round", "stage", "participants", "accuracy", "wall_seconds")}
                                 for r in hist[e]] for e in hist}}
        table = md_table(["engine", "total wall s", "wall s per round", "stages", "final accuracy",
                          "max device peak MB"], rows)
        text = (f"# progfl simulation vs Flower simulation engine\n\n{args.devices} devices, per_round = devices, "
                f"{args.rounds} rounds, ProFL, tiny CNN on digits, seed 3, {args.workers} workers.\n\n{table}\n"
                f"Max |local - flower| over the final global weights: {diff:.3g} "
                f"({'equal' if diff <= 1e-5 else 'NOT equal'} to 1e-5); same participants every round: "
                f"{same_participants}.\n\nTotal wall time includes data preparation and, for Flower, starting Ray "
                f"and its actors. On both engines a device's peak is measured in the process that runs its job alone: "
                f"a forkserver child locally, a fresh `python -m progfl.device_runtime.job` under Flower (the "
                f"virtual nodes report a transport baseline of 0: a Ray actor is no board's transport).\n")
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "flower_vs_local.json", result)
        write_text(args.out / "flower_vs_local.md", text)
        print(text)
        if diff > 1e-5 or not same_participants:
            sys.exit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
