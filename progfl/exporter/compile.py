"""Compile one stage: torch graphs -> ONNX -> ONNX Runtime training artifacts, with the 1.19.2 fixes applied, and
(for the torch backend) the same graphs as TorchScript files (torch_files.py).

Artifacts are compiled once per stage. Every file keeps the global parameter names as initializer names,
so a device sets the round's weights by name (prefix: session initializers; trainable part: the flat
buffer in the order recorded in the manifest).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from ..manifest import ParamSpec, Stage, TensorSpec, file_ref
from ..models.base import BlockModel
from ..models.stages import NeuLiteWeights, StageGraphs, StageSpec, build_stage
from ..device_runtime.trainer import FROZEN_CHUNK
from .fixes import cap_ir_file, cap_ir_version, expose_bn_statistics, initializer_names, weights_as_inputs
from .executorch_files import executorch_refusal, write_executorch_files
from .liveness import GraphLiveness
from .torch_files import write_torch_files

OPSETS = range(17, 22)  # generate_artifacts refuses 22+; older opsets lack ops the graphs use


@dataclass
class OptimizerConfig:
    """SGD with momentum and coupled weight decay (the papers), or AdamW with torch's semantics.

    SGD has no optimizer graph: ORT's SGD lacks momentum and weight decay, and its AdamW kernel would keep two moments
    where SGD needs one, so the device runtime applies torch's SGD step to ORT's buffers itself
    (device_runtime/buffer_sgd.py). AdamW runs on ORT's kernel (optimizer_model.onnx)."""

    name: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adamw"):
            raise ValueError(f"unknown optimizer {self.name!r}: use sgd or adamw")
        if not 0 <= self.momentum < 1:
            raise ValueError("momentum must be in [0, 1)")

    def block(self):
        """ORT's optimizer graph: AdamW's (SGD has none)."""
        from onnxruntime.training import onnxblock

        if self.name == "sgd":
            return None
        return onnxblock.optim.AdamW(bias_correction=True, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    def record(self) -> dict:
        return {"name": self.name, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "betas": list(self.betas), "eps": self.eps}


def _export(module: torch.nn.Module, args: tuple, inputs: list[str], outputs: list[str], path: Path,
            opset: int, training: bool) -> onnx.ModelProto:
    """torch's legacy exporter: keeps parameter names and trainable BatchNorm (the dynamo one folds BN away)."""
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    module.train(training)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=inputs, output_names=outputs, opset_version=opset,
            training=mode, do_constant_folding=False, dynamo=False,
            dynamic_axes={n: {0: "batch"} for n in inputs + outputs[:2] if n != "loss_scale"},
        )
    model = onnx.load(str(path))
    return model


def _distinct_copy(model: BlockModel) -> BlockModel:
    """A copy whose arrays all hold distinct values. torch's exporter merges initializers of equal value (fresh
    BatchNorms: all ones, all zeros) behind Identity nodes, and their global names vanish from the file; the
    values themselves do not matter, weights travel every round. The copy also spares the caller's BatchNorm
    statistics, which a training-mode export moves."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) * 0.1 + 0.95)
    return model


def _weights_as_inputs(path: Path, shapes: dict[str, list[int]]) -> list[str]:
    model = onnx.load(str(path))
    names = weights_as_inputs(model, set(shapes))
    onnx.save(cap_ir_version(model), str(path))
    return names


@contextlib.contextmanager
def _quiet_fd2():
    """generate_artifacts prints transformer logs straight to fd 2 whatever the log level."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@dataclass
class _Artifacts:
    """What compiling the trainable part produced: its files, BatchNorm outputs, and the flat buffer's order."""

    files: dict[str, Path]
    bn_updates: dict[str, str]
    order: list[str]


