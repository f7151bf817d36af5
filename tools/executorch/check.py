"""EXPERIMENTAL ExecuTorch backend check (run in a venv with executorch==1.5.1: tools/executorch/setup.sh).

1. Exports a cnn (norm=group, 1x28x28, width 8) and a small vit (3x32x32) with ORT + torch files (export_model), then
   writes each stage's ExecuTorch training program next to them (write_executorch_files) where executorch_refusal
   allows it, and prints the refusal of every other stage.
2. Trains every supported stage through progfl's train_round with ExecuTorchStage and with TorchStage (same weights:
   probe.synthetic_weights; same 40-sample shard, 2 epochs, batch 32 so the shard's tail batch of 8 runs too;
   micro-batch 32 and 12) and compares the weights they return (bound 1e-4) and the round loss.
3. Times one stage of each model at batch 32 in a fresh process per backend (ort, torch, executorch; 1 thread;
   median step time of a 10-step round; peak RSS of the round (PhasePeak) and of the process (VmHWM)).
Writes benchmarks/results/executorch.md; exits 1 when a parity check fails.

    PYTHONPATH=/work/main VENV/bin/python tools/executorch/check.py [--work DIR] [--out FILE] [--no-timing]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BATCH = 32
BOUND = 1e-4
MODELS = {  # name -> build_model kwargs
    "cnn": dict(name="cnn", num_classes=10, input_shape=(1, 28, 28), norm="group", width=8),
    "vit": dict(name="vit", num_classes=10, input_shape=(3, 32, 32), norm="group", width=32, depth=6, heads=1),
}
KINDS = ("grow", "distill", "neulite", "full")
TIMED = {"cnn": "grow-2", "vit": "grow-1"}  # cnn grow-1 is refused (its block's max-pool): grow-2 is its conv stage


def export(work: Path, model_name: str) -> tuple[Path, dict[str, str]]:
    """`export_model` with the ort, torch and executorch backends (reused when present); returns stage -> refusal
    ('' = ExecuTorch trains it), from the export's notes."""
    import torch

    from progfl.exporter import export_model
    from progfl.manifest import DeviceClass, Manifest
    from progfl.models import build_model

    folder = work / model_name
    kw = dict(MODELS[model_name])
    torch.manual_seed(0)
    if not (folder / "manifest.json").exists():
        t0 = time.time()
        export_model(build_model(kw.pop("name"), **kw), folder, [DeviceClass("big", 4096.0)], kinds=KINDS,
                     batch_size=BATCH, measure=False, backends=("ort", "torch", "executorch"), output_module="conv")
        print(f"[{model_name}] export (ort, torch, executorch): {time.time() - t0:.0f} s", flush=True)
    manifest = Manifest.load(folder)
    status = {}
    for s in manifest.stages:
        note = next((n for n in manifest.notes if n.startswith(f"executorch: stage {s.name}:")), "")
        status[s.name] = note.split(": ", 1)[1] if note else ""  # "stage NAME: why"
        if note:
            print(f"[{model_name}] refused: {note}", flush=True)
        assert s.has_backend("executorch") == (not note), s.name
    return folder, status


