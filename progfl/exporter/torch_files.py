"""The torch backend's files: each graph of a stage traced to TorchScript, for boards that run PyTorch but have no
ONNX Runtime training build (Raspberry Pi, Jetson).

Why TorchScript: a traced file carries its graph and its weights, so a device loads it with `torch.jit.load` alone:
no progfl models, no user code. Measured: a file written by torch 2.13 loads in torch 2.9.1 (the last CPU-only aarch64
wheel on PyPI that runs on a Pi 4) under an emulated Pi 4 and 5, and 3 SGD steps match x86 to 6e-8. torch.export's
`.pt2`, the alternative, loads there too, but its first call fails on a shape guard that 2.13 writes and 2.9.1 cannot
evaluate (`NameError: name 'L' is not defined`); it runs only with guards off or rewritten through private attributes.
Tracing is deprecated in 2.13 but complete for these graphs; its warnings are silenced here on purpose.

Tracing fixes each graph's mode: the train graph is traced in training mode (BatchNorm normalises with batch statistics
and updates its running statistics in place), the prefix, teacher and inference graphs in eval mode. The train graph
carries no weight-decay term: the device's torch optimizer applies coupled decay itself (torch.optim.SGD). Weights in
the files are placeholders; a device sets the round's weights by global name (the state_dict keys are global names).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from ..models.base import BlockModel
from ..models.stages import NeuLiteWeights, StageSpec, build_stage

KINDS = {"prefix": "inputs", "inference": "inputs", "teacher": "features"}  # eval-mode graphs and their input


def _trace(module: torch.nn.Module, args: tuple, training: bool, path: Path) -> Path:
    module = copy.deepcopy(module).train(training)  # a training-mode trace moves BatchNorm statistics: spare the model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation of torch.jit, and BatchNorm's batch-size check seen as a branch
        traced = torch.jit.trace(module, args, check_trace=False)
    torch.jit.save(traced, str(path))
    return path


def write_torch_files(model: BlockModel, spec: StageSpec, neulite: NeuLiteWeights, values: dict[str, torch.Tensor],
                      folder: Path) -> dict[str, Path]:
    """`values`: example inputs by graph-input name (features, inputs, labels, teacher). Returns file kind -> path,
    kinds as the manifest names them (torch.training, torch.prefix, ...)."""
    g = build_stage(model, spec, neulite)
    out = {"torch.training": _trace(g.train, tuple(values[n] for n in g.train.input_names()), True,
                                 folder / "torch_train.pt")}
    for kind, arg in KINDS.items():
        graph = getattr(g, kind)
        if graph is not None:
            out[f"torch.{kind}"] = _trace(graph, (values[arg],), False, folder / f"torch_{kind}.pt")
    return out
