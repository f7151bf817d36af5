"""Time per training step of each stage, ONNX Runtime (OrtStage) vs PyTorch eager (EagerStage), side by side.

Both engines run in this one process, interleaved step by step (the order alternates), with the same weights,
data and thread count; medians after warm-up. The machine is shared, so only ratios measured side by side mean
something. Then: the frozen-prefix feature cache (a later round of grow-3 with the cache filled vs without),
and ORT settings tried against the ORT/eager gap (threads, graph optimization, allocator, session config),
with ORT's own profiler and torch's profiler to see where the time goes.

    python benchmarks/device_step.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DEFAULT_OUT, STAGES, Settings, build, ensure_export, md_table, save_figure,  # noqa: E402
                     write_json, write_text)

# onnxruntime's training API must be imported through progfl's shim before anything else imports onnxruntime
import progfl.device_runtime.ort_backend as ort_backend  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from progfl.device_runtime.backend import RuntimeOptions  # noqa: E402
from progfl.device_runtime.ort_backend import OrtStage  # noqa: E402
from progfl.device_runtime.probe import synthetic_weights  # noqa: E402
from progfl.exporter.eager import EagerStage  # noqa: E402
from progfl.manifest import Manifest  # noqa: E402
from progfl.models import parse_stage_name  # noqa: E402

# --- session options from outside progfl: wrap its session_options() to add config entries / profiling ---
_EXTRA: dict[str, Any] = {"config": {}, "profile": None}
_original_session_options = ort_backend.session_options


def _patched_session_options(opts: RuntimeOptions, shared_arena: bool = True):
    so = _original_session_options(opts, shared_arena)
    for k, v in _EXTRA["config"].items():
        so.add_session_config_entry(k, v)
    if _EXTRA["profile"]:
        so.enable_profiling = True
        so.profile_file_prefix = _EXTRA["profile"]
    return so


ort_backend.session_options = _patched_session_options


@dataclass
class Variant:
    """One ORT configuration tried against eager at the same thread count."""

    name: str
    threads: int = 2
    graph_optimization: str = "all"
    low_memory: bool = True
    config: dict[str, str] = field(default_factory=dict)

    def options(self) -> RuntimeOptions:
        return RuntimeOptions(threads=self.threads, low_memory=self.low_memory,
                              graph_optimization=self.graph_optimization)


VARIANTS = [
    Variant("default (2 threads, opt all, low_memory)"),
    Variant("intra-op 1 thread (eager 1 thread)", threads=1),
    Variant("graph opt extended", graph_optimization="extended"),
    Variant("graph opt basic", graph_optimization="basic"),
    Variant("graph opt disabled", graph_optimization="disabled"),
    Variant("low_memory False (default arena)", low_memory=False),
    Variant("no spinning (allow_spinning=0)", config={"session.intra_op.allow_spinning": "0"}),
    Variant("default again (end of run: load drift check)"),
]


class Pair:
    """The same stage in both engines with the same weights; step() runs prefix + fwd/bwd + optimizer step."""

    def __init__(self, folder: Path, manifest: Manifest, settings: Settings, stage: str, variant: Variant):
        self.stage = manifest.stage(stage)
        _EXTRA["config"] = dict(variant.config)
        try:
            self.ort = OrtStage(folder, manifest, stage, variant.options(), verify=False)
        finally:
            _EXTRA["config"] = {}
        self.eager = EagerStage(build(settings), parse_stage_name(stage), threads=variant.threads)
        torch.set_num_threads(variant.threads)
        w = synthetic_weights(manifest, self.stage)
        self.ort.set_weights(w)
        self.eager.set_weights(w)

    @staticmethod
    def step(backend: OrtStage | EagerStage, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """One training step; seconds per part (prefix, forward+backward, optimizer step)."""
        t0 = time.perf_counter()
        feats = backend.features(x)
        t1 = time.perf_counter()
        backend.accumulate({"features": feats, "inputs": x, "labels": y})
        t2 = time.perf_counter()
        backend.step(0.01)
        t3 = time.perf_counter()
        return {"prefix": t1 - t0, "fwd_bwd": t2 - t1, "opt": t3 - t2, "total": t3 - t0}


def interleaved(pair: Pair, batch: int, shape: tuple[int, ...], classes: int, warmup: int, reps: int
                ) -> dict[str, dict[str, float]]:
    """Alternate ORT and eager steps (order flips every repetition); medians (ms) of the timed ones."""
    rng = np.random.default_rng(1)
    times: dict[str, list[dict[str, float]]] = {"ort": [], "eager": []}
    for i in range(warmup + reps):
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        y = rng.integers(0, classes, batch).astype(np.int64)
        order = ("ort", "eager") if i % 2 == 0 else ("eager", "ort")
        for e in order:
            t = Pair.step(getattr(pair, e), x, y)
            if i >= warmup:
                times[e].append(t)
    res: dict[str, Any] = {e: {k: round(1000 * statistics.median(t[k] for t in ts), 2) for k in ts[0]}
                           for e, ts in times.items()}
    # steps of one repetition ran back to back under the same machine load: their ratio is the robust number
    res["paired_ratios"] = [round(o["total"] / e["total"], 3) for o, e in zip(times["ort"], times["eager"])]
    # the fastest step of each engine is the one least disturbed by other processes
    res["min_ms"] = {e: round(1000 * min(t["total"] for t in ts), 2) for e, ts in times.items()}
    return res


def stage_steps(folder: Path, manifest: Manifest, settings: Settings, batch: int, warmup: int, reps: int,
                stages: list[str], variant: Variant, log: Callable[[str], None]) -> dict[str, Any]:
    res = {}
    for s in stages:
        pair = Pair(folder, manifest, settings, s, variant)
        r = interleaved(pair, batch, settings.input_shape, settings.num_classes, warmup, reps)
        r["ratio"] = round(statistics.median(r["paired_ratios"]), 3)
        r["ratio_of_medians"] = round(r["ort"]["total"] / r["eager"]["total"], 3)
        r["ratio_of_mins"] = round(r["min_ms"]["ort"] / r["min_ms"]["eager"], 3)
        r["loadavg_1min"] = round(os.getloadavg()[0], 2)
        res[s] = r
        log(f"  [{variant.name}] {s:<7}: ORT {r['ort']['total']:8.1f} ms  eager {r['eager']['total']:8.1f} ms"
            f"  ratio {r['ratio']:.2f} (load {r['loadavg_1min']})   (ORT prefix/fwd+bwd/opt {r['ort']['prefix']:.1f}/{r['ort']['fwd_bwd']:.1f}/"
            f"{r['ort']['opt']:.1f}, eager {r['eager']['prefix']:.1f}/{r['eager']['fwd_bwd']:.1f}/{r['eager']['opt']:.1f})")
        del pair
    return res


def feature_cache(folder: Path, manifest: Manifest, stage: str, samples: int, batch: int, reps: int,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """A later local round with the prefix features already cached vs the same round computing them."""
    from progfl.device_runtime.cache import FeatureCache
    from progfl.device_runtime.probe import write_synthetic_shard
    from progfl.device_runtime.shard import Shard
    from progfl.device_runtime.trainer import train_round
    from progfl.manifest import TrainTask

    s = manifest.stage(stage)
    weights = synthetic_weights(manifest, s)

    def task() -> TrainTask:  # a round consumes its task's weights
        return TrainTask(round=1, stage=stage, manifest_sha256="", weights=dict(weights), lr=0.01, epochs=1,
                         batch_size=batch, micro_batch=batch, accum_steps=1, seed=0)

    backend = OrtStage(folder, manifest, stage, RuntimeOptions(threads=2), verify=False)
    times: dict[str, list[float]] = {"no_cache": [], "cached": []}
    with tempfile.TemporaryDirectory() as d:
        write_synthetic_shard(Path(d) / "shard.npz", manifest, samples, seed=2)
        shard = Shard(Path(d) / "shard.npz")
        shard.validate(manifest.input_shape, manifest.num_classes)
        cache = FeatureCache(Path(d) / "cache")
        t0 = time.perf_counter()
        first = train_round(backend, s, task(), shard, cache)  # fills the cache (an earlier round of this stage)
        fill_s = time.perf_counter() - t0
        for i in range(reps):
            order = ("no_cache", "cached") if i % 2 == 0 else ("cached", "no_cache")
            for k in order:
                t0 = time.perf_counter()
                train_round(backend, s, task(), shard, cache if k == "cached" else None)
                times[k].append(time.perf_counter() - t0)
        hits = cache.hits
        shard.close()
    res = {"stage": stage, "samples": samples, "batch": batch, "steps": int(first.metrics["steps"]),
           "fill_round_s": round(fill_s, 3), "no_cache_s": round(statistics.median(times["no_cache"]), 3),
           "cached_s": round(statistics.median(times["cached"]), 3), "cache_hits": hits,
           "all_no_cache_s": [round(t, 3) for t in times["no_cache"]], "all_cached_s": [round(t, 3) for t in times["cached"]]}
    res["speedup"] = round(res["no_cache_s"] / res["cached_s"], 2)
    log(f"  feature cache {stage}: round without cache {res['no_cache_s']:.2f} s, with cache {res['cached_s']:.2f} s "
        f"-> {res['speedup']:.2f}x (first round, filling: {res['fill_round_s']:.2f} s)")
    return res


def ort_profile(folder: Path, manifest: Manifest, stage: str, batch: int, out: Path, steps: int = 3) -> dict[str, Any]:
    """ORT's profiler on the training session: time per op type over `steps` steps (after one warm-up)."""
    prof_dir = Path(tempfile.mkdtemp(prefix="ortprof-", dir=out))
    _EXTRA["profile"] = str(prof_dir / f"ort-{stage}")
    try:
        b = OrtStage(folder, manifest, stage, RuntimeOptions(threads=2), verify=False)
    finally:
        _EXTRA["profile"] = None
    b.set_weights(synthetic_weights(manifest, manifest.stage(stage)))
    rng = np.random.default_rng(3)
    for _ in range(steps + 1):
        x = rng.standard_normal((batch, *manifest.input_shape)).astype(np.float32)
        y = rng.integers(0, manifest.num_classes, batch).astype(np.int64)
        Pair.step(b, x, y)
    del b  # the training session writes its profile when it is destroyed
    import gc

    gc.collect()
    by_op: dict[str, float] = defaultdict(float)
    files = sorted(prof_dir.glob("*.json"))
    for f in files:
        events = []  # one event per line; sessions sharing a prefix may interleave a file, so parse line by line
        for line in f.read_text().splitlines():
            try:
                events.append(json.loads(line.strip().rstrip(",")))
            except json.JSONDecodeError:
                pass
        for ev in events:
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                by_op[ev["args"].get("op_name", "?")] += ev["dur"] / 1000.0
    total = sum(by_op.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:15]
    import shutil

    shutil.rmtree(prof_dir, ignore_errors=True)
    return {"stage": stage, "files": len(files), "kernel_ms_per_step": round(total / max(steps + 1, 1), 1),
            "top_ops_pct": {k: round(100 * v / total, 1) for k, v in top} if total else {},
            "top_ops_ms_per_step": {k: round(v / (steps + 1), 1) for k, v in top}}


