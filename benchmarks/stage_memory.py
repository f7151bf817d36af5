"""Peak memory of every stage of ResNet-18, VGG-11 and a ViT: measured by the ORT probe at micro-batches 1, 8 and 32,
next to the analytic estimate (exporter/sizing.py) and the floor, as a share of full-model training; who can take part
in every stage under ProFL's fleet shape; PyTorch eager's peak at 32 for the ResNet.

Every measurement is a fresh subprocess:
  ORT:     progfl.device_runtime.probe.run_probe (torch-free: the device's local round, phase by phase)
  PyTorch: this file with --eager-worker (torch imported, the stage's weights built, prefix under no_grad,
           training steps with SGD momentum 0.9 and weight decay 5e-4, as progfl.exporter.eager.EagerStage)

    python benchmarks/stage_memory.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DEFAULT_OUT, ROOT, Settings, ensure_export, md_table, save_figure,  # noqa: E402
                     write_json, write_text)

from progfl.device_runtime.memory import peak_mb, release_free_memory, reset_peak, rss_mb  # noqa: E402  (no ORT)


def eager_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One stage trained by PyTorch eager in this process; prints nothing, returns peak and step time.

    Imports only torch and progfl.models (progfl.exporter would pull onnx and onnxruntime into the process).
    The process holds only what the stage needs (prefix + trainable part), as the ORT side does: the model's
    other parameters are dropped before the measured phase starts."""
    import gc

    import numpy as np
    import torch

    from progfl.models import build_model, build_stage, parse_stage_name

    after_import = rss_mb()
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["model"], cfg["num_classes"], tuple(cfg["input_shape"]), width=cfg["width"])
    spec = parse_stage_name(cfg["stage"])
    g = build_stage(model, spec)  # weight decay lives in the optimizer
    keep = {id(p) for p in g.train.parameters()}
    if g.prefix is not None:
        keep |= {id(p) for p in g.prefix.parameters()}
    held = 0
    for p in model.parameters():
        if id(p) in keep:
            held += p.numel()
        else:
            p.data = torch.empty(0)
    gc.collect()
    release_free_memory()
    trainable = [p for _, p in g.train.trainable_parameters()]
    rng = np.random.default_rng(0)
    start = rss_mb()
    resettable = reset_peak()
    opt = torch.optim.SGD(trainable, lr=0.01, momentum=0.9, weight_decay=5e-4)
    opt.zero_grad(set_to_none=False)
    times = []
    for i in range(cfg["steps"] + 1):  # the first step warms up and is not timed (as the ORT probe)
        x = torch.from_numpy(rng.standard_normal((cfg["batch"], *cfg["input_shape"])).astype(np.float32))
        y = torch.from_numpy(rng.integers(0, cfg["num_classes"], cfg["batch"]).astype(np.int64))
        t0 = time.perf_counter()
        with torch.no_grad():
            feats = x if g.prefix is None else g.prefix.eval()(x)
        g.train.train()
        loss, _, _ = g.train(feats, y, torch.tensor(1.0))  # loss_scale 1: the micro-batch is the batch
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if i:
            times.append(time.perf_counter() - t0)
    return {"stage": cfg["stage"], "batch": cfg["batch"], "peak_mb": round(peak_mb(), 1),
            "baseline_mb": round(after_import, 1), "phase_start_mb": round(start, 1),
            "step_ms": round(1000 * float(np.median(times)), 2), "params_held": held,
            "peak_resettable": resettable,
            "onnxruntime_imported": any(m.startswith("onnxruntime") for m in sys.modules)}


def run_eager(settings: Settings, stage: str, batch: int) -> dict[str, Any]:
    """eager_worker in a fresh interpreter."""
    cfg = {**settings.export_key(), "stage": stage, "batch": batch, "steps": settings.steps,
           "threads": settings.threads}
    out = subprocess.run([sys.executable, __file__, "--eager-worker", json.dumps(cfg)], capture_output=True,
                         text=True, timeout=1800, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"eager worker failed for {stage} @ {batch}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def import_baselines() -> dict[str, float]:
    """RSS right after import: python + numpy + progfl's torch-free ORT runtime vs python + torch + progfl.models."""
    code = {
        "python": "import sys",
        "python+numpy": "import numpy",
        "python+ort (progfl runtime, torch-free)": "import numpy, progfl.device_runtime.ort_backend",
        "python+torch (progfl.models)": "import numpy, torch, progfl.models",
    }
    res = {}
    for name, stmt in code.items():
        prog = (f"{stmt}\nfrom pathlib import Path\n"
                "print([l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS')][0])")
        out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True, cwd=ROOT)
        res[name] = round(int(out.stdout.split()[1]) / 1024.0, 1)
    return res