def parity(folder: Path, stage: str, shard_path: Path, micro: int) -> dict:
    from progfl.device_torch.executorch_backend import ExecuTorchStage
    from progfl.device_runtime.probe import synthetic_weights
    from progfl.device_runtime.shard import Shard
    from progfl.device_torch.torch_backend import TorchStage
    from progfl.device_runtime.trainer import train_round
    from progfl.manifest import Manifest, TrainTask

    manifest = Manifest.load(folder)
    s = manifest.stage(stage)
    out = {}
    with Shard(shard_path) as shard:
        shard.validate(manifest.input_shape, manifest.num_classes)
        for name, cls in (("torch", TorchStage), ("executorch", ExecuTorchStage)):
            task = TrainTask(round=1, stage=s.name, manifest_sha256="", weights=synthetic_weights(manifest, s),
                             lr=0.05, epochs=2, batch_size=BATCH, micro_batch=micro, accum_steps=-(-BATCH // micro),
                             seed=3)
            out[name] = train_round(cls(folder, manifest, s.name), s, task, shard)
    t, e = out["torch"], out["executorch"]
    assert t.weights.keys() == e.weights.keys() == set(s.updated_names)
    moves = [float(np.abs(t.weights[n] - task.weights[n]).max()) for n in t.weights]
    diff = max(float(np.abs(t.weights[n] - e.weights[n]).max()) for n in t.weights)
    return {"max_update": max(moves), "max_abs_diff": diff,
            "loss_diff": abs(t.metrics["loss"] - e.metrics["loss"]), "steps": e.metrics["steps"],
            "min_param_move": min(moves)}


def probe(folder: str, stage: str, batch: int, backend: str, steps: int) -> dict:
    """progfl's own probe round (measure_stage: synthetic shard of batch x (steps + 1), one micro-batch per step) at
    1 thread, plus the whole process's peak and whether ExecuTorch's exporter got imported."""
    from progfl.device_runtime.backend import RuntimeOptions
    from progfl.device_runtime.memory import peak_mb
    from progfl.device_runtime.probe import measure_stage

    r = measure_stage(folder, stage, batch, steps, RuntimeOptions(threads=1), backend)
    return {"stage": r["stage"], "backend": backend, "batch": batch, "step_ms": r["step_ms"],
            "round_peak_mb": r["peak_mb"], "process_vmhwm_mb": round(peak_mb(), 1), "baseline_mb": r["baseline_mb"],
            "executorch_imported": "executorch.extension.training" in sys.modules,
            "exir_imported": "executorch.exir.capture" in sys.modules}


def run_probe(folder: Path, stage: str, backend: str, steps: int = 10) -> dict:
    cmd = [sys.executable, __file__, "--probe", str(folder), stage, str(BATCH), backend, str(steps)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        return {"stage": stage, "backend": backend, "error": f"exit {out.returncode}: "
                + (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version(), "machine": platform.machine()}
    for p in ("torch", "executorch", "onnxruntime-training-cpu", "onnx", "numpy"):
        try:
            out[p] = version(p)
        except Exception:
            out[p] = "-"
    try:
        out["progfl commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "progfl-executorch-check"),
                    help="export folder (reused if present)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "executorch.md"))
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--probe", nargs=5, metavar=("FOLDER", "STAGE", "BATCH", "BACKEND", "STEPS"))
    a = ap.parse_args(argv)
    if a.probe:
        f, st, b, be, n = a.probe
        print(json.dumps(probe(f, st, int(b), be, int(n))))
        return 0
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    rows, failures = [], []
    folders = {}
    for model_name in MODELS:
        folder, status = export(work, model_name)
        folders[model_name] = folder
        from progfl.device_runtime.probe import write_synthetic_shard
        from progfl.manifest import Manifest

        shard = work / f"{model_name}-shard.npz"
        write_synthetic_shard(shard, Manifest.load(folder), 40, seed=1)
        for stage, refusal in status.items():
            if refusal:
                rows.append((model_name, stage, "refused", refusal.split(": ", 1)[1], "", "", "", ""))
                continue
            res = {}
            for micro in (BATCH, 12):
                r = parity(folder, stage, shard, micro)
                res[micro] = r
                ok = r["max_abs_diff"] <= BOUND and r["loss_diff"] <= BOUND and r["min_param_move"] > 0
                print(f"[{model_name}] {stage} micro {micro}: max|dW| {r['max_abs_diff']:.2e} "
                      f"|dloss| {r['loss_diff']:.2e} steps {r['steps']:.0f} {'ok' if ok else 'FAIL'}", flush=True)
                if not ok:
                    failures.append(f"{model_name} {stage} micro {micro}")
            rows.append((model_name, stage, "trained", "", f"{res[BATCH]['max_update']:.1e}",
                         f"{res[BATCH]['max_abs_diff']:.1e} / {res[12]['max_abs_diff']:.1e}",
                         f"{res[BATCH]['loss_diff']:.1e} / {res[12]['loss_diff']:.1e}",
                         "ok" if not any(f.startswith(f"{model_name} {stage} ") for f in failures) else "**FAIL**"))
    timing = []
    if not a.no_timing:
        for model_name, stage in TIMED.items():
            for backend in ("ort", "torch", "executorch"):
                r = run_probe(folders[model_name], stage, backend)
                print(f"[timing] {model_name} {stage} {backend}: {r}", flush=True)
                timing.append((model_name, r))
    write_report(Path(a.out), rows, timing, failures, time.time() - t_start, work)
    print(f"wrote {a.out}; {'parity FAILED: ' + ', '.join(failures) if failures else 'all parity checks passed'}")
    return 1 if failures else 0


def write_report(path: Path, rows, timing, failures, seconds: float, work: Path) -> None:
    v = versions()
    lines = [
        "# ExecuTorch training backend (EXPERIMENTAL): parity, speed, memory",
        "",
        "Written by `tools/executorch/check.py`. Models: cnn (norm=group, 1x28x28, width 8) and vit (3x32x32, width 32, "
        "depth 6, 1 head), 10 classes, conv output modules, SGD (momentum 0.9, weight decay 5e-4), export batch 32.",
        "",
        "## Which stages ExecuTorch 1.5.1 trains, and parity with the torch backend",
        "",
        "Each supported stage: one progfl `train_round` with `ExecuTorchStage` and one with `TorchStage`, same weights "
        "(`probe.synthetic_weights`), same 40-sample shard, 2 epochs, lr 0.05, logical batch 32 (batches of 32 and a "
        "tail of 8). Micro-batch 32 (one program call per step, tail of 8 on the dynamic batch dimension) and 12 "
        f"(micro-batches 12, 12, 8 and 8: gradient sums). Bound: {BOUND:g}.",
        "",
        "| model | stage | ExecuTorch | why not | max abs update of the round (torch, micro 32) | max abs weight diff vs torch (micro 32 / 12) | round loss diff (32 / 12) | parity |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in rows],
        "",
    ]
    if timing:
        lines += [
            "## Step time and peak memory (batch 32, 1 thread, fresh process per row)",
            "",
            "A 10-step round (`train_round`, synthetic shard of 352 samples, micro-batch = batch). Step time: median "
            "over the steps after the first. Round peak: `PhasePeak` (VmHWM reset at the round's start: weights, "
            "features, training). Process peak: VmHWM of the whole process (imports and loading included). cnn grow-1 "
            "is refused on ExecuTorch (max-pool in its trained block), so cnn is timed on grow-2.",
            "",
            "| model | stage | backend | median ms/step | round peak MB | process peak MB | RSS before loading MB | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for model_name, r in timing:
            if "error" in r:
                lines.append(f"| {model_name} | {r['stage']} | {r['backend']} | - | - | - | - | {r['error']} |")
                continue
            note = ""
            if r["backend"] == "executorch":
                note = "exir not imported" if not r["exir_imported"] else "exir imported"
            lines.append(f"| {model_name} | {r['stage']} | {r['backend']} | {r['step_ms']:.1f} | {r['round_peak_mb']:.0f} "
                         f"| {r['process_vmhwm_mb']:.0f} | {r['baseline_mb']:.0f} | {note} |")
        by = {(m, r["backend"]): r for m, r in timing if "error" not in r}
        for m in TIMED:
            if (m, "executorch") in by and (m, "torch") in by:
                lines.append("")
                lines.append(f"{m}: ExecuTorch / torch step time = "
                             f"{by[(m, 'executorch')]['step_ms'] / by[(m, 'torch')]['step_ms']:.0f}x")
        lines.append("")
    lines += [
        "## Result",
        "",
        ("Parity FAILED: " + ", ".join(failures)) if failures else "All parity checks passed.",
        "",
        "## Commands",
        "",
        "```",
        "make executorch-check   # tools/executorch/setup.sh .et-venv, then tools/executorch/check.py in it",
        ".venv/bin/python -m pytest -q tests/test_executorch.py      # main venv, no executorch",
        "```",
        "",
        f"Run time: {seconds / 60:.1f} min.",
        "",
        "## Versions",
        "",
        *[f"- {k}: {val}" for k, val in v.items()],
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