def torch_profile(settings: Settings, manifest: Manifest, stage: str, batch: int, steps: int = 3) -> dict[str, Any]:
    """torch.profiler on EagerStage: self CPU time per aten op."""
    from torch.profiler import ProfilerActivity, profile

    e = EagerStage(build(settings), parse_stage_name(stage), threads=2)
    e.set_weights(synthetic_weights(manifest, manifest.stage(stage)))
    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((batch, *manifest.input_shape)).astype(np.float32),
                rng.integers(0, manifest.num_classes, batch).astype(np.int64)) for _ in range(steps + 1)]
    Pair.step(e, *batches[0])
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for x, y in batches[1:]:
            Pair.step(e, x, y)
    ka = [(k.key, k.self_cpu_time_total / 1000.0) for k in p.key_averages()]
    total = sum(v for _, v in ka)
    top = sorted(ka, key=lambda kv: -kv[1])[:15]
    return {"stage": stage, "self_cpu_ms_per_step": round(total / steps, 1),
            "top_ops_pct": {k: round(100 * v / total, 1) for k, v in top},
            "top_ops_ms_per_step": {k: round(v / steps, 1) for k, v in top}}


def peaks(settings: Settings, out: Path, batch: int, stages: list[str], folder: Path, log) -> dict[str, Any]:
    """Peak RSS per stage at this batch: from stage_memory's JSON when it measured the same settings, else measured."""
    src = out / ("stage_memory_quick.json" if settings.width != 64 else "stage_memory.json")
    if src.exists():
        key = ("model", "width", "num_classes", "threads")
        for m in json.loads(src.read_text())["models"]:
            rows = {r["stage"]: r for r in m["rows"] if str(batch) in r["ort"] and "eager" in r}
            if all(m["settings"][k] == getattr(settings, k) for k in key) and all(s in rows for s in stages):
                log(f"  peak RSS from {src.name}")
                return {"source": src.name, **{s: {"ort_mb": rows[s]["ort"][str(batch)]["peak_mb"],
                                                   "eager_mb": rows[s]["eager"]["peak_mb"]} for s in stages}}
    import stage_memory
    from progfl.device_runtime.probe import run_probe

    res: dict[str, Any] = {"source": "measured here (fresh subprocess per cell)"}
    for s in stages:
        o = run_probe(folder, s, batch, steps=settings.steps, threads=settings.threads)
        e = stage_memory.run_eager(settings, s, batch)
        res[s] = {"ort_mb": o["peak_mb"], "eager_mb": e["peak_mb"]}
        log(f"  peak {s}: ORT {o['peak_mb']} MB, eager {e['peak_mb']} MB")
    return res


