"""EXPERIMENTAL: the ExecuTorch backend's file, a stage's train graph as an ExecuTorch (1.5.1) training program (.pte).

What the program is: `torch.export` of the train graph (built with weight_decay=0.0, as for the torch backend: the
device's optimizer applies coupled decay), its joint forward+backward graph (`_export_forward_backward`), lowered by
`to_edge(...).to_executorch()` onto ExecuTorch's portable kernels. Inputs are the train graph's, in its order, with
loss_scale last; outputs are (loss, data_loss): ExecuTorch differentiates output 0, which is loss_scale x data loss
here, so the gradients a device sums over micro-batches are the logical batch's mean gradient. Every parameter of the
graph is a program parameter under its global name (distill's frozen output module too, so a device can set it every
round); only the stage's trainable ones are handed to the optimizer on the device.

Batch size: dynamic. Dim 0 of every batched input is a `torch.export.Dim` from 1 to `max_batch`, and one program runs
any micro-batch in that range, the short tail batch of a shard included (measured on cnn and vit stages: batches 1,
3, 8, 17 and 32 of one program match eager to 1e-7). ExecuTorch's memory planner sizes its arena for `max_batch`:
address space, not resident memory, for the pages a smaller batch never touches. A device refuses a micro-batch above
the program's bound (see device_torch/executorch_backend.py).

What ExecuTorch 1.5.1 cannot train (`executorch_refusal`, decided from the torch modules alone, no executorch import):
- BatchNorm in training mode: `to_executorch` fails with "Missing out variants:
  {'aten::_native_batch_norm_legit_functional'}" (no out-variant kernel for functional batch norm). A frozen
  BatchNorm that the graph runs from its statistics with primitive ops (models.base.run_frozen) is fine.
- A max-pool whose backward feeds a trained parameter's gradient: 1.5.1's max_pool2d_with_indices_backward does not
  zero its output, so stale arena values are added in (pytorch/executorch#21686, fixed by PR #21878 after 1.5.1);
  measured gradient errors of 1e0 to 1e10 relative. A max-pool whose input depends on no trained parameter (in the
  frozen features, or before the first trained layer, as cnn's neulite co-adapted max-pool) is fine.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from ..manifest import EXECUTORCH_PIN as EXECUTORCH_VERSION
from ..models.base import BlockModel
from ..models.stages import NeuLiteWeights, StageGraphs, StageSpec, build_stage

INSTALL = f"pip install executorch=={EXECUTORCH_VERSION}"
FILE_NAME = "executorch_train.pte"


class ExecuTorchRefusal(ValueError):
    """ExecuTorch cannot train this stage correctly (the message is executorch_refusal's line)."""


def _example_inputs(graphs: StageGraphs, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """A small batch of the train graph's inputs, from the stage's own frozen graphs (shapes only matter)."""
    m: BlockModel = graphs.train.m
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *m.input_shape, generator=gen)
    with torch.no_grad():
        features = copy.deepcopy(graphs.prefix).eval()(x) if graphs.prefix is not None else x
        teacher = copy.deepcopy(graphs.teacher).eval()(features) if graphs.teacher is not None else None
    values = {"features": features, "inputs": x, "labels": torch.zeros(batch, dtype=torch.long), "teacher": teacher,
              "loss_scale": torch.tensor(1.0)}
    return tuple(values[n] for n in graphs.train.input_names())


def executorch_refusal(graphs: StageGraphs) -> str | None:
    """None when ExecuTorch 1.5.1 trains this stage correctly, else one line naming the upstream limitation.

    Decided by one training-mode forward of a copy of the train graph (the caller's modules are not touched) with
    only the stage's trainable parameters requiring gradients:
    - a BatchNorm module that runs (in training mode) -> refused (no training-mode batch norm kernel);
    - a max-pool in the autograd graph of the loss -> refused: its input requires a gradient only when it depends on
      a trained parameter, so exactly the max-pools whose backward feeds a trained parameter's gradient are found
      (a max-pool in the frozen features or in front of the first trained layer is not in that graph)."""
    name = graphs.spec.name
    train = copy.deepcopy(graphs.train).train()
    trainable = {n for n, _ in train.trainable_parameters()}
    for n, p in train.named_parameters():
        p.requires_grad_(n in trainable)
    names = {mod: n for n, mod in train.named_modules()}
    batch_norms: list[str] = []
    pools: dict[object, str] = {}  # grad_fn of a max-pool module's output -> the module's global name

    def hook(mod, _inp, out):
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            batch_norms.append(names[mod])
        elif isinstance(mod, nn.MaxPool2d) and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            pools[out.grad_fn] = names[mod]

    handles = [mod.register_forward_hook(hook) for mod in names]
    try:
        loss = train(*_example_inputs(graphs))[0]
    finally:
        for h in handles:
            h.remove()
    if batch_norms:
        return (f"stage {name}: ExecuTorch {EXECUTORCH_VERSION} has no training-mode BatchNorm kernel "
                f"(aten::_native_batch_norm_legit_functional; {batch_norms[0]}): export a --norm group model")
    found = []  # max-pool backward nodes reachable from the loss, by module name (or the op's, if functional)
    seen, todo = set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "MaxPool2D" in type(fn).__name__:
            found.append(pools.get(fn, f"a functional max_pool2d ({type(fn).__name__})"))
        todo.extend(f for f, _ in fn.next_functions)
    if found:
        which = ", ".join(sorted(set(found)))
        return (f"stage {name}: a max-pool ({which}) lies in the backward path of a trained layer; ExecuTorch "
                f"{EXECUTORCH_VERSION}'s max_pool2d backward returns stale values (executorch#21686)")
    return None


class _LossFirst(nn.Module):
    """The train graph's children at their own names (parameter names stay global), returning (loss, data_loss):
    ExecuTorch's training export differentiates output 0. logits are not an output (nothing on the device reads
    them)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not a submodule: its parameters are registered below, unprefixed
        for name, child in inner.named_children():
            self.add_module(name, child)

    def forward(self, *inputs: torch.Tensor):
        loss, _logits, data_loss = self.inner(*inputs)
        return loss, data_loss.detach()


def write_executorch_files(model: BlockModel, spec: StageSpec, neulite: NeuLiteWeights,
                           values: dict[str, torch.Tensor], folder: Path, max_batch: int) -> dict[str, Path]:
    """The stage's train graph as one ExecuTorch training program, batch size dynamic in [1, max_batch] (give the
    export's logical batch size: a device's micro-batches are at most that). `values`: example inputs by graph-input
    name, as for write_torch_files. Returns {"executorch.training": path}. Raises ExecuTorchRefusal when
    executorch_refusal refuses the stage, ImportError when executorch is not installed."""
    try:
        from executorch.exir import EdgeCompileConfig, to_edge
    except ImportError as e:
        raise ImportError(f"writing ExecuTorch files needs ExecuTorch: {INSTALL} ({e})") from None
    from torch.export import Dim, export
    from torch.export.experimental import _export_forward_backward

    g = build_stage(model, spec, neulite)
    refusal = executorch_refusal(g)
    if refusal:
        raise ExecuTorchRefusal(refusal)
    names = g.train.input_names()
    args = tuple(values[n].contiguous() for n in names)
    upper = max(2, max_batch, args[0].shape[0])  # a Dim needs a range; a bound below the example batch is an error
    batch = Dim("batch", min=1, max=upper)
    shapes = tuple(None if n == "loss_scale" else {0: batch} for n in names)
    wrapper = _LossFirst(copy.deepcopy(g.train).train())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-API and memory-planning warnings
        ep = export(wrapper, args, dynamic_shapes=(shapes,), strict=False)  # forward(*inputs): one varargs entry
        ep = _export_forward_backward(ep)
        program = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch()
    path = Path(folder) / FILE_NAME
    path.write_bytes(program.buffer)
    return {"executorch.training": path}
