"""progfl's command line: one click group. User mistakes end with one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

import click

from .manifest import ManifestError

if TYPE_CHECKING:
    from .server.simulation import SimConfig


def user_errors(fn):
    """Turn the errors a user can cause (bad names, shapes, paths, files) into one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, ManifestError, OSError) as e:  # OSError: paths and permissions the user gave
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:  # a run's checkpoint is written whole before this lands (rounds.interrupts_deferred)
            click.echo("\ninterrupted: a run keeps its last complete checkpoint; continue it with --resume", err=True)
            sys.exit(130)

    return wrapper


def _ints(value: str, what: str, count: int | None = None) -> list[int]:
    """Comma-separated positive integers (exactly `count` of them if given)."""
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1 or (count is not None and len(values) != count):
        n = f"{count} " if count else ""
        raise ValueError(f"{what} must be {n}comma-separated positive integers, got {value!r}")
    return values


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="progfl")
def main() -> None:
    """Progressive block-wise federated learning for memory-limited devices."""


@main.command()
@click.option("--model", "model_name", default="resnet18", show_default=True,
              help="Zoo model (resnet18, resnet34, vgg11, cnn, vit) or 'module:function' returning an nn.Sequential of blocks.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder (new or empty).")
@click.option("--num-classes", default=10, show_default=True)
@click.option("--input-shape", default="3,32,32", show_default=True, help="C,H,W of one sample.")
@click.option("--norm", type=click.Choice(["batch", "group"]), default="batch", show_default=True)
@click.option("--width", type=int, default=None, help="Base width (channels; ViT: token dim). Default: the model's.")
@click.option("--stages", default="grow,distill,full", show_default=True, help="Stage kinds: grow, distill, neulite, full, width (the width baselines' sub-models), depth (DepthFL's depth-1..T).")
@click.option("--opset", default=17, show_default=True, help="ONNX opset, 17..21.")
@click.option("--batch", "batch_size", default=32, show_default=True, help="Logical batch size per step.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--momentum", default=0.9, show_default=True)
@click.option("--weight-decay", default=5e-4, show_default=True)
@click.option("--devices", type=click.Path(dir_okay=False), default=None, help="JSON list of {name, memory_mb}; default: the shipped sample.")
@click.option("--margin", default=0.15, show_default=True, help="Safety margin under each budget.")
@click.option("--neulite-l1", default=0.1, show_default=True, help="NeuLite input term; block t gets l1*(T-t)/T.")
@click.option("--neulite-l2", default=0.1, show_default=True, help="NeuLite label term; block t gets l2*(t+1)/T.")
@click.option("--measure/--no-measure", default=True, show_default=True, help="Measure peaks in a fresh subprocess per stage and backend.")
@click.option("--measure-batches", default=None, help="Micro-batch sizes to measure (default: batch/4 and batch).")
@click.option("--seed", default=0, show_default=True, help="Seed of the initial weights.")
@click.option("--output-module", type=click.Choice(["auto", "conv", "light", "linear"]), default="auto",
              show_default=True, help="Basic layers of the output modules. auto: the default kind, or a cheaper one when "
                                      "a stage would train more parameters or peak higher than full-model training.")
@click.option("--backends", default="ort,torch", show_default=True,
              help="Device backends to write files for: ort (always), torch (TorchScript, for ARM boards), executorch "
                   "(experimental: .pte programs for the stages ExecuTorch 1.5.1 trains correctly; needs torch).")
@click.option("--explain", is_flag=True, help="Print the memory and device-sizing table.")
@click.option("--breakdown", is_flag=True, help="Print the table and where each stage's memory goes, phase by phase, next "
                                                "to the estimate and the analytic floor.")