MODELS = [Settings(), Settings(model="vgg11", width=64), Settings(model="vit", width=192)]
ORT_BATCHES = (1, 2, 8, 32)  # micro-batches: the bottoms the sizing goes to (1; 2 with BatchNorm), and the batch
EAGER_BATCH = 32
MARGIN = 0.15  # the export's default safety margin
AUTHORS_SHARE = (100 / 840, 900 / 840)  # ProFL's fleet: budgets 100..900 MB against full-model training at 840 MB


def measure_model(settings: Settings, out: Path, eager: bool) -> dict[str, Any]:
    """Every stage of one model: the ORT probe at each micro-batch (peak, phases) next to the estimate and the floor,
    and PyTorch eager at the logical batch."""
    from progfl.device_runtime.probe import run_probe
    from progfl.exporter.sizing import estimate, floor_mb
    from progfl.manifest import Manifest

    folder = ensure_export(settings, out)
    manifest = Manifest.load(folder)
    rows: list[dict[str, Any]] = []
    for stage in manifest.stages:
        row: dict[str, Any] = {"stage": stage.name, "trainable_params": int(stage.footprint["trainable"]),
                               "min_micro_batch": stage.min_micro_batch, "ort": {}}
        for b in ORT_BATCHES:
            probe = run_probe(folder, stage.name, b, steps=settings.steps, threads=settings.threads)
            est = estimate(stage, b)
            row["ort"][str(b)] = {"peak_mb": probe["peak_mb"], "estimate_mb": est.estimate_mb,
                                  "estimate_parts": est.breakdown, "step_ms": probe["step_ms"],
                                  "phases": probe["phases"]}
            print(f"  {settings.model:<8} {stage.name:<7} ORT @{b:<3} {probe['peak_mb']:7.1f} MB measured, "
                  f"{est.estimate_mb:7.1f} estimated", flush=True)
        row["floor"] = floor_mb(stage, max(ORT_BATCHES))
        if eager:
            row["eager"] = run_eager(settings, stage.name, EAGER_BATCH)
        rows.append(row)
    return {"settings": settings.as_dict(), "rows": rows}


def measure(out: Path, quick: bool) -> dict[str, Any]:
    models = [Settings.make(True)] if quick else MODELS
    return {"models": [measure_model(m, out, eager=m.model == "resnet18") for m in models],
            "after_import_mb": import_baselines()}


