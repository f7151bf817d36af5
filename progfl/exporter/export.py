"""`progfl export`: every stage of a model into one folder, with manifest, memory table and device sizing.

The folder is built under a temporary name beside the target and renamed into place at the end: a failed or
interrupted export leaves nothing behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..manifest import BACKENDS, EXECUTORCH_PIN, DeviceClass, Manifest, ParamSpec, file_ref
from ..models.base import BlockModel
from ..models.stages import NeuLiteWeights, StageSpec, default_stages
from ..models.width import sliced_axes, width_model
from . import output_module as om
from .compile import OPSETS, OptimizerConfig, compile_stage
from .sizing import fill_memory, fill_sizing


class ExportError(ValueError):
    """A user mistake in what to export or where."""


def check_output_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: output folder exists and is not empty")
    parent = out.parent if out.parent != Path("") else Path(".")
    if not parent.is_dir():
        raise ExportError(f"{parent}: parent folder does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"{parent}: not writable")


def export_model(
    model: BlockModel,
    out: str | os.PathLike,
    device_classes: list[DeviceClass],
    kinds: tuple[str, ...] = ("grow", "distill", "full"),
    opset: int = 17,
    batch_size: int = 32,
    optimizer: OptimizerConfig | None = None,
    neulite: NeuLiteWeights | None = None,
    safety_margin: float = 0.15,
    measure: bool = True,
    measure_batches: list[int] | None = None,
    progress: Callable[[str], None] | None = None,
    output_module: str = "auto",
    backends: tuple[str, ...] = ("ort", "torch"),
) -> Manifest:
    """Export every stage of `model` into `out`. output_module: linear, conv, light, or auto (see output_module.py):
    the kind of basic layer the output modules use. The model's basic layers are switched (freshly initialised) in
    place when the chosen kind differs from its own; the manifest records the kind and why it was chosen.
    backends: ort (always: the server evaluates with it), torch (TorchScript files for boards without ONNX Runtime
    training; their peaks measured with torch) and executorch (EXPERIMENTAL: ExecuTorch programs for the stages it
    trains correctly, the others named in the notes; needs torch's files and executorch installed)."""
    out = Path(out)
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} is not supported: use {OPSETS.start}..{OPSETS.stop - 1}")
    if batch_size < 1 or not 0 <= safety_margin < 1:
        raise ExportError("batch size must be >= 1 and the safety margin in [0, 1)")
    if output_module not in om.CHOICES:
        raise ExportError(f"unknown output module {output_module!r}: use {', '.join(om.CHOICES)}")
    optimizer, neulite = optimizer or OptimizerConfig(), neulite or NeuLiteWeights()
    backends = check_backends(backends, device_classes, optimizer)
    check_output_folder(out)
    specs = default_stages(model.T, kinds)
    batches = sorted(set(measure_batches or [max(1, batch_size // 4), batch_size]))
    say = progress or (lambda _m: None)
    choice, fits = choose_by_parameters(model, specs, output_module)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    own = model.basics, dict(model.config)  # put back if the export fails
    try:
        while True:
            _fresh_folder(tmp)
            say(f"output module: {choice.kind}")
            model.set_output_modules(choice.kind)
            manifest = compile_all(model, specs, tmp, opset, batch_size, safety_margin, device_classes,
                                   optimizer, neulite, say, backends)
            fill_memory(manifest, tmp, batches, measure, progress, backends)
            if not recheck_peaks(choice, fits, manifest):
                break
            say(f"output module {choice.tried[-1][0]} breaks the peak rule "
                f"({choice.tried[-1][1][0].describe()}): exporting again with {choice.kind}")
        manifest.notes = choice.notes(model, specs, manifest, measure) + manifest.notes  # + executorch refusals
        for line in manifest.notes:
            say(line)
        fill_sizing(manifest)
        check_device_classes(manifest)
        manifest.save(tmp)
        if out.exists():
            out.rmdir()  # checked empty above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        model.basics, model.config = own
        raise
    return manifest


def check_backends(backends: tuple[str, ...], device_classes: list[DeviceClass],
                   optimizer: OptimizerConfig | None = None) -> tuple[str, ...]:
    """ort always (the server evaluates with it); torch and executorch on request (executorch runs its frozen parts
    from torch's files, has SGD only, and must be installed here to write its programs); every device class's backend
    among them."""
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ExportError(f"unknown backend(s) {sorted(unknown)}: use {', '.join(BACKENDS)}")
    if "ort" not in backends:
        raise ExportError("backends must include ort: the server evaluates every stage with ONNX Runtime")
    if "executorch" in backends:
        if "torch" not in backends:
            raise ExportError("the executorch backend runs the frozen prefix from torch's files: use --backends "
                              "ort,torch,executorch")
        if optimizer is not None and optimizer.name != "sgd":
            raise ExportError(f"the executorch backend has SGD only (ExecuTorch {EXECUTORCH_PIN}): use --optimizer sgd")
        if importlib.util.find_spec("executorch") is None:
            raise ExportError(f"writing ExecuTorch programs needs ExecuTorch here: pip install executorch=={EXECUTORCH_PIN}")
    for c in device_classes:
        if c.backend not in backends:
            raise ExportError(f"device class {c.name} trains with {c.backend}, which is not among the backends "
                              f"exported ({', '.join(backends)})")
    return tuple(b for b in BACKENDS if b in backends)


def choose_by_parameters(model: BlockModel, specs: list[StageSpec], requested: str) -> tuple[om.Choice, list[str]]:
    """The first candidate kind whose grow/neulite stages train at most full-model training's parameters, and every
    kind that passes that count (for fallbacks and suggestions). Refuses when the candidates all break it."""
    breaks = {k: om.parameter_breaks(model, specs, k) for k in om.OUTPUT_MODULES}
    fits = [k for k in om.OUTPUT_MODULES if not breaks[k]]
    tried = []
    for kind in om.candidates(requested):
        if not breaks[kind]:
            return om.Choice(requested, kind, tried), fits
        tried.append((kind, breaks[kind]))
    raise ExportError(om.refuse(requested, tried, fits))


def recheck_peaks(choice: om.Choice, fits: list[str], manifest: Manifest) -> bool:
    """After measuring: True when `choice` moved on to the next kind (its stages peak above full's and `auto` has one
    left that passes the parameter count); refuses when none is left. False: the kind stands."""
    breaks = om.peak_breaks(manifest)
    if not breaks:
        return False
    choice.tried.append((choice.kind, breaks))
    later = [k for k in om.candidates(choice.requested) if k in fits and k not in {t for t, _ in choice.tried}]
    if not later:
        raise ExportError(om.refuse(choice.requested, choice.tried, [k for k in fits if k != choice.kind]))
    choice.kind = later[0]
    return True


def _fresh_folder(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        raise ExportError(f"{tmp.parent}: not writable ({e.strerror})") from None


def compile_all(model: BlockModel, specs: list[StageSpec], tmp: Path, opset: int, batch_size: int,
                safety_margin: float, device_classes: list[DeviceClass], optimizer: OptimizerConfig,
                neulite: NeuLiteWeights, say: Callable[[str], None], backends: tuple[str, ...] = ("ort",)) -> Manifest:
    """Every stage compiled into `tmp`, the manifest and the initial weights written (the probe reads them). A width
    stage is compiled from the sub-model (models/width.py), its arrays recorded as slices of the global ones."""
    stages, notes = [], []
    shapes = {n: list(t.shape) for n, t in model.state_dict().items()}
    for i, spec in enumerate(specs):
        say(f"compiling stage {i} {spec.name}")
        source = _width_model(model, spec.block) if spec.kind == "width" else model
        stage = compile_stage(source, spec, i, tmp, opset, optimizer, neulite, backends=backends,
                              max_batch=batch_size, notes=notes)
        if spec.kind == "width":
            stage.slices = sliced_axes(shapes, {p.name: p.shape for p in stage.params})
        stages.append(stage)
    manifest = Manifest(
        model=model.name, model_config=dict(model.config), input_shape=list(model.input_shape),
        num_classes=model.num_classes, opset=opset, batch_size=batch_size, safety_margin=safety_margin,
        stages=stages, device_classes=device_classes, notes=notes,
        global_params=[ParamSpec(n, list(t.shape), not n.endswith(("running_mean", "running_var")))
                       for n, t in model.state_dict().items() if not n.endswith("num_batches_tracked")],
    )
    init = tmp / "initial.npz"
    np.savez(init, **{p.name: model.state_dict()[p.name].numpy() for p in manifest.global_params})
    manifest.initial = file_ref(tmp, init)
    manifest.save(tmp)
    return manifest


def _width_model(model: BlockModel, divisor: int) -> BlockModel:
    try:
        return width_model(model, divisor)
    except ValueError as e:
        raise ExportError(str(e)) from None


def check_device_classes(manifest: Manifest) -> None:
    for c in manifest.device_classes:
        if not any(s.sizing_for(c.name).fits for s in manifest.stages):
            peaks = [s.sizing_for(c.name).peak_mb for s in manifest.stages if s.has_backend(c.backend)]
            if not peaks:
                raise ExportError(f"device class {c.name} trains with {c.backend}, which can train no stage of this "
                                  "model (see the notes)")
            need = min(peaks)
            raise ExportError(f"device class {c.name} ({c.memory_mb:g} MB, {c.backend}) is below the smallest stage "
                              f"({need:g} MB at micro-batch 1 plus a {manifest.safety_margin:.0%} margin)")