@user_errors
def export(model_name, out, num_classes, input_shape, norm, width, stages, opset, batch_size, optimizer, momentum,
           weight_decay, devices, margin, neulite_l1, neulite_l2, measure, measure_batches, seed, explain, breakdown,
           output_module, backends) -> None:
    """Compile every stage of a model into on-device training files (ONNX Runtime; TorchScript for torch boards),
    sized to device memory."""
    from pathlib import Path

    from .exporter import OptimizerConfig, check_backends, check_output_folder, explain as explain_table, export_model
    from .exporter.explain import breakdown as breakdown_table
    from .exporter.sizing import load_device_classes
    from .models import NeuLiteWeights, load_model

    check_output_folder(Path(out))  # before the model is built: fail fast on the cheapest mistake
    if num_classes < 1 or (width is not None and width < 1):
        raise ValueError(f"--num-classes and --width must be >= 1, got {num_classes} and {width}")
    for name, value in (("--weight-decay", weight_decay), ("--neulite-l1", neulite_l1), ("--neulite-l2", neulite_l2)):
        if not 0 <= value < float("inf"):  # NaN fails too
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    classes = load_device_classes(devices)
    check_backends(tuple(b.strip() for b in backends.split(",") if b.strip()), classes,
                   OptimizerConfig(optimizer, momentum, weight_decay))
    model = load_model(model_name, num_classes, tuple(_ints(input_shape, "--input-shape (C,H,W)", 3)), norm, width, seed)
    manifest = export_model(
        model, out, classes, kinds=tuple(k.strip() for k in stages.split(",") if k.strip()), opset=opset,
        batch_size=batch_size, optimizer=OptimizerConfig(optimizer, momentum, weight_decay), safety_margin=margin,
        neulite=NeuLiteWeights(neulite_l1, neulite_l2),
        measure=measure, measure_batches=_ints(measure_batches, "--measure-batches") if measure_batches else None,
        progress=lambda m: click.echo(m, err=True), output_module=output_module,
        backends=tuple(b.strip() for b in backends.split(",") if b.strip()))
    if explain or breakdown:
        click.echo(explain_table(manifest))
        if breakdown:
            click.echo(breakdown_table(manifest))
    click.echo(f"wrote {len(manifest.stages)} stages to {out}", err=True)


@main.command("explain")
@click.argument("artifacts", type=click.Path(file_okay=False))
@click.option("--breakdown", is_flag=True, help="Also where each stage's memory goes, phase by phase.")
@user_errors
def explain_cmd(artifacts, breakdown) -> None:
    """Print an exported folder's memory and device-sizing table."""
    from .exporter.explain import breakdown as breakdown_table, explain as explain_table
    from .manifest import Manifest

    manifest = Manifest.load(artifacts)
    click.echo(explain_table(manifest))
    if breakdown:
        click.echo(breakdown_table(manifest))


def _sim_options(fn):
    for opt in reversed([
        click.option("--artifacts", type=click.Path(file_okay=False), required=True, help="Exported folder."),
        click.option("--dataset", default="mnist5k", show_default=True,
                     help="mnist5k, digits, animal-mnist (offline) or cifar10, cifar100, femnist (with --data-path)."),
        click.option("--data-path", default=None, help="Folder of a user-provided dataset."),
        click.option("--partition", type=click.Choice(["iid", "dirichlet", "label-dirichlet", "shards"]), default="iid",
                     show_default=True, help="dirichlet: each class split by Dir(alpha), sizes vary; label-dirichlet: "
                     "equal sizes, each device's label mix from Dir(alpha); shards: 2 label shards a device."),
        click.option("--alpha", default=0.5, show_default=True, help="Dirichlet concentration."),
        click.option("--devices", type=int, default=None, help="Number of devices [default: 20, or the --fleet's length]."),
        click.option("--per-round", default=5, show_default=True),
        click.option("--rounds", default=30, show_default=True,
                     help="Round budget: a run trains exactly this many rounds (the plan's last phase takes what is left) "
                          "unless it diverges."),
        click.option("--epochs", default=5, show_default=True, help="Local epochs per round (ProFL's authors: 5)."),
        click.option("--lr", default=0.01, show_default=True,
                     help="SGD learning rate (ProFL's authors: 0.01; momentum and weight decay are set at export)."),
        click.option("--seed", default=0, show_default=True),
        click.option("--workers", default=2, show_default=True, help="Worker processes running devices."),
        click.option("--full-share", default=0.08, show_default=True, help="Share of devices that hold full training."),
        click.option("--fleet", "fleet_file", type=click.Path(dir_okay=False), default=None,
                     help="JSON list of device budgets in MB (one per device) instead of ProFL's fleet."),
        click.option("--target", type=float, default=None, help="Target accuracy for rounds/time-to-target."),
        click.option("--deadline", type=float, default=None,
                     help="Seconds of (simulated) device time a round waits for a device: a later update is dropped "
                          "and logged as late [default: no deadline]."),
        click.option("--speed-spread", default=0.5, show_default=True,
                     help="Simulated device speeds: lognormal factors with this sigma, from the seed; 0: all equal."),
        click.option("--sample-seconds", default=0.005, show_default=True,
                     help="Simulated seconds of one sample-epoch of the largest stage on the median device."),
        click.option("--pace", "pace", multiple=True,
                     help=f"Pace setting KEY=VALUE, repeatable: {', '.join(_pace_keys())}."),
        click.option("--option", "options", multiple=True,
                     help=f"Plan option KEY=VALUE, repeatable: {_option_keys()}."),
        click.option("--max-rejected-rounds", default=3, show_default=True,
                     help="Stop with an error once this many rounds in a row had no update accepted; 0: never."),
        click.option("--outlier-k", default=10.0, show_default=True,
                     help="Drop an update farther from the global weights than k x the round's median distance; 0: never."),
    ]):
        fn = opt(fn)
    return fn


