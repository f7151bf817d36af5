"""Accuracy against the baselines: every plan on the same seeds, data and fleet, at the papers' local work.

A grid of (dataset, partition, seed, plan) runs of `progfl simulate`, each with ProFL's fleet shape (8 % of the
devices hold full-model training), SGD lr 0.01 with momentum 0.9 and weight decay 5e-4, 5 local epochs, batch 32.
Partitions: iid, dirXX = equal-size devices whose label mixes follow Dirichlet(XX) (Hsu et al.), so every device
keeps real local work. Per run: final and best accuracy, rounds and simulated device-time to the target, the share
of devices that took part, the highest peak/budget of any device-round. Per (dataset, partition, plan): mean and
spread (min..max) over the seeds. Extras: SmartFreeze's selector against uniform sampling among eligible devices
(`--selector`), and NeuLite's l1/l2 (`--neulite-sweep`: three values each, one export per value).

The width-scaled baselines (HeteroFL, FedRolex, AllSmall) and the depth-scaled one (DepthFL) train sub-models of the
same export on the same fleet (each cell's budgets are kept in out/accuracy-fleets); the table ends with the target
check: on each Dirichlet split, the best progressive plan against the best width-scaled one.

Results (benchmarks/out/accuracy.{json,md}) are rewritten after every run from every finished run in the output
folder, so a stopped grid keeps what it did and several invocations (other cells, more seeds) add up; `--resume`
keeps runs whose history is complete instead of running them again.

    python benchmarks/accuracy.py --datasets mnist5k --partitions dir0.5,iid --seeds 0,1,2 --rounds 100
    python benchmarks/accuracy.py --quick     # 12 rounds, one cell: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

from progfl.manifest import Manifest, ManifestError, write_atomic
from progfl.server.report import load_history, summarize
from progfl.server.simulation import SimConfig, run_simulation

PLANS = ("profl", "smartfreeze", "neulite", "heterofl", "fedrolex", "allsmall", "depthfl", "exclusive", "fedavg")
PROGRESSIVE = ("profl", "smartfreeze", "neulite")
WIDTH = ("heterofl", "fedrolex", "allsmall")  # the width-scaled baselines (depthfl: the depth-scaled one)
KINDS = ("grow", "distill", "neulite", "full", "width", "depth")  # the main export: every plan's stages
TARGET_GAP = 0.05  # the best progressive plan's mean final accuracy over the best width baseline's, Dirichlet splits
PACE = {"window": 3, "slope_window": 3, "min_rounds": 5, "max_rounds": 30}
L_VALUES = (0.0, 0.1, 0.3)  # the NeuLite sweep: each of l1, l2 over these with the other at its default 0.1


def artifacts(out: Path, width: int, l1: float = 0.1, l2: float = 0.1) -> Path:
    """A ResNet-18 for 28x28 grey images (every stage kind, the width and depth baselines' sub-models too; NeuLite's
    weights l1, l2), exported once and reused; exported again when it lacks a stage kind asked for now."""
    folder = out / f"accuracy-artifacts-w{width}" if (l1, l2) == (0.1, 0.1) else out / f"accuracy-artifacts-w{width}-l{l1}-{l2}"
    kinds = KINDS if (l1, l2) == (0.1, 0.1) else ("neulite", "full")
    try:
        manifest = Manifest.load(folder)
        manifest.verify_files(folder)
        if set(kinds) <= {s.kind for s in manifest.stages}:
            return folder
    except ManifestError:
        pass
    shutil.rmtree(folder, ignore_errors=True)
    # torch only in here: device processes re-import this script, and torch at the top would sit in their RSS
    import torch

    from progfl.exporter import export_model
    from progfl.manifest import DeviceClass
    from progfl.models import NeuLiteWeights, build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 10, (1, 28, 28), width=width)
    export_model(model, folder, [DeviceClass("bench", 1 << 20)], kinds=kinds, batch_size=32,  # simulated: ORT only
                 neulite=NeuLiteWeights(l1, l2), measure_batches=[1, 8, 32], progress=print, backends=("ort",))
    return folder


def partition(name: str) -> dict:
    if name == "iid":
        return {"partition": "iid"}
    if name.startswith("dir"):
        return {"partition": "label-dirichlet", "alpha": float(name[3:])}
    raise SystemExit(f"unknown partition {name!r}: iid or dirALPHA (e.g. dir0.5)")


def run_cell(a, art: Path, dataset: str, part: str, seed: int, plan: str, tag: str, options: dict) -> None:
    """One run; with --resume a run whose history is complete is kept. Its cell.json says what it is."""
    folder = Path(a.out) / "accuracy-runs" / f"{dataset}-{part}-s{seed}-{tag}"
    done = folder / "history.json"
    if not (a.resume and done.exists() and len(load_history(folder)["rounds"]) >= a.rounds):
        shutil.rmtree(folder, ignore_errors=True)
        cfg = SimConfig(plan=plan, artifacts=str(art), out=str(folder), dataset=dataset, devices=a.devices,
                        per_round=a.per_round, rounds=a.rounds, epochs=a.epochs, lr=a.lr, seed=seed,
                        workers=os.cpu_count() or 2, target=a.target, pace=PACE, options=options,
                        fleet=cell_fleet(a, art, dataset, part, seed), **partition(part))
        run_simulation(cfg, quiet=True)
    cell = {"dataset": dataset, "partition": part, "seed": seed, "plan": tag}
    write_atomic(folder / "cell.json", json.dumps(cell).encode())


def cell_fleet(a, art: Path, dataset: str, part: str, seed: int) -> list[float]:
    """The budgets of a (dataset, partition, seed) cell: ProFL's fleet shape drawn from the export's peaks the first
    time (as `progfl simulate` draws it), then kept in out/accuracy-fleets, so every plan of the cell trains on the
    same fleet, in later invocations and after a re-export (whose peaks differ by measurement noise) too."""
    path = Path(a.out) / "accuracy-fleets" / f"{dataset}-{part}-s{seed}.json"
    if path.exists():
        return [float(b) for b in json.loads(path.read_text())]
    budgets = SimConfig(artifacts=str(art), out="", devices=a.devices, seed=seed).budgets(Manifest.load(art))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(budgets).encode())
    return budgets


def collect(out: Path, target: float) -> list[dict]:
    """Every finished run under out/accuracy-runs (this invocation's and earlier ones'), summarised."""
    results = []
    for cell in sorted((out / "accuracy-runs").glob("*/cell.json")):
        meta = json.loads(cell.read_text())
        s = summarize(load_history(cell.parent), target)
        results.append({**{k: v for k, v in s.items() if k != "stages"}, **meta})  # meta's plan: the variant's tag
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasets", default="mnist5k,animal-mnist")
    ap.add_argument("--partitions", default="iid,dir0.5,dir0.1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--selector", action="store_true", help="also SmartFreeze with uniform selection")
    ap.add_argument("--neulite-sweep", action="store_true", help="also NeuLite with l1, l2 in 0, 0.1, 0.3")
    ap.add_argument("--resume", action="store_true", help="keep runs whose history is complete")
    a = ap.parse_args()
    if a.quick:
        a.datasets, a.partitions, a.seeds, a.rounds = "mnist5k", "dir0.5", "0", 12
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    art = artifacts(out, a.width)
    cells = [(d, p, int(s)) for d in a.datasets.split(",") for p in a.partitions.split(",") for s in a.seeds.split(",")]
    for dataset, part, seed in cells:
        for plan in a.plans.split(","):
            print(f"{dataset} {part} seed {seed} {plan}", flush=True)
            run_cell(a, art, dataset, part, seed, plan, plan, {})
            write_results(out, a, collect(out, a.target))
        if a.selector:
            run_cell(a, art, dataset, part, seed, "smartfreeze", "smartfreeze-uniform", {"selector": "uniform"})
            write_results(out, a, collect(out, a.target))
    if a.neulite_sweep:
        dataset, part, seed = cells[0]
        for l1, l2 in sorted({(v, 0.1) for v in L_VALUES} | {(0.1, v) for v in L_VALUES}):
            print(f"neulite l1={l1} l2={l2}", flush=True)
            run_cell(a, artifacts(out, a.width, l1, l2), dataset, part, seed, "neulite", f"neulite-l1={l1}-l2={l2}", {})
            write_results(out, a, collect(out, a.target))


def _spread(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ({min(vals):.3f}..{max(vals):.3f})"


def aggregate(results: list[dict]) -> list[dict]:
    """Mean and spread over seeds per (dataset, partition, plan), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["partition"], r["plan"]), []).append(r)
    rows = []
    for (dataset, part, plan), rs in groups.items():
        hit = [r["rounds_to_target"] for r in rs if r["rounds_to_target"] is not None]
        rows.append({"dataset": dataset, "partition": part, "plan": plan, "seeds": len(rs),
                     "final": _spread([r["final_accuracy"] for r in rs]),
                     "best": _spread([r["best_accuracy"] for r in rs]),
                     "final_mean": statistics.mean(r["final_accuracy"] for r in rs),
                     "rounds_to_target": f"{statistics.mean(hit):.0f} ({len(hit)}/{len(rs)})" if hit else f"— (0/{len(rs)})",
                     "device_s_to_target": _spread([r["device_seconds_to_target"] for r in rs]).split(" ")[0],
                     "took_part": f"{statistics.mean(r['participation_share'] for r in rs):.0%}",
                     "max_peak_ratio": max((r["max_peak_ratio"] or 0.0) for r in rs),
                     "over_budget": sum(r["over_budget_device_rounds"] for r in rs)})
    return rows


