"""Edits of ONNX files that work around onnxruntime-training 1.19.2 (bug numbers as in the toolchain notes)."""

from __future__ import annotations

from pathlib import Path

import onnx

MAX_IR_VERSION = 10  # bug 3: ORT 1.19 reads IR <= 10


def expose_bn_statistics(model: onnx.ModelProto) -> dict[str, str]:
    """Bug 5: training never writes BatchNorm running statistics back. Make every training-mode BN's updated
    mean/var a graph output; the runtime copies them into the parameters after each step.
    Returns {graph output name: running-stat initializer name}."""
    init = {i.name: list(i.dims) for i in model.graph.initializer}
    updates: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or len(node.output) < 3:
            continue
        for out, stat in zip(node.output[1:3], node.input[3:5]):
            if out and stat in init:
                updates[out] = stat
    existing = {o.name for o in model.graph.output}
    for out, stat in updates.items():
        if out not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, init[stat]))
    return updates


def weights_as_inputs(model: onnx.ModelProto, names: set[str]) -> list[str]:
    """Turn the global weights of an inference graph into graph inputs. ORT ignores add_initializer overrides of
    weights that its optimizers fold at load (Conv+BatchNorm fusion at ORT_ENABLE_BASIC and up, NCHWc at ALL;
    measured on 1.19.2), so a device feeds this round's weights as inputs instead."""
    moved = [i for i in model.graph.initializer if i.name in names]
    keep = [i for i in model.graph.initializer if i.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for i in moved:
        model.graph.input.append(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)))
    return [i.name for i in moved]


def cap_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model


def cap_ir_file(path: Path) -> None:
    model = onnx.load(str(path))
    if model.ir_version > MAX_IR_VERSION:
        onnx.save(cap_ir_version(model), str(path))


def initializer_names(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.initializer]
