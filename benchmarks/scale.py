"""What a large fleet costs the server: `progfl simulate` with 100, 1,000 and 10,000 registered devices (20 a round),
and Flower's simulation engine (progfl's Flower app on Ray) with 10 and 100 virtual nodes.

Every cell is a fresh process, so each peak is its own:
- progfl simulate: `server_peak_mb` of history.json, the server process's VmHWM (its device processes are forkserver
  children with their own; they are not in it), and each round's `server_seconds` (configure + writing the shards
  of first-time devices + aggregate + evaluate + checkpoint + history; the devices' training is not in it). The
  sizes run in turn, `--repeats` times, so 100 and 10,000 devices are measured side by side on the same machine
  state. Check: server peak at 10,000 devices <= 1.2x the peak at 100, in every repeat. The server's RSS after the
  first and the last round (`server_rss_mb`) shows what it holds once start-up's transients are gone.
- Flower: the server process's peak (it hosts the ServerApp, the SuperLink and Ray's driver), and the peak of the
  whole process tree (Ray's GCS, raylet, its workers and the device jobs they start) sampled every 0.25 s by PSS.
  Memory per virtual node = (peak at 100 nodes - peak at 10) / 90.

Tiny CNN (width 4, 1x28x28) on MNIST-5k (4,000 training samples, iid), ProFL, 1 local epoch, 2 worker processes.
10,000 devices over 4,000 samples leave 6,000 devices without data: registered, never selected (README).

    python benchmarks/scale.py [--out DIR] [--rounds 5] [--repeats 2] [--flower-rounds 2] [--no-flower]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_OUT, md_table, write_json, write_text  # noqa: E402

SIZES = (100, 1_000, 10_000)
FLOWER_NODES = (10, 100)
PER_ROUND = 20
LIMIT = 1.2  # server peak at 10,000 devices / at 100
EXPORT_KEY = {"model": "cnn", "width": 4, "input_shape": [1, 28, 28], "kinds": ["grow", "distill", "full"],
              "batch": 16, "measure_batches": [1, 16], "seed": 0}


def ensure_artifacts(out: Path) -> Path:
    """The tiny CNN's export, made once into out/artifacts-scale-cnn-w4 and reused while its settings match."""
    folder, key_file = out / "artifacts-scale-cnn-w4", out / "artifacts-scale-cnn-w4.settings.json"
    if (folder / "manifest.json").exists() and key_file.exists() and json.loads(key_file.read_text()) == EXPORT_KEY:
        return folder
    import torch

    from progfl.exporter import export_model
    from progfl.manifest import DeviceClass
    from progfl.models import build_model

    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(EXPORT_KEY["seed"])
    model = build_model("cnn", 10, tuple(EXPORT_KEY["input_shape"]), width=EXPORT_KEY["width"])
    export_model(model, folder, [DeviceClass("any", 4096.0)], kinds=tuple(EXPORT_KEY["kinds"]),
                 batch_size=EXPORT_KEY["batch"], measure_batches=EXPORT_KEY["measure_batches"], backends=("ort",))
    write_json(key_file, EXPORT_KEY)
    return folder


def _progfl() -> list[str]:
    script = Path(sys.executable).parent / "progfl"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from progfl.cli import main; main()"]


def _pss_mb(pid: int) -> float:
    """A process's proportional set size (shared pages split between the processes that map them), else its RSS."""
    for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
        except (OSError, ValueError):
            continue
    return 0.0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