def compile_stage(model: BlockModel, spec: StageSpec, index: int, root: Path, opset: int,
                  optimizer: OptimizerConfig, neulite: NeuLiteWeights, batch: int = 4,
                  backends: tuple[str, ...] = ("ort",), max_batch: int = 32, notes: list[str] | None = None) -> Stage:
    """The stage's graphs (stages.py), example inputs, the inference files, the training artifacts, the torch and
    executorch files when asked for, and the record that describes them. max_batch: the largest micro-batch (the
    export's batch size) an ExecuTorch program takes; `notes` receives the line of a stage ExecuTorch cannot train."""
    model = _distinct_copy(model)
    shapes = {n: list(t.shape) for n, t in model.state_dict().items() if not n.endswith("num_batches_tracked")}
    g = build_stage(model, spec, neulite)
    folder = root / f"stage_{index:02d}_{spec.name}"
    folder.mkdir()
    values = _example_inputs(model, g, index, batch)
    files, session_params = _inference_files(g, values, folder, opset, shapes)
    names = g.train.input_names()
    bn_variance, train_acts, _ = _inspect(g.train, [values[n] for n in names])
    art = _training_artifacts(g, values, folder, opset, optimizer, shapes)
    files.update(art.files)
    if "torch" in backends:
        files.update(write_torch_files(model, spec, neulite, values, folder))
    if "executorch" in backends:
        refusal = executorch_refusal(g)
        if refusal is None:
            files.update(write_executorch_files(model, spec, neulite, values, folder, max_batch))
        elif notes is not None:
            notes.append(f"executorch: {refusal}")
    trainable = {n for n, _ in g.train.trainable_parameters()}
    feature_shape = [-1, *values["features"].shape[1:]]
    specs = {"features": feature_shape, "inputs": [-1, *model.input_shape], "labels": [-1],
             "teacher": [-1, model.num_classes], "loss_scale": []}
    return Stage(
        index=index, name=spec.name, kind=spec.kind, block=spec.block, loss=spec.loss,
        loss_config={"l1": g.train.l1, "l2": g.train.l2, "sigma": g.train.sigma} if spec.kind == "neulite" else {},
        optimizer=optimizer.record(),
        inputs=[TensorSpec(n, specs[n], "int64" if n == "labels" else "float32") for n in names],
        feature=TensorSpec("features", feature_shape),
        params=[ParamSpec(n, shapes[n], n in trainable) for n in art.order],
        session_params=session_params, bn_updates=art.bn_updates, bn_variance=bn_variance,
        footprint=_footprint(model, g, values, art, trainable, session_params, shapes, train_acts, files, max_batch),
        files={k: file_ref(root, p) for k, p in files.items()},
    )


def _example_inputs(model: BlockModel, g: StageGraphs, index: int, batch: int) -> dict[str, torch.Tensor]:
    """A batch for every graph input: random x, the prefix's features, labels, the teacher's logits."""
    torch.manual_seed(index)
    x = torch.randn(batch, *model.input_shape)
    with torch.no_grad():
        g.inference.eval()
        features = g.prefix.eval()(x) if g.prefix else x
        teacher_logits = g.teacher.eval()(features) if g.teacher else None
    labels = torch.randint(0, model.num_classes, (batch,))
    return {"features": features, "inputs": x, "labels": labels, "teacher": teacher_logits,
            "loss_scale": torch.tensor(1.0)}


def _inference_files(g: StageGraphs, values: dict[str, torch.Tensor], folder: Path, opset: int,
                     shapes: dict[str, list[int]]) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """prefix, inference and teacher as ONNX inference files whose weights are inputs (bound per round)."""
    files: dict[str, Path] = {}
    session_params: dict[str, list[str]] = {}
    for kind, graph, inp, out in [("prefix", g.prefix, "inputs", "features"), ("inference", g.inference, "inputs", "logits"),
                                  ("teacher", g.teacher, "features", "logits")]:
        if graph is not None:
            files[kind] = folder / f"{kind}.onnx"
            _export(graph, (values[inp],), [inp], [out], files[kind], opset, False)
            session_params[kind] = _weights_as_inputs(files[kind], shapes)
    return files, session_params


def _training_artifacts(g: StageGraphs, values: dict[str, torch.Tensor], folder: Path, opset: int,
                        optimizer: OptimizerConfig, shapes: dict[str, list[int]]) -> _Artifacts:
    """The train graph to ONNX (BatchNorm statistics exposed), ORT's training artifacts from it, the 1.19.2 fixes.
    The eval graph generate_artifacts writes is deleted: devices evaluate with inference.onnx, and a Module given an
    eval graph builds a second session."""
    from onnxruntime.training import artifacts

    names = g.train.input_names()
    base_path = folder / "base.onnx"
    base = _export(g.train, tuple(values[n] for n in names), names, ["loss", "logits", "data_loss"], base_path, opset, True)
    bn_updates = expose_bn_statistics(base)
    trainable = {n for n, _ in g.train.trainable_parameters()}
    in_graph = [n for n in initializer_names(base) if n in shapes]
    onnx.save(base, str(base_path))
    base_abs, folder_abs = str(base_path.resolve()), str(folder.resolve())
    with _quiet_fd2(), contextlib.chdir(folder_abs):  # onnxblock writes temp.onnx(.data) into the cwd: concurrent
        artifacts.generate_artifacts(                 # exports from one folder would overwrite each other's
            base_abs, requires_grad=[n for n in in_graph if n in trainable],
            frozen_params=[n for n in in_graph if n not in trainable], loss=None,
            optimizer=optimizer.block(), artifact_directory=folder_abs,
        )
    base_path.unlink()
    (folder / "eval_model.onnx").unlink()
    files = {"training": folder / "training_model.onnx", "checkpoint": folder / "checkpoint"}
    cap_ir_file(files["training"])
    if optimizer.name == "adamw":
        files["optimizer"] = folder / "optimizer_model.onnx"
        _fix_optimizer(files["optimizer"])
    training = onnx.load(str(files["training"]), load_external_data=False)
    order = [i.name for i in training.graph.input if i.name in shapes]  # the flat buffer's order
    return _Artifacts(files, bn_updates, order)