def report(data: dict[str, Any]) -> str:
    b = data["batch"]
    main_rows = []
    for s in STAGES:
        r, p = data["steps"][s], data["peak_rss"][s]
        main_rows.append([s, r["ort"]["total"], r["eager"]["total"], f"{r['ratio']:.2f}", f"{r['ratio_of_mins']:.2f}",
                          r["loadavg_1min"],
                          f"{r['ort']['prefix']:.1f} / {r['ort']['fwd_bwd']:.1f} / {r['ort']['opt']:.1f}",
                          f"{r['eager']['prefix']:.1f} / {r['eager']['fwd_bwd']:.1f} / {r['eager']['opt']:.1f}",
                          p["ort_mb"], p["eager_mb"]])
    text = (f"# Training step per stage: ORT vs PyTorch eager ({data['settings']['model']} width "
            f"{data['settings']['width']}, batch {b}, 2 threads, interleaved, median of {data['reps']} steps after "
            f"{data['warmup']} warm-up)\n\n" +
            md_table(["stage", "ORT ms/step", "eager ms/step", "ORT/eager (median of paired)", "ORT/eager (fastest steps)", "load avg", "ORT prefix / fwd+bwd / opt ms",
                      "eager prefix / fwd+bwd / opt ms", "ORT peak MB", "eager peak MB"], main_rows))
    text += (f"\nPeak RSS source: {data['peak_rss']['source']}. Load average: 1-minute load of this shared 2-core "
             "machine when the row finished (another engineer's tests ran at the same time; above ~2 both engines' "
             "2-thread pools are oversubscribed and the times, and even the ratios, swing).\n")
    fc = data["feature_cache"]
    text += (f"\nFeature cache ({fc['stage']}, {fc['samples']} samples, {fc['steps']} steps of {fc['batch']}, ORT): "
             f"a later round takes {fc['cached_s']:.2f} s with the cache filled vs {fc['no_cache_s']:.2f} s without "
             f"= **{fc['speedup']:.2f}x** (the round that fills it: {fc['fill_round_s']:.2f} s).\n")
    vstages = data["variant_stages"]
    vrows = []
    for name, res in data["variants"].items():
        row: list[Any] = [name]
        for s in vstages:
            row += [f"{res[s]['ort']['total']:.1f} / {res[s]['eager']['total']:.1f}",
                    f"{res[s]['ratio']:.2f} ({res[s]['ratio_of_mins']:.2f})"]
        row.append(max(res[s]["loadavg_1min"] for s in vstages))
        vrows.append(row)
    header = ["ORT setting"] + [h for s in vstages for h in (f"{s} ORT / eager ms", f"{s} ratio (fastest steps)")] + ["load avg"]
    text += ("\n## ORT settings vs the gap (each row: fresh sessions, interleaved with eager at the same threads; "
             "ratio = median of paired step ratios)\n\n")
    text += md_table(header, vrows)
    for prof in ("ort_profile", "torch_profile"):
        for p in data.get(prof, []):
            ops = ", ".join(f"{k} {v}%" for k, v in list(p["top_ops_pct"].items())[:6])
            text += f"\n{'ORT' if prof == 'ort_profile' else 'torch'} profile {p['stage']}: {ops}"
    text += "\n\n## Why\n\n" + data["why"] + "\n"
    return text


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1, 1.3]})
    x = np.arange(len(STAGES))
    for k, (e, label, col) in enumerate((("ort", "ORT", "#1f77b4"), ("eager", "PyTorch eager", "#d62728"))):
        bottom = np.zeros(len(STAGES))
        for part, alpha in (("prefix", 0.35), ("fwd_bwd", 1.0), ("opt", 0.6)):
            vals = np.array([data["steps"][s][e][part] for s in STAGES])
            a1.bar(x + (k - 0.5) * 0.4, vals, 0.4, bottom=bottom, color=col, alpha=alpha,
                   label=f"{label} {part}")
            bottom += vals
        for i, s in enumerate(STAGES):
            if e == "ort":
                a1.text(x[i] - 0.2, bottom[i], f"{data['steps'][s]['ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
    a1.set_xticks(x, STAGES)
    a1.set_ylabel("ms per step (median)")
    a1.set_title(f"step time, batch {data['batch']} (label: ORT/eager)")
    a1.legend(fontsize=7, ncol=2)
    names = list(data["variants"])
    vs = data["variant_stages"]
    y = np.arange(len(names))
    h = 0.8 / len(vs)
    for k, s in enumerate(vs):
        a2.barh(y + (k - (len(vs) - 1) / 2) * h, [data["variants"][n][s]["ratio"] for n in names], h, label=s)
    a2.axvline(1.0, color="k", lw=1, ls="--")
    a2.set_yticks(y, names, fontsize=8)
    a2.invert_yaxis()
    a2.set_xlabel("ORT / eager time per step (1 = parity)")
    a2.set_title("ORT settings vs the gap")
    a2.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def why(data: dict[str, Any]) -> str:
    """The explanation paragraph, written from the numbers measured in this run."""
    st = data["steps"]
    parts = []
    ratios = ", ".join(f"{s} {st[s]['ratio']:.2f}x" for s in STAGES)
    parts.append(f"ORT/eager time per step at batch {data['batch']}: {ratios}.")
    fb = ", ".join(f"{s} {st[s]['ort']['fwd_bwd'] / st[s]['eager']['fwd_bwd']:.2f}x" for s in STAGES)
    pre = ", ".join(f"{s} {st[s]['ort']['prefix'] / max(st[s]['eager']['prefix'], 1e-3):.2f}x"
                    for s in STAGES if st[s]["eager"]["prefix"] > 0.05)
    opt = ", ".join(f"{s} {st[s]['ort']['opt']:.1f}/{st[s]['eager']['opt']:.1f} ms" for s in STAGES)
    parts.append(f"By part, forward+backward of the trainable part ORT/eager: {fb}; frozen prefix (inference "
                 f"session vs torch no_grad): {pre}; optimizer step ORT/eager: {opt}.")
    for p in data.get("ort_profile", []):
        ops = ", ".join(f"{k} {v}%" for k, v in list(p["top_ops_pct"].items())[:4])
        parts.append(f"ORT's profiler ({p['stage']} training session, kernel time): {ops}.")
    for p in data.get("torch_profile", []):
        ops = ", ".join(f"{k} {v}%" for k, v in list(p["top_ops_pct"].items())[:4])
        parts.append(f"torch's profiler ({p['stage']}, self CPU): {ops}.")
    pairs = [("ConvGrad", ["aten::convolution_backward"]), ("Conv", ["aten::mkldnn_convolution"]),
             ("ReluGrad", ["aten::threshold_backward"]),
             ("BatchNormInternal+BatchNormalizationGrad", ["aten::native_batch_norm", "aten::native_batch_norm_backward"])]
    for po, pt in zip(data.get("ort_profile", []), data.get("torch_profile", [])):
        om, tm = po["top_ops_ms_per_step"], pt["top_ops_ms_per_step"]
        cmp = []
        for o, t in pairs:
            ov = sum(om.get(k, 0.0) for k in o.split("+"))
            tv = sum(tm.get(k, 0.0) for k in t)
            if ov and tv:
                cmp.append(f"{o} {ov:.0f} ms vs {'+'.join(t)} {tv:.0f} ms ({ov / tv:.1f}x)")
        parts.append(f"Per kernel per step, {po['stage']} (ORT kernel time incl. warm-up step vs torch self CPU): "
                     + "; ".join(cmp) + ".")
    vs = data["variant_stages"]
    base = data["variants"][VARIANTS[0].name]
    best = []
    for n, res in data["variants"].items():
        best.append((n, statistics.mean(res[s]["ratio"] for s in vs)))
    parts.append("Max 1-minute load average during the settings rows: "
                 f"{max(res[s]['loadavg_1min'] for res in data['variants'].values() for s in vs):.1f}.")
    parts.append("Settings (mean ORT/eager over " + ", ".join(vs) + ", median of paired [fastest steps]): " +
                 "; ".join(f"{n} {r:.2f}x [{statistics.mean(data['variants'][n][s]['ratio_of_mins'] for s in vs):.2f}x]"
                           for n, r in best) +
                 f" (default {statistics.mean(base[s]['ratio'] for s in vs):.2f}x).")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default benchmarks/out)")
    ap.add_argument("--quick", action="store_true", help="smoke run: width 16, batch 8, fewer steps")
    ap.add_argument("--no-profile", action="store_true", help="skip the ORT and torch profilers")
    a = ap.parse_args(argv)
    settings = Settings.make(a.quick)
    batch = settings.batches[0]
    warmup, reps = (1, 5) if a.quick else (2, 7)
    vreps = 5
    out = a.out.resolve()
    suffix = "_quick" if a.quick else ""
    log = lambda m: print(m, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    folder = ensure_export(settings, out, log)
    manifest = Manifest.load(folder)
    data: dict[str, Any] = {"settings": settings.as_dict(), "batch": batch, "warmup": warmup, "reps": reps,
                            "torch_version": torch.__version__, "ort_version": ort_backend.onnxruntime.__version__}
    log("step time per stage (default ORT options, 2 threads):")
    data["steps"] = stage_steps(folder, manifest, settings, batch, warmup, reps, STAGES, VARIANTS[0], log)
    log("peak RSS:")
    data["peak_rss"] = peaks(settings, out, batch, STAGES, folder, log)
    log("feature cache:")
    samples = 64 if a.quick else 256
    data["feature_cache"] = feature_cache(folder, manifest, "grow-3", samples, batch, 3, log)
    data["variant_stages"] = ["grow-0", "full"]
    log("ORT settings:")
    data["variants"] = {}
    for v in VARIANTS:
        data["variants"][v.name] = stage_steps(folder, manifest, settings, batch, 1, vreps, data["variant_stages"], v, log)
        data["variants"][v.name]["config"] = {"threads": v.threads, "graph_optimization": v.graph_optimization,
                                              "low_memory": v.low_memory, "session_config": v.config}
    if not a.no_profile:
        log("profiles:")
        data["ort_profile"] = [ort_profile(folder, manifest, s, batch, out) for s in ("grow-0", "full")]
        data["torch_profile"] = [torch_profile(settings, manifest, s, batch) for s in ("grow-0", "full")]
        for p in data["ort_profile"] + data["torch_profile"]:
            log(f"  {p}")
    data["why"] = why(data)
    data["seconds"] = round(time.perf_counter() - t_start, 1)
    text = report(data)
    write_json(out / f"device_step{suffix}.json", data)
    write_text(out / f"device_step{suffix}.md", text)
    plot(data, out / f"device_step{suffix}.png")
    print()
    print(text)
    print(f"wrote {out}/device_step{suffix}.{{json,md,png}} in {data['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