def _kv(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    """KEY=VALUE pairs as strings: their types are the settings' own (progfl.server.settings)."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} must be KEY=VALUE, got {p!r}")
        out[key.strip()] = value.strip()
    return out


def _sim_config(plan, out, kw) -> SimConfig:
    import json
    from pathlib import Path

    from .server.simulation import SimConfig

    kw = dict(kw)
    kw["pace"], kw["options"] = _kv(kw.pop("pace"), "--pace"), _kv(kw.pop("options"), "--option")
    fleet_file = kw.pop("fleet_file")
    if fleet_file:
        try:
            fleet = json.loads(Path(fleet_file).read_text())
            kw["fleet"] = [float(b) for b in fleet]
        except (ValueError, TypeError) as e:
            raise ValueError(f"{fleet_file}: not a JSON list of budgets in MB ({e})") from None
        if kw["devices"] is None:
            kw["devices"] = len(kw["fleet"])
    if kw["devices"] is None:
        kw["devices"] = 20
    return SimConfig(plan=plan, out=out, **kw)


def _pace_keys() -> list[str]:
    from .server.pace import PaceConfig
    from .server.settings import known_keys

    return known_keys(PaceConfig)


def _option_keys() -> str:
    from .server.plans import PLANS
    from .server.settings import known_keys

    return "; ".join(f"{name}: {', '.join(known_keys(p.Options))}" for name, p in PLANS.items() if known_keys(p.Options))


@main.command()
@click.option("--plan", default="profl", show_default=True,
              help="profl, neulite, smartfreeze, fedavg, exclusive; width-scaled (export --stages width): heterofl, fedrolex, allsmall; depth-scaled (--stages depth): depthfl.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue a stopped run from its checkpoint.")
@click.option("--engine", type=click.Choice(["progfl", "flower"]), default="progfl", show_default=True,
              help="progfl: local worker processes; flower: Flower's simulation engine (Ray), needs progfl[flower].")
@_sim_options
@user_errors
def simulate(plan, out, resume, engine, **kw) -> None:
    """Run one plan on N virtual devices with the real device runtime; writes history, report and plots."""
    cfg = _sim_config(plan, out, kw)
    if engine == "flower":
        from .server.flower_sim import run_flower_simulation

        run = run_flower_simulation(cfg, resume=resume)
    else:
        from .server.simulation import run_simulation

        run = run_simulation(cfg, resume=resume)
    click.echo(f"report: {run / 'report.md'}")


@main.command()
@click.option("--plans", default="profl,exclusive,fedavg", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder: one run per plan + report.")
@_sim_options
@user_errors
def compare(plans, out, **kw) -> None:
    """Several plans on the same seed, data and fleet; one table. A plan that diverges stops alone: the others
    still run, the table shows its rounds, and the command exits 2 naming it."""
    from pathlib import Path

    from .server.divergence import Diverged
    from .server.report import compare_table, load_history, write_report
    from .server.rounds import check_new_run_folder
    from .server.simulation import run_simulation

    names = [p.strip() for p in plans.split(",") if p.strip()]
    if not names:
        raise ValueError(f"--plans names no plan, got {plans!r}")
    configs = [_sim_config(p, str(Path(out) / p), kw) for p in names]
    for cfg in configs:  # every setting of every plan, and every run folder, checked before any run
        cfg.check()
        check_new_run_folder(Path(cfg.out))
    runs, diverged = [], []
    for name, cfg in zip(names, configs):
        try:
            runs.append(run_simulation(cfg))
        except Diverged as e:
            diverged.append(f"{name}: {e}")
            runs.append(Path(cfg.out))
    report = write_report(runs, Path(out), kw.get("target"))
    click.echo(compare_table([load_history(r) for r in runs], kw.get("target")))
    click.echo(f"report: {report}")
    if diverged:
        raise Diverged(" | ".join(diverged))


DEMO_PACE = ("window=3", "slope_window=3", "min_rounds=3", "max_rounds=6", "slope_threshold=0.05", "em_threshold=0.5")


DEMO_EXPORT = dict(model_name="resnet18", num_classes=10, input_shape="1,28,28", width=8, stages="grow,distill,full",
                   measure_batches="1,8,32")


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True)
@click.option("--rounds", default=40, show_default=True)
@click.option("--partition", type=click.Choice(["iid", "label-dirichlet", "dirichlet"]), default="label-dirichlet",
              show_default=True, help="label-dirichlet: 200 samples a device, label mixes from Dirichlet(0.5).")
@user_errors
def demo(out, rounds, partition) -> None:
    """The main job: ProFL vs ExclusiveFL vs FedAvg on MNIST-5k, a small ResNet-18, 20 devices (~7 min on 2 cores).

    Every plan runs with the papers' settings (SGD lr 0.01, momentum 0.9, weight decay 5e-4, 5 local epochs, batch
    32), 200 samples a device, 5 devices a round, on the same seed, data and memory fleet."""
    from pathlib import Path

    from .manifest import Manifest, ManifestError

    art = Path(out) / "artifacts"
    try:
        m = Manifest.load(art)
        m.verify_files(art)
        if "output_module" not in m.model_config or m.model_config.get("width") != 8:
            raise ManifestError("made by an older progfl")  # before output modules had kinds
        click.echo(f"reusing {art}", err=True)
    except ManifestError:
        import shutil

        shutil.rmtree(art, ignore_errors=True)
        art.parent.mkdir(parents=True, exist_ok=True)
        click.get_current_context().invoke(export, out=str(art), **DEMO_EXPORT)
    runs = Path(out) / f"compare-{partition}"
    if runs.exists():
        import shutil

        shutil.rmtree(runs)  # a demo starts over; `progfl compare` never deletes
    click.get_current_context().invoke(compare, plans="profl,exclusive,fedavg", out=str(runs), artifacts=str(art),
                                       dataset="mnist5k", partition=partition, devices=20, per_round=5,
                                       rounds=rounds, target=0.8, pace=DEMO_PACE)
    click.echo(f"plots: {runs}/accuracy.png {runs}/em.png {runs}/memory.png")


@main.group()
def device() -> None:
    """On the device: train a stage on local data, profile peak memory (ONNX Runtime without torch, or torch)."""


def _backend_option(fn):
    return click.option("--backend", type=click.Choice(["auto", "ort", "torch", "executorch"]), default="auto",
                        show_default=True, help="auto: ONNX Runtime training where installed, else torch (ARM "
                                                "boards); executorch: experimental, only when asked for.")(fn)


@device.command("train")
@click.option("--artifacts", type=click.Path(file_okay=False), required=True, help="Exported folder (manifest.json).")
@click.option("--stage", required=True, help="Stage index or name (grow-1, full, ...).")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), required=True,
              help="Shard: .npz with x (float32 N,C,H,W, normalised) and y (int labels); see the README.")
@click.option("--budget-mb", type=float, default=None, help="Memory budget: sizes micro-batches, refuses what cannot fit.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help=".npz of global arrays (default: initial).")
@click.option("--lr", default=0.01, show_default=True)
@click.option("--epochs", default=5, show_default=True, help="Local epochs (the papers' 5, as the server's default).")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=0, show_default=True, help="Intra-op threads (0: one per core).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None, help="Frozen-prefix feature cache folder.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the updated arrays to this .npz.")
@_backend_option
@user_errors
def device_train(artifacts, stage, data_path, budget_mb, weights, lr, epochs, seed, threads, cache_dir, out,
                 backend) -> None:
    """Train one stage locally and print the update's metrics as JSON."""
    import json
    from pathlib import Path

    from .device_runtime.backend import RuntimeOptions
    from .device_runtime.device import Device
    from .device_runtime.shard import Shard, open_npz
    from .manifest import TrainTask, write_atomic

    if not lr > 0:  # NaN fails too
        raise ValueError(f"--lr must be > 0, got {lr}")
    shard = Shard(data_path, scratch=cache_dir)
    dev = Device(artifacts, shard, budget_mb, RuntimeOptions(threads=threads), cache_dir, backend)
    s = dev.manifest.stage(stage)
    micro, accum = dev.plan(s.name)
    arrays = open_npz(Path(weights)) if weights else dev.manifest.initial_weights(artifacts)
    task = TrainTask(round=0, stage=s.name, manifest_sha256=dev.manifest_sha256,
                     weights={p.name: arrays[p.name] for p in s.needed(dev.manifest) if p.name in arrays},
                     lr=lr, epochs=epochs, batch_size=dev.manifest.batch_size, micro_batch=micro,
                     accum_steps=accum, seed=seed, budget_mb=budget_mb)
    update = dev.train(task)
    if out:
        import io

        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, **update.weights)
        write_atomic(out, buf.getvalue())
    click.echo(json.dumps({"stage": s.name, "backend": dev.backend_name, "micro_batch": micro, "accum_steps": accum,
                           "num_samples": update.num_samples, **update.metrics}))
    if update.metrics.get("over_budget"):
        click.echo(f"warning: peak {update.metrics['peak_mb']:g} MB went over the {budget_mb:g} MB budget", err=True)