def participation(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Who can take part in every progressive stage. A device needs a stage's peak at its smallest micro-batch (the
    sizing's bottom: 2 with BatchNorm, else 1) under its budget x (1 - margin). Returned: the smallest budget that takes
    every stage, as a share of full-model training's peak at the logical batch; and the share of devices that take part
    in every stage in two fleets of ProFL's shape: progfl's (server/fleet.py: budgets uniform from the cheapest stage's
    need to a ceiling where 8 % hold full-model training at its smallest micro-batch) and the authors' (budgets
    100..900 MB against full training at 840)."""
    need = {r["stage"]: r["ort"][str(r["min_micro_batch"])]["peak_mb"] / (1 - MARGIN) for r in rows}
    full32 = next(r for r in rows if r["stage"] == "full")["ort"][str(max(ORT_BATCHES))]["peak_mb"]
    grow = [s for s in need if s.startswith("grow")]
    all_stages = max(need[s] for s in grow)
    low = min(need[s] for s in grow)
    high = (need["full"] - 0.08 * low) / (1 - 0.08)
    a_low, a_high = AUTHORS_SHARE[0] * full32 / (1 - MARGIN), AUTHORS_SHARE[1] * full32 / (1 - MARGIN)
    share = lambda lo, hi, x: max(0.0, min(1.0, (hi - x) / (hi - lo)))  # noqa: E731  P(uniform budget >= x)
    return {"smallest_budget_every_stage_mb": round(all_stages, 1),
            "as_share_of_full_training": round(all_stages * (1 - MARGIN) / full32, 3),
            "progfl_fleet_every_stage": round(share(low, high, all_stages), 3),
            "progfl_fleet_per_stage": {s: round(share(low, high, need[s]), 3) for s in grow},
            "authors_fleet_every_stage": round(share(a_low, a_high, all_stages), 3)}


def summarize(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Per model: measured / estimated MB per micro-batch, % of full training, floor ratio; headline and fleet."""
    parts, headline = [], {}
    big = str(max(ORT_BATCHES))
    for m in data["models"]:
        s, rows = m["settings"], m["rows"]
        full = {b: next(r for r in rows if r["stage"] == "full")["ort"][b]["peak_mb"] for b in rows[0]["ort"]}
        header = ["stage", "trainable"] + [f"ORT @{b}: measured (est)" for b in ORT_BATCHES] + \
                 [f"% of full @{big}", f"floor @{big}", "measured / floor"] + \
                 ([f"eager @{EAGER_BATCH}"] if "eager" in rows[0] else [])
        table, worst = [], 0.0
        for r in rows:
            cells = [r["stage"], f"{r['trainable_params']:,}"]
            for b in map(str, ORT_BATCHES):
                c = r["ort"][b]
                worst = max(worst, abs(c["estimate_mb"] / c["peak_mb"] - 1))
                cells.append(f"{c['peak_mb']:.1f} ({c['estimate_mb']:.0f})")
            floor = sum(r["floor"].values())
            cells += [f"{100 * r['ort'][big]['peak_mb'] / full[big]:.1f}%", f"{floor:.1f}",
                      f"{r['ort'][big]['peak_mb'] / floor:.2f}"]
            if "eager" in r:
                cells.append(f"{r['eager']['peak_mb']:.1f}")
            table.append(cells)
        grow = [r for r in rows if r["stage"].startswith("grow")]
        largest = max(grow, key=lambda r: r["ort"][big]["peak_mb"])
        fleet = participation(rows)
        headline[s["model"]] = {"largest_stage": largest["stage"], "largest_mb": largest["ort"][big]["peak_mb"],
                                "full_mb": full[big],
                                "fraction_of_full": round(largest["ort"][big]["peak_mb"] / full[big], 3),
                                "worst_estimate_error": round(worst, 3), "fleet": fleet}
        h = headline[s["model"]]
        parts.append(
            f"## {s['model']} (width {s['width']}), {'x'.join(map(str, s['input_shape']))}, SGD momentum 0.9\n\n"
            + md_table(header, table)
            + f"\n- Largest grow stage: {h['largest_stage']} at {h['largest_mb']} MB = "
            f"**{100 * h['fraction_of_full']:.1f}%** of full-model training ({h['full_mb']} MB) at batch {big}.\n"
            f"- Estimate: worst error {100 * worst:.1f}% over every stage and micro-batch.\n"
            f"- Every stage at its smallest micro-batch ({rows[0]['min_micro_batch']}) fits a budget of "
            f"{fleet['smallest_budget_every_stage_mb']} MB "
            f"(peak + {MARGIN:.0%} margin) = **{100 * fleet['as_share_of_full_training']:.1f}%** of full-model "
            f"training's peak. Devices that take part in every stage: {100 * fleet['progfl_fleet_every_stage']:.0f}% "
            f"of progfl's ProFL fleet (per stage: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in
                                                              fleet["progfl_fleet_per_stage"].items())
            + f"), {100 * fleet['authors_fleet_every_stage']:.0f}% of the authors' fleet.\n")
    base = data["after_import_mb"]
    text = ("# Peak memory per stage: measured, estimated, floor\n\nPeak RSS (VmHWM) of a fresh process per cell, "
            "from the engine's import to the update read (the probe's local round: engine loaded, weights received, "
            "frozen outputs cached, 3 steps); in brackets the analytic estimate (exporter/sizing.py). Floor: runtime "
            "+ weights + gradients + one momentum + frozen prefix + the training graph's intermediates "
            "(sizing.floor_mb). 1 MB = 2^20 bytes.\n\n" + "\n".join(parts)
            + "\nAfter import (RSS, MB): " + ", ".join(f"{k} {v}" for k, v in base.items()) + "\n")
    return text, headline


def plot(data: dict[str, Any], path: Path) -> None:
    """Measured peak per stage at each micro-batch, one panel per model, with the floor at the logical batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = data["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = m["rows"]
        x = np.arange(len(rows))
        w = 0.8 / len(ORT_BATCHES)
        for k, b in enumerate(ORT_BATCHES):
            vals = [r["ort"][str(b)]["peak_mb"] for r in rows]
            bars = ax.bar(x + (k - (len(ORT_BATCHES) - 1) / 2) * w, vals, w, label=f"ORT micro-batch {b}")
            ax.bar_label(bars, fmt="%.0f", fontsize=6)
        ax.plot(x, [sum(r["floor"].values()) for r in rows], "k_", ms=18, mew=2, label=f"floor @{max(ORT_BATCHES)}")
        ax.set_xticks(x, [r["stage"] for r in rows], fontsize=8)
        ax.set_ylabel("peak RSS (MB)")
        ax.set_title(f"{m['settings']['model']} width {m['settings']['width']}")
        ax.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default benchmarks/out)")
    ap.add_argument("--quick", action="store_true", help="smoke run: ResNet-18 width 16 only")
    ap.add_argument("--eager-worker", metavar="JSON", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.eager_worker:
        print(json.dumps(eager_worker(json.loads(a.eager_worker))))
        return 0
    out = a.out.resolve()
    suffix = "_quick" if a.quick else ""
    t0 = time.perf_counter()
    data = measure(out, a.quick)
    text, headline = summarize(data)
    data["headline"] = headline
    data["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / f"stage_memory{suffix}.json", data)
    write_text(out / f"stage_memory{suffix}.md", text)
    plot(data, out / f"stage_memory{suffix}.png")
    print()
    print(text)
    print(f"wrote {out}/stage_memory{suffix}.{{json,md,png}} in {data['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
