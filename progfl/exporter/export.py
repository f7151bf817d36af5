"""`progfl export`: every stage of a model into one folder, with manifest, memory table and device sizing.

The folder is built under a temporary name beside the target and renamed into place at the end: a failed or
interrupted export leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..manifest import DeviceClass, Manifest, ParamSpec, file_ref
from ..models.base import BlockModel
from ..models.stages import NeuLiteWeights, default_stages
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
) -> Manifest:
    out = Path(out)
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} is not supported: use {OPSETS.start}..{OPSETS.stop - 1}")
    if batch_size < 1 or not 0 <= safety_margin < 1:
        raise ExportError("batch size must be >= 1 and the safety margin in [0, 1)")
    check_output_folder(out)
    specs = default_stages(model.T, kinds)
    optimizer, neulite = optimizer or OptimizerConfig(), neulite or NeuLiteWeights()
    batches = sorted(set(measure_batches or [max(1, batch_size // 4), batch_size]))
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        raise ExportError(f"{out.parent}: not writable ({e.strerror})") from None
    try:
        stages = []
        for i, spec in enumerate(specs):
            if progress:
                progress(f"compiling stage {i} {spec.name}")
            stages.append(compile_stage(model, spec, i, tmp, opset, optimizer, neulite))
        manifest = Manifest(
            model=model.name, model_config=model.config, input_shape=list(model.input_shape),
            num_classes=model.num_classes, opset=opset, batch_size=batch_size, safety_margin=safety_margin,
            stages=stages, device_classes=device_classes,
            global_params=[ParamSpec(n, list(t.shape), not n.endswith(("running_mean", "running_var")))
                           for n, t in model.state_dict().items() if not n.endswith("num_batches_tracked")],
        )
        init = tmp / "initial.npz"
        np.savez(init, **{p.name: model.state_dict()[p.name].numpy() for p in manifest.global_params})
        manifest.initial = file_ref(tmp, init)
        manifest.save(tmp)  # the probe reads it
        fill_memory(manifest, tmp, batches, measure, progress)
        fill_sizing(manifest)
        for c in device_classes:
            if not any(s.sizing_for(c.name).fits for s in manifest.stages):
                need = min(s.sizing_for(c.name).peak_mb for s in manifest.stages)
                raise ExportError(f"device class {c.name} ({c.memory_mb:g} MB) is below the smallest stage "
                                  f"({need:g} MB at micro-batch 1 plus a {safety_margin:.0%} margin)")
        manifest.save(tmp)
        if out.exists():
            out.rmdir()  # checked empty above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