class TreeSampler(threading.Thread):
    """Peak of the summed PSS of a process and all its descendants, sampled every `every` seconds."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak_mb, self.most_processes = pid, every, 0.0, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            pids = _descendants(self.pid)
            self.peak_mb = max(self.peak_mb, sum(_pss_mb(p) for p in pids))
            self.most_processes = max(self.most_processes, len(pids))
            self._done.wait(self.every)

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_cell(art: Path, work: Path, devices: int, rounds: int, engine: str, tag: str) -> dict[str, Any]:
    """One `progfl simulate` process; its numbers from history.json and the run folder."""
    run = work / tag
    shutil.rmtree(run, ignore_errors=True)
    per_round = PER_ROUND if engine == "progfl" else 10
    cmd = _progfl() + ["simulate", "--engine", engine, "--plan", "profl", "--artifacts", str(art), "--out", str(run),
                       "--dataset", "mnist5k", "--partition", "iid", "--devices", str(devices), "--per-round",
                       str(per_round), "--rounds", str(rounds), "--epochs", "1", "--lr", "0.05", "--workers", "2",
                       "--seed", "0"]
    log = work / f"{tag}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        sampler = TreeSampler(proc.pid)
        sampler.start()
        code = proc.wait(timeout=1800)
        sampler.stop()
    wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}: see {log}")
    h = json.loads((run / "history.json").read_text())
    rounds_ = h["rounds"]
    server = [r["server_seconds"] for r in rounds_]
    data = run / "data"
    return {
        "engine": engine, "devices": devices, "per_round": per_round, "rounds": len(rounds_),
        "devices_with_data": len(h["fleet"]),
        "server_peak_mb": h["server_peak_mb"],
        "server_peak_mb_by_round": [r["server_peak_mb"] for r in rounds_],
        "server_rss_mb_by_round": [r["server_rss_mb"] for r in rounds_],
        "server_seconds_median": statistics.median(server), "server_seconds_max": max(server),
        "server_seconds_by_round": [round(s, 4) for s in server],
        "tree_peak_mb": round(sampler.peak_mb, 1), "most_processes": sampler.most_processes,
        "eligible_mean": statistics.mean(r["eligible"] for r in rounds_),
        "participants_mean": statistics.mean(len(r["participants"]) for r in rounds_),
        "failed": sum(len(r["failed"]) for r in rounds_),
        "shards_written": len(list(data.glob("device_*.npz"))),
        "data_mb": round(sum(p.stat().st_size for p in data.iterdir()) / 2**20, 2),
        "history_kb": round((run / "history.json").stat().st_size / 1024, 1),
        "wall_seconds": round(wall, 1),
    }


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The check: per repeat, server peak at 10,000 devices over the peak at 100."""
    local = [c for c in cells if c["engine"] == "progfl"]
    ratios = []
    for rep in sorted({c["repeat"] for c in local}):
        by = {c["devices"]: c for c in local if c["repeat"] == rep}
        if min(SIZES) in by and max(SIZES) in by:
            ratios.append(round(by[max(SIZES)]["server_peak_mb"] / by[min(SIZES)]["server_peak_mb"], 3))
    flower = {c["devices"]: c for c in cells if c["engine"] == "flower"}
    per_node = None
    if set(FLOWER_NODES) <= set(flower):
        lo, hi = (flower[n] for n in FLOWER_NODES)
        span = FLOWER_NODES[1] - FLOWER_NODES[0]
        per_node = {"server_mb": round((hi["server_peak_mb"] - lo["server_peak_mb"]) / span, 2),
                    "tree_mb": round((hi["tree_peak_mb"] - lo["tree_peak_mb"]) / span, 2)}
    return {"peak_ratio_10000_vs_100": ratios, "limit": LIMIT, "ok": bool(ratios) and max(ratios) <= LIMIT,
            "flower_per_node": per_node}