def _footprint(model: BlockModel, g: StageGraphs, values: dict[str, torch.Tensor], art: _Artifacts,
               trainable: set[str], session_params: dict[str, list[str]], shapes: dict[str, list[int]],
               train_acts: float, files: dict[str, Path], max_batch: int) -> dict[str, Any]:
    """Element counts and ORT's intermediate-tensor peaks (liveness.py) behind the analytic memory estimate
    (exporter/sizing.py). The training graph's peak is tabled at micro-batches 1, 2, 4, ... up to twice the
    largest the export sizes for; the frozen sessions' at the chunks the trainer runs them on (1..FROZEN_CHUNK)."""
    numel = lambda n: int(torch.Size(shapes[n]).numel())  # noqa: E731
    prefix_acts = _inspect(g.prefix, [values["inputs"]])[2] if g.prefix else 0.0
    frozen = {n for k in ("prefix", "teacher") for n in session_params.get(k, [])}
    order, in_graph, refreshed = art.order, set(art.order), set(art.bn_updates.values())
    updated = [n for n in order if n in trainable or n in refreshed]
    train = GraphLiveness(files["training"])
    sessions = [GraphLiveness(files[k]) for k in ("prefix", "teacher") if k in files]
    batches = [2 ** k for k in range(max(1, 2 * max_batch).bit_length())]
    mb = lambda peak: round(peak.peak_bytes / 2**20, 3)  # noqa: E731
    return {"params": sum(map(numel, order)), "trainable": sum(numel(n) for n in order if n in trainable),
            "frozen_session_params": sum(numel(n) for n in frozen - in_graph), "updated": sum(map(numel, updated)),
            "activations_per_sample": train_acts, "prefix_peak_activation_per_sample": prefix_acts,
            "input_per_sample": float(torch.Size(model.input_shape).numel()),
            "train_intermediates_mb": {str(b): mb(train.peak(b)) for b in batches},
            "frozen_intermediates_mb": {str(b): round(sum(mb(s.peak(b)) for s in sessions), 3)
                                        for b in range(1, FROZEN_CHUNK + 1)}}


def _inspect(graph: torch.nn.Module, args: list) -> tuple[dict[str, list[float]], float, float]:
    """One eval-mode forward with hooks on the leaf modules. Returns
    - per BatchNorm: elements per channel per sample and momentum (ORT updates running_var with the biased batch
      variance, torch with the unbiased one; the runtime corrects by n/(n-1) with n = batch x this count);
    - activation elements per sample: the sum of leaf outputs (what a backward pass keeps alive) and the largest
      one (what an inference pass needs at once)."""
    bn: dict[str, list[float]] = {}
    sizes: list[float] = []
    batch = args[0].shape[0]

    def hook(mod, inp, out, name):
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() / batch)
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            bn[f"{name}.running_var"] = [float(inp[0][0, 0].numel()), float(mod.momentum or 0.1)]

    hooks = [mod.register_forward_hook(lambda m, i, o, n=name: hook(m, i, o, n))
             for name, mod in graph.named_modules() if not list(mod.children())]
    try:
        with torch.no_grad():
            graph.eval()(*args)  # eval: shapes only, statistics untouched
    finally:
        for h in hooks:
            h.remove()
    return bn, float(sum(sizes)), float(max(sizes, default=0.0))


def _fix_optimizer(path: Path) -> None:
    """Bug 3 (IR cap) and torch's decoupled weight decay (adam_mode 0 is PyTorch's AdamW)."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "AdamWOptimizer":
            for a in node.attribute:
                if a.name == "adam_mode":
                    a.i = 0
    model.ir_version = min(model.ir_version, 10)
    onnx.save(model, str(path))
