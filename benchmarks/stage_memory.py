"""Peak memory of each progressive (grow) stage vs full-model training, ONNX Runtime vs PyTorch eager.

Every measurement is a fresh subprocess, its peak the VmHWM after imports were done (reset through
/proc/self/clear_refs), so the after-import RSS of the engine is part of every peak (reported separately):
  ORT:     progfl.device_runtime.probe.run_probe (torch-free: prefix inference session + training Module)
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
from _common import (DEFAULT_OUT, ROOT, STAGES, Settings, ensure_export, md_table, save_figure,  # noqa: E402
                     write_json, write_text)

from progfl.device_runtime.memory import peak_mb, reset_peak, rss_mb  # noqa: E402  (no ORT in it)


def eager_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One stage trained by PyTorch eager in this process; prints nothing, returns peak and step time.

    Imports only torch and progfl.models (progfl.exporter would pull onnx and onnxruntime into the process).
    The process holds only what the stage needs (prefix + trainable part), as the ORT side does: the model's
    other parameters are dropped before the measured phase starts."""
    import ctypes
    import gc

    import numpy as np
    import torch

    from progfl.models import build_model, build_stage, parse_stage_name

    after_import = rss_mb()
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["model"], cfg["num_classes"], tuple(cfg["input_shape"]), width=cfg["width"])
    spec = parse_stage_name(cfg["stage"])
    g = build_stage(model, spec, weight_decay=0.0)  # weight decay lives in torch's optimizer
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
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
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
        _, _, loss = g.train(feats, y)
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


def measure(settings: Settings, out: Path) -> dict[str, Any]:
    from progfl.device_runtime.probe import run_probe
    from progfl.manifest import Manifest

    folder = ensure_export(settings, out)
    manifest = Manifest.load(folder)
    trainable = {s.name: sum(int(__import__("math").prod(p.shape)) for p in s.params if p.trainable)
                 for s in manifest.stages}
    rows: list[dict[str, Any]] = []
    for batch in settings.batches:
        for i, stage in enumerate(STAGES):
            order = ("ort", "torch") if i % 2 == 0 else ("torch", "ort")  # alternate who goes first
            res: dict[str, Any] = {}
            for engine in order:
                t0 = time.perf_counter()
                if engine == "ort":
                    res[engine] = run_probe(folder, stage, batch, steps=settings.steps, threads=settings.threads)
                else:
                    res[engine] = run_eager(settings, stage, batch)
                res[engine]["wall_s"] = round(time.perf_counter() - t0, 1)
            print(f"  {stage:<7} batch {batch:>3}: ORT {res['ort']['peak_mb']:7.1f} MB "
                  f"({res['ort']['step_ms']:7.1f} ms/step)   PyTorch {res['torch']['peak_mb']:7.1f} MB "
                  f"({res['torch']['step_ms']:7.1f} ms/step)", flush=True)
            rows.append({"stage": stage, "batch": batch, "trainable_params": trainable[stage],
                         "ort": res["ort"], "torch": res["torch"]})
    return {"settings": settings.as_dict(), "artifacts": str(folder.relative_to(ROOT) if folder.is_relative_to(ROOT)
                                                             else folder),
            "after_import_mb": import_baselines(), "rows": rows}


def summarize(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Markdown table (peaks and % of full training with the same engine) and the headline ratios."""
    batches = data["settings"]["batches"]
    peak = {(r["stage"], r["batch"], e): r[e]["peak_mb"] for r in data["rows"] for e in ("ort", "torch")}
    params = {r["stage"]: r["trainable_params"] for r in data["rows"]}
    header = ["stage", "trainable params"]
    header += [f"ORT MB @{b}" for b in batches] + [f"PyTorch MB @{b}" for b in batches]
    rows = []
    for s in STAGES:
        row: list[Any] = [s, f"{params[s]:,}"]
        for e in ("ort", "torch"):
            for b in batches:
                v, full = peak[(s, b, e)], peak[("full", b, e)]
                row.append(f"{v:.1f} ({100 * v / full:.1f}%)")
        rows.append(row)
    headline: dict[str, Any] = {}
    grow = [s for s in STAGES if s != "full"]
    for e, label in (("ort", "ORT"), ("torch", "PyTorch")):
        for b in batches:
            largest = max(grow, key=lambda s: peak[(s, b, e)])
            frac = peak[(largest, b, e)] / peak[("full", b, e)]
            headline[f"{label}@{b}"] = {"largest_stage": largest, "peak_mb": peak[(largest, b, e)],
                                        "full_mb": peak[("full", b, e)], "fraction_of_full": round(frac, 3),
                                        "reduction_pct": round(100 * (1 - frac), 1)}
    base = data["after_import_mb"]
    s = data["settings"]
    text = (f"# Peak memory per stage: {s['model']} (width {s['width']}), {'x'.join(map(str, s['input_shape']))}, "
            f"{s['num_classes']} classes, {s['steps']} steps, {s['threads']} threads, SGD momentum\n\n"
            "Peak RSS (VmHWM) of a fresh process per cell, after-import RSS included; in brackets: % of full-model "
            "training with the same engine at the same batch.\n\n" + md_table(header, rows) +
            "\nAfter import (RSS, MB): " + ", ".join(f"{k} {v}" for k, v in base.items()) + "\n\n"
            "Largest grow stage vs full-model training:\n\n" +
            "".join(f"- {k}: {v['largest_stage']} {v['peak_mb']} MB vs full {v['full_mb']} MB = "
                    f"{100 * v['fraction_of_full']:.1f}% ({v['reduction_pct']:.1f}% less)\n" for k, v in headline.items()))
    return text, headline


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    batches = data["settings"]["batches"]
    peak = {(r["stage"], r["batch"], e): r[e]["peak_mb"] for r in data["rows"] for e in ("ort", "torch")}
    series = [(e, b) for e in ("ort", "torch") for b in batches]
    colors = ["#1f77b4", "#6baed6", "#d62728", "#fc9272"]
    x = np.arange(len(STAGES))
    w = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for k, (e, b) in enumerate(series):
        vals = [peak[(s, b, e)] for s in STAGES]
        bars = ax.bar(x + (k - (len(series) - 1) / 2) * w, vals, w, color=colors[k % 4],
                      label=f"{'ORT' if e == 'ort' else 'PyTorch'} batch {b}")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    base = data["after_import_mb"]
    for name, style in (("python+ort (progfl runtime, torch-free)", "#1f77b4"), ("python+torch (progfl.models)", "#d62728")):
        ax.axhline(base[name], ls="--", lw=1, color=style, label=f"after import: {name.split(' (')[0]}")
    ax.set_xticks(x, STAGES)
    ax.set_ylabel("peak RSS (MB)")
    s = data["settings"]
    ax.set_title(f"Peak memory per stage, {s['model']} width {s['width']}, {'x'.join(map(str, s['input_shape']))}")
    ax.legend(fontsize=8, ncol=2)
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default benchmarks/out)")
    ap.add_argument("--quick", action="store_true", help="smoke run: width 16, batches 8 and 16, 2 steps")
    ap.add_argument("--eager-worker", metavar="JSON", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.eager_worker:
        print(json.dumps(eager_worker(json.loads(a.eager_worker))))
        return 0
    settings = Settings.make(a.quick)
    out = a.out.resolve()
    suffix = "_quick" if a.quick else ""
    t0 = time.perf_counter()
    data = measure(settings, out)
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
