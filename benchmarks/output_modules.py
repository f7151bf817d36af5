"""Which basic layer should output modules use? linear (ProFL's), conv, or light, measured on two models.

For each kind of basic layer:
  (a) accuracy: block 1 (stage grow-0) trained centrally with torch eager through its output module (MNIST-5k,
      SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 32, 300 steps), test accuracy over 3 seeds; the full
      model trained the same way for reference;
  (b) memory: measured peak MB (torch-free probe, VmHWM, 1 MB = 2^20 bytes) of every grow stage and of full at
      micro-batch 32, from an ONNX Runtime export;
  (c) trainable parameters per stage;
  (d) accuracy per MB: grow-0's test accuracy per 100 MB of its peak.
Models: ResNet-18 width 8 (1x28x28), and a depthwise-separable CNN (blocks of depthwise 3x3 + pointwise 1x1 + BN +
ReLU, widths 16/32/64), the case the cheap kind is for. The export here skips the exporter's rule (so the kinds that
break it can be measured too) and reports whether each kind passes it.

Because 300 steps is short (2.4 epochs) and seeds spread widely there, grow-0 of the ResNet is also trained for
--long-steps (1500, 12 epochs) with the same settings.

    python benchmarks/output_modules.py [--steps 300] [--long-steps 1500] [--seeds 0,1,2] [--threads 2]

Writes benchmarks/results/output_modules.{json,md} after every cell (5 min 47 s wall on 2 shared cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, md_table, write_json, write_text  # noqa: E402

from progfl.data import load_dataset  # noqa: E402
from progfl.exporter import OptimizerConfig  # noqa: E402
from progfl.exporter import output_module as om  # noqa: E402
from progfl.exporter.eager import EagerStage  # noqa: E402
from progfl.exporter.export import compile_all  # noqa: E402
from progfl.exporter.sizing import fill_memory  # noqa: E402
from progfl.manifest import DeviceClass  # noqa: E402
from progfl.models import NeuLiteWeights, StageSpec, build_model, default_stages, from_sequential  # noqa: E402
from progfl.models.examples import depthwise_separable  # noqa: E402

KINDS = ("linear", "conv", "light")
RESULTS = ROOT / "benchmarks" / "results"


MODELS = {
    "resnet18-w8": ("ResNet-18, width 8", lambda: build_model("resnet18", 10, (1, 28, 28), width=8)),
    "dwsep-16-32-64": ("depthwise-separable CNN, widths 16/32/64",
                       lambda: from_sequential(depthwise_separable(), (1, 28, 28), 10, name="dwsep")),
}


def make(key: str, kind: str | None, seed: int):
    torch.manual_seed(seed)
    model = MODELS[key][1]()
    return model.set_output_modules(kind) if kind else model


# ---- (a) accuracy ----

def train_accuracy(key: str, kind: str | None, stage: str, seed: int, steps: int, data) -> float:
    """Train `stage` (grow-0 through the output module of `kind`, or full) centrally; test accuracy."""
    (train, test) = data
    model = make(key, kind or om.DEFAULT_OUTPUT_MODULE, seed)
    spec = StageSpec("full", 0) if stage == "full" else StageSpec("grow", 0)
    eager = EagerStage(model, spec, OptimizerConfig("sgd", momentum=0.9, weight_decay=5e-4))
    rng = np.random.default_rng(seed)
    order = np.array([], np.int64)
    for _ in range(steps):
        if len(order) < 32:
            order = np.concatenate([order, rng.permutation(len(train))])
        idx, order = order[:32], order[32:]
        eager.accumulate({"features": train.x[idx], "labels": train.y[idx]})
        eager.step(0.01)
    correct = sum(int((eager.predict(test.x[i:i + 250]).argmax(1) == test.y[i:i + 250]).sum())
                  for i in range(0, len(test), 250))
    return correct / len(test)


# ---- (b, c) memory and parameters ----

def measure(key: str, kind: str, batch: int) -> dict[str, Any]:
    """Export grow-* and full with `kind` (the exporter's own steps, its rule not applied), probe every stage."""
    model = make(key, kind, 0)
    specs = default_stages(model.T, ("grow", "full"))
    with tempfile.TemporaryDirectory(prefix="progfl-om-") as tmp:
        manifest = compile_all(model, specs, Path(tmp), 17, batch, 0.15, [DeviceClass("bench", 1 << 20)],
                               OptimizerConfig(), NeuLiteWeights(), lambda m: None)
        fill_memory(manifest, Path(tmp), [batch], True)
    stages = {s.name: {"trainable": int(s.footprint["trainable"]), "peak_mb": s.memory[0].measured_mb}
              for s in manifest.stages}
    param_breaks = om.parameter_breaks(model, specs, kind)
    peak_breaks = om.peak_breaks(manifest)
    return {"stages": stages, "rule_breaks": [b.describe() for b in param_breaks + peak_breaks]}


# ---- report ----

def summary(accs: list[float]) -> dict[str, Any]:
    if not accs:
        return {}
    return {"mean": statistics.fmean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "min": min(accs), "max": max(accs), "n": len(accs), "values": accs}


def fmt_acc(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['sd']:.3f} ({s['min']:.3f}-{s['max']:.3f})" if s else "…"


def fmt_n(n: int) -> str:
    return f"{n / 1e3:.1f}k" if n < 1e6 else f"{n / 1e6:.2f}M"


def markdown(res: dict) -> str:
    cfg = res["settings"]
    out = ["# Output modules: linear vs conv vs light basic layers\n",
           f"MNIST-5k (4,000 train / 1,000 test), grow-0 and full trained centrally with torch eager: SGD lr "
           f"{cfg['lr']}, momentum 0.9, weight decay 5e-4, batch 32, {cfg['steps']} steps, seeds {cfg['seeds']}. "
           f"Peaks: ONNX Runtime export, torch-free probe per stage, micro-batch {cfg['batch']}, 1 MB = 2^20 bytes. "
           f"Rule: no grow stage trains more parameters or peaks higher than full-model training.\n"]
    for key, m in res["models"].items():
        out.append(f"## {MODELS[key][0]}\n")
        rows = []
        long = m.get("accuracy_long", {})
        for kind in KINDS:
            acc, mem = m["accuracy"].get(kind, {}), m["memory"].get(kind)
            peak = mem["stages"]["grow-0"]["peak_mb"] if mem else None
            per = f"{100 * acc['mean'] / peak:.2f}" if acc and peak else "…"
            rule = "…"
            if mem:
                rule = "breaks: " + "; ".join(mem["rule_breaks"][:2]) if mem["rule_breaks"] else "passes"
            rows.append([kind, fmt_acc(acc), *([fmt_acc(long.get(kind, {}))] if long else []),
                         f"{peak:.1f}" if peak else "…", per, rule])
        acc, full_mem = m["accuracy"].get("full", {}), next(iter(m["memory"].values()), None)
        peak = full_mem["stages"]["full"]["peak_mb"] if full_mem else None
        rows.append(["full model", fmt_acc(acc), *(["not run"] if long else []), f"{peak:.1f}" if peak else "…",
                     f"{100 * acc['mean'] / peak:.2f}" if acc and peak else "…", ""])
        head = [f"grow-0 test accuracy, {cfg['steps']} steps (mean ± sd, min-max)",
                *([f"grow-0, {cfg['long_steps']} steps"] if long else [])]
        out.append(md_table(["output module", *head, "grow-0 peak MB", f"accuracy ({cfg['steps']} steps) per 100 MB",
                             "rule"], rows))
        stages = next((list(v["stages"]) for v in m["memory"].values()), [])
        rows = [[kind, *(f"{fmt_n(v['stages'][s]['trainable'])} / {v['stages'][s]['peak_mb']:.1f}" for s in stages)]
                for kind, v in m["memory"].items()]
        if rows:
            out.append("\nTrainable parameters / measured peak MB per stage:\n")
            out.append(md_table(["output module", *stages], rows))
        out.append("")
    return "\n".join(out)


def save(res: dict) -> None:
    write_json(RESULTS / "output_modules.json", res)
    write_text(RESULTS / "output_modules.md", markdown(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--long-steps", type=int, default=1500, help="0: skip the longer grow-0 runs")
    ap.add_argument("--long-models", default="resnet18-w8")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    data = load_dataset("mnist5k")
    res: dict[str, Any] = {"settings": {"steps": a.steps, "long_steps": a.long_steps, "seeds": seeds,
                                        "batch": a.batch, "lr": 0.01,
                                        "threads": a.threads, "default_output_module": om.DEFAULT_OUTPUT_MODULE},
                           "models": {}}
    t_all = time.perf_counter()
    for key in a.models.split(","):
        m = res["models"][key] = {"accuracy": {}, "memory": {}}
        for kind in KINDS:
            t0 = time.perf_counter()
            m["memory"][kind] = measure(key, kind, a.batch)
            save(res)
            print(f"{key} {kind}: memory {m['memory'][kind]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for kind in (*KINDS, "full"):
            accs = []
            for seed in seeds:
                t0 = time.perf_counter()
                stage = "full" if kind == "full" else "grow-0"
                accs.append(train_accuracy(key, None if kind == "full" else kind, stage, seed, a.steps, data))
                m["accuracy"][kind] = summary(accs)
                save(res)
                print(f"{key} {kind} seed {seed}: accuracy {accs[-1]:.3f} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
        if a.long_steps and key in a.long_models.split(","):
            m["accuracy_long"] = {}
            for kind in KINDS:
                accs = []
                for seed in seeds:
                    t0 = time.perf_counter()
                    accs.append(train_accuracy(key, kind, "grow-0", seed, a.long_steps, data))
                    m["accuracy_long"][kind] = summary(accs)
                    save(res)
                    print(f"{key} {kind} seed {seed}, {a.long_steps} steps: accuracy {accs[-1]:.3f} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    res["settings"]["seconds"] = round(time.perf_counter() - t_all)
    save(res)
    print(markdown(res))


if __name__ == "__main__":
    main()