@device.command("profile")
@click.option("--artifacts", type=click.Path(file_okay=False), required=True)
@click.option("--batches", default="1,8,32", show_default=True, help="Micro-batch sizes to measure (two or more).")
@click.option("--steps", default=3, show_default=True, help="Timed training steps per measurement.")
@click.option("--threads", default=0, show_default=True)
@click.option("--stages", "only", default=None, help="Comma-separated stage names (default: every stage).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Profile JSON: feed it to `progfl apply-profile` on the server to size this board's class by it.")
@_backend_option
@user_errors
def device_profile(artifacts, batches, steps, threads, only, out, backend) -> None:
    """Measure every stage's peak memory and step time on this machine (run it on the Pi or Jetson)."""
    import importlib.metadata
    import json
    import os
    import platform

    from .device_runtime.backend import resolve_backend
    from .device_runtime.probe import make_profile, run_probe
    from .manifest import Manifest, write_atomic

    manifest = Manifest.load(artifacts)
    backend = resolve_backend(backend, manifest)
    manifest.verify_files(artifacts, backend=backend)
    sizes = _ints(batches, "--batches")
    if steps < 1:  # a ValueError, not click's usage error: one line, like every other user mistake
        raise ValueError(f"--steps must be >= 1, got {steps}")
    stages = [manifest.stage(n.strip()) for n in only.split(",")] if only else manifest.stages
    stages = [s for s in stages if s.has_backend(backend)]  # executorch: the stages it can train
    rows = []
    for s in stages:
        for b in sizes:
            r = run_probe(artifacts, s.name, b, steps, threads, backend)
            rows.append(r)
            click.echo(f"{s.name:<12} {backend} batch {b:>3}: peak {r['peak_mb']:7.1f} MB  step {r['step_ms']:8.1f} ms")
    engine = {"ort": "onnxruntime-training-cpu", "torch": "torch", "executorch": "executorch"}[backend]
    try:
        engine_version = importlib.metadata.version(engine)
    except importlib.metadata.PackageNotFoundError:  # a source build of the engine
        engine_version = "unknown"
    host = {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "threads": threads, "engine": f"{engine} {engine_version}"}
    if out:
        write_atomic(out, json.dumps(make_profile(manifest, backend, rows, host), indent=1).encode())
        click.echo(f"wrote {out}", err=True)


@main.command("apply-profile")
@click.argument("artifacts", type=click.Path(file_okay=False))
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--device-class", "class_name", required=True, help="The class this board stands for (new: give --memory-mb).")
@click.option("--memory-mb", type=float, default=None, help="The class's memory budget in MB (MiB).")
@user_errors
def apply_profile_cmd(artifacts, profile, class_name, memory_mb) -> None:
    """Size a device class by a board's `device profile` peaks instead of the exporter machine's (rewrites the manifest:
    devices then need the new manifest.json)."""
    from .exporter.profile import apply_profile_file

    click.echo(apply_profile_file(artifacts, profile, class_name, memory_mb))


if __name__ == "__main__":
    main()