def render(settings: dict[str, Any], cells: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    local = [c for c in cells if c["engine"] == "progfl"]
    rows = [[f"{c['devices']:,}", c["repeat"], f"{c['devices_with_data']:,}", f"{c['server_peak_mb']:.1f}",
             f"{c['server_rss_mb_by_round'][0]:.1f} / {c['server_rss_mb_by_round'][-1]:.1f}",
             f"{c['server_seconds_median'] * 1e3:.0f}", f"{c['server_seconds_max'] * 1e3:.0f}",
             f"{c['eligible_mean']:.0f}", c["shards_written"], f"{c['data_mb']:.1f}", f"{c['history_kb']:.0f}",
             c["failed"], f"{c['wall_seconds']:.0f}"] for c in local]
    text = [f"# Server cost of a large fleet\n\n{settings['description']}\n",
            md_table(["devices", "repeat", "with data", "server peak MB", "server RSS after round 1 / last MB",
                      "server ms/round (median)",
                      "server ms/round (max)", "eligible/round", "shards written", "data/ MB", "history.json KB",
                      "failed", "wall s"], rows)]
    if summary["peak_ratio_10000_vs_100"]:
        verdict = "within" if summary["ok"] else "OVER"
        text.append(f"\nServer peak at 10,000 devices / at 100, per repeat: "
                    f"{', '.join(f'{r:.3f}' for r in summary['peak_ratio_10000_vs_100'])} ({verdict} the "
                    f"{LIMIT}x limit).\n")
    flower = [c for c in cells if c["engine"] == "flower"]
    if flower:
        rows = [[c["devices"], f"{c['server_peak_mb']:.1f}", f"{c['tree_peak_mb']:.0f}", c["most_processes"],
                 f"{c['server_seconds_median'] * 1e3:.0f}", c["failed"], f"{c['wall_seconds']:.0f}"] for c in flower]
        text.append("\n## Flower's simulation engine (Ray)\n\n" + md_table(
            ["virtual nodes", "server process peak MB", "process tree peak MB (PSS)", "processes", "server ms/round",
             "failed", "wall s"], rows))
        per = summary["flower_per_node"]
        if per:
            text.append(f"\nMemory per virtual node ((100 nodes - 10 nodes) / 90): {per['server_mb']:.2f} MB in the "
                        f"server process, {per['tree_mb']:.2f} MB over the whole process tree.\n")
    return "\n".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--flower-rounds", type=int, default=2)
    ap.add_argument("--no-flower", action="store_true")
    args = ap.parse_args()
    if args.rounds < 1 or args.repeats < 1 or args.flower_rounds < 1:
        ap.error("--rounds, --repeats and --flower-rounds must be >= 1")

    args.out.mkdir(parents=True, exist_ok=True)
    art = ensure_artifacts(args.out)
    work = args.out / "scale-runs"
    work.mkdir(parents=True, exist_ok=True)
    settings = {"sizes": list(SIZES), "per_round": PER_ROUND, "rounds": args.rounds, "repeats": args.repeats,
                "flower_nodes": list(FLOWER_NODES), "flower_rounds": args.flower_rounds, "export": EXPORT_KEY,
                "description": (f"ProFL on a tiny CNN (width 4), MNIST-5k iid (4,000 training samples), "
                                f"{PER_ROUND} devices a round (Flower: 10), {args.rounds} rounds (Flower: "
                                f"{args.flower_rounds}), 1 local epoch, 2 workers, seed 0; each cell a fresh "
                                f"process. Server time excludes the devices' training.")}
    cells: list[dict[str, Any]] = []
    plan = [("progfl", n, rep) for rep in range(1, args.repeats + 1) for n in SIZES]
    if not args.no_flower:
        plan += [("flower", n, 1) for n in FLOWER_NODES]
    for engine, n, rep in plan:
        tag = f"{engine}-{n}-r{rep}"
        print(f"{tag} ...", flush=True)
        cell = run_cell(art, work, n, args.rounds if engine == "progfl" else args.flower_rounds, engine, tag)
        cells.append({**cell, "repeat": rep})
        print(f"  server peak {cell['server_peak_mb']:.1f} MB, server {cell['server_seconds_median'] * 1e3:.0f} "
              f"ms/round, tree peak {cell['tree_peak_mb']:.0f} MB, wall {cell['wall_seconds']:.0f} s", flush=True)
        summary = summarize(cells)
        write_json(args.out / "scale.json", {"settings": settings, "cells": cells, "summary": summary})
        write_text(args.out / "scale.md", render(settings, cells, summary))
    shutil.rmtree(work, ignore_errors=True)
    print(render(settings, cells, summary))
    if not summary["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
