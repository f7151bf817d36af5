"""Where honest updates lie, and where poisoned ones land: the measurement behind aggregation's drop rules.

Honest rounds of FedAvg (the whole model, 10 devices, 5 a round, 8 rounds) on a tiny CNN on sklearn digits, under
four partitions and local settings. For every update of every round it records (a) its L2 distance from the global
weights over the round's median distance (the `--outlier-k` rule) and (b) the cosine between its weights and the
global weights (the "points away" rule), and the same two numbers for poisoned copies of each update: weights x 1e6,
sign-flipped weights (w -> -w), the update direction flipped (g - delta) and a boosted flip (g - 10 delta).

    python benchmarks/update_geometry.py [--rounds 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_OUT, md_table, write_json, write_text  # noqa: E402

SETTINGS = {  # partition and local work
    "iid, 1 epoch, lr 0.05": dict(partition="iid", epochs=1, lr=0.05),
    "dirichlet 0.3, 2 epochs, lr 0.05": dict(partition="dirichlet", alpha=0.3, epochs=2, lr=0.05),
    "dirichlet 0.3, 5 epochs, lr 0.01": dict(partition="dirichlet", alpha=0.3, epochs=5, lr=0.01),
    "label-dirichlet 0.3, 5 epochs, lr 0.01": dict(partition="label-dirichlet", alpha=0.3, epochs=5, lr=0.01),
}
POISONS = {"x 1e6": lambda w, g: w * 1e6, "sign-flipped (-w)": lambda w, g: -w,
           "direction flipped (g - delta)": lambda w, g: 2 * g - w, "boosted flip (g - 10 delta)": lambda w, g: g - 10 * (w - g)}


def geometry(g: np.ndarray, ws: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(distance from g / the round's median distance, cosine with g) of each update."""
    dist = np.linalg.norm(np.stack(ws) - g, axis=1)
    cos = np.array([w @ g / (np.linalg.norm(w) * np.linalg.norm(g)) for w in ws])
    return dist / np.median(dist), cos


def honest_rounds(work: Path, name: str, kw: dict, rounds: int):
    """Yield (global vector, update vectors) for each round of an honest FedAvg run."""
    import torch

    from progfl.exporter import export_model
    from progfl.manifest import DeviceClass
    from progfl.models import build_model
    from progfl.server.evaluate import Evaluator
    from progfl.server.rounds import RoundEngine
    from progfl.server.simulation import SimConfig, _train_device, prepare_data
    from progfl.server.workers import DevicePool, JobFailed

    art = work / "artifacts"
    if not art.exists():
        torch.manual_seed(0)
        export_model(build_model("cnn", 10, (1, 8, 8), width=4), art, [DeviceClass("any", 4096.0)], kinds=("full",),
                     batch_size=16, measure_batches=[1, 16], backends=("ort",))
    cfg = SimConfig(plan="fedavg", artifacts=str(art), out=str(work / name.replace(" ", "_")), dataset="digits",
                    devices=10, per_round=5, rounds=rounds, workers=2, seed=1, fleet=[4096.0] * 10, outlier_k=0, **kw)
    engine = RoundEngine(cfg, quiet=True)
    devices, tx, ty = prepare_data(cfg, engine.manifest, engine.run)
    engine.evaluator = Evaluator(cfg.artifacts, engine.manifest, tx, ty)
    pool = DevicePool(2, preload=["progfl.server.simulation"])
    while not engine.done:
        rnd = engine.configure(devices)
        out = pool.map(_train_device, [(str(art), str(engine.run / "data" / f"device_{d.id:04d}.npz"), None, t)
                                       for d, t in rnd.tasks])
        results = [(d, u) for (d, _), u in zip(rnd.tasks, out) if not isinstance(u, JobFailed)]
        names = sorted(results[0][1].weights)
        g = np.concatenate([np.asarray(engine.state.arrays[n], np.float64).ravel() for n in names])
        yield g, [np.concatenate([np.asarray(u.weights[n], np.float64).ravel() for n in names]) for _, u in results]
        engine.commit(engine.aggregate(rnd, results, []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    t0, rows, result = time.perf_counter(), [], {}
    with tempfile.TemporaryDirectory(prefix="update_geometry.") as tmp:
        for name, kw in SETTINGS.items():
            honest = {"ratio": [], "cos": []}
            poisoned = {p: {"ratio": [], "cos": []} for p in POISONS}
            for g, ws in honest_rounds(Path(tmp), name, kw, args.rounds):
                ratio, cos = geometry(g, ws)
                honest["ratio"] += ratio.tolist()
                honest["cos"] += cos.tolist()
                for p, f in POISONS.items():
                    for i in range(len(ws)):
                        r, c = geometry(g, [*ws[:i], f(ws[i], g), *ws[i + 1:]])
                        poisoned[p]["ratio"].append(float(r[i]))
                        poisoned[p]["cos"].append(float(c[i]))
            result[name] = {"honest": honest, "poisoned": poisoned}
            rows.append([name, "honest", f"{max(honest['ratio']):.2f}", f"{min(honest['cos']):.3f}"])
            for p, v in poisoned.items():
                rows.append(["", p, f"{min(v['ratio']):.3g} .. {max(v['ratio']):.3g}",
                             f"{min(v['cos']):.3f} .. {max(v['cos']):.3f}"])
            args.out.mkdir(parents=True, exist_ok=True)
            write_json(args.out / "update_geometry.json", result)
    table = md_table(["setting", "update", "distance / round median (honest: max)", "cosine with global (honest: min)"],
                     rows)
    text = (f"# Where honest and poisoned updates lie\n\nCommand: `python benchmarks/update_geometry.py --rounds "
            f"{args.rounds}` ({time.perf_counter() - t0:.0f} s). FedAvg, tiny CNN (width 4) on digits, 10 devices, "
            f"5 a round, {args.rounds} rounds, seed 1; each poison replaces one honest update of a round at a time "
            f"(every update of every round).\n\n{table}\nDrop rules (progfl/server/aggregate.py): distance > 10 x the "
            f"median (`--outlier-k`), or cosine <= 0.\n")
    write_text(args.out / "update_geometry.md", text)
    print(text)


if __name__ == "__main__":
    main()