def write_results(out: Path, a, results: list[dict]) -> None:
    rows = aggregate(results)
    settings = {k: getattr(a, k) for k in ("devices", "per_round", "rounds", "epochs", "lr", "width", "target")}
    write_atomic(out / "accuracy.json", json.dumps({"settings": {**settings, "pace": PACE}, "runs": results,
                                                     "summary": rows}, indent=1, default=float).encode())
    lines = [f"{a.devices} devices ({a.per_round} a round), {a.rounds} rounds, {a.epochs} local epochs, lr {a.lr}, "
             f"ResNet-18 width {a.width}, target {a.target}; mean (min..max) over seeds", "",
             "| dataset | partition | plan | seeds | final acc | best acc | rounds to target (runs that hit) "
             "| device-s to target | took part | max peak/budget | over-budget device-rounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['partition']} | {r['plan']} | {r['seeds']} | {r['final']} | {r['best']} | "
                     f"{r['rounds_to_target']} | {r['device_s_to_target']} | {r['took_part']} | "
                     f"{r['max_peak_ratio']:.2f} | {r['over_budget']} |")
    lines += ["", *target_lines(rows)]
    write_atomic(out / "accuracy.md", ("\n".join(lines) + "\n").encode())


def target_lines(rows: list[dict]) -> list[str]:
    """Per Dirichlet cell: the best progressive plan against the best width-scaled baseline (mean final accuracy over
    the seeds), and whether the gap reaches TARGET_GAP."""
    out = [f"Target: on the Dirichlet splits the best progressive plan beats the best width-scaled baseline by "
           f">= {TARGET_GAP * 100:.0f} points (mean final accuracy over seeds).", "",
           "| dataset | partition | best progressive | best width baseline | gap (points) | met |", "|---|---|---|---|---|---|"]
    cells = {(r["dataset"], r["partition"]) for r in rows if r["partition"].startswith("dir")}
    for dataset, part in sorted(cells):
        here = [r for r in rows if (r["dataset"], r["partition"]) == (dataset, part)]
        prog = max((r for r in here if r["plan"] in PROGRESSIVE), key=lambda r: r["final_mean"], default=None)
        width = max((r for r in here if r["plan"] in WIDTH), key=lambda r: r["final_mean"], default=None)
        if prog is None or width is None:
            continue
        gap = prog["final_mean"] - width["final_mean"]
        out.append(f"| {dataset} | {part} | {prog['plan']} {prog['final_mean']:.3f} | {width['plan']} "
                   f"{width['final_mean']:.3f} | {gap * 100:+.1f} | {'yes' if gap >= TARGET_GAP else 'no'} |")
    return out


if __name__ == "__main__":
    main()
