"""Peak bytes of the intermediate tensors ONNX Runtime holds while it runs one ONNX graph, from the graph alone.

A training graph (`training_model.onnx` from `generate_artifacts`) or an inference graph (`prefix.onnx`) is walked
node by node in the order ORT's sequential executor runs it; a tensor is live from the node that produces it until
the last node that reads it (graph outputs until the end), and the peak is the largest sum of live tensors plus the
running node's scratch space. What the caller counts elsewhere is left out: graph inputs (data, weights, and the
`*_grad.accumulation.buffer` gradient buffers that InPlaceAccumulatorV2 updates in place) and initializers.

Rules, each checked against onnxruntime-training-cpu 1.19.2 (the peak growth across a first training step, every
stage of six exports at micro-batches 1, 2, 8 and 32):
- Order: NOT the stored order. ORT's default order (GraphViewer, training build) is a reverse depth-first walk
  from the leaf nodes, with every Shape/Size node moved right after its producer. In a training graph that runs
  each InPlaceAccumulatorV2 right after its gradient is made, where the stored order keeps every weight gradient
  alive until the end. `ort_order` reproduces ORT's order exactly (compared with ORT's profiler on three graphs).
- Views: Identity, Reshape, Squeeze, Unsqueeze, Flatten outputs share their input's buffer in ORT (their kernels
  alias output 0 to input 0, and the level-1 optimizer removes Identity): no new bytes, the buffer lives until the
  last reader of either name.
- Left out because modelling them made the estimate worse over 220 measured cells (mean |log(estimate/measured)| of
  training graphs 0.44 without, 0.48 with in-place reuse of a dying same-size input by element-wise kernels, 0.54 with
  Shape/Size of static tensors constant-folded): those two of ORT's planner and optimizer behaviours.
- Scratch space allocated inside a kernel and freed before it returns: ConvGrad's im2col column buffer
  (C_in/group * prod(kernel) * prod(output spatial) floats, one image at a time, plus a bias multiplier of
  prod(output spatial) floats: orttraining/training_ops/cpu/nn/conv_grad.cc), and MLAS's Conv working buffer
  (MlasConvPrepare in onnxruntime/core/mlas/lib/convolve.cpp: none for a 1x1 stride-1 unpadded conv, a full
  expansion of output_size * K floats when the filter count exceeds the output size, else 128*128 floats per
  thread).

Shapes come from the graph's value_info (and inputs/outputs); the symbols of the graph inputs are the batch; other
symbols (ViT reshapes make "unk__N") and missing shapes come from onnx shape inference (with data propagation) run at
two concrete batches, which also tells whether a dim scales with the batch. Still unknown: a symbol nothing resolves
is taken as the batch; a tensor named `X_grad` has X's shape (ORT's gradient naming); the extra
outputs of BatchNormInternal (running and saved statistics) have the scale's shape; Scale's output has its input's
shape. The bytes whose shape came from such a rule are reported as `fallback_share`; a tensor with no shape at all is
counted as zero bytes and named in `unresolved`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import shape_inference

VIEW_OPS = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
SHAPE_OPS = frozenset({"Shape", "Size"})
MLAS_STRIDE_FLOATS = 128 * 128  # MLAS_SGEMM_STRIDEN * MLAS_SGEMM_STRIDEK: the segmented conv's buffer per thread
Dim = tuple[int, bool]  # (size, scales with the batch): the dim is size * batch when True
Dims = tuple[Dim, ...]
PROBE_BATCHES = (3, 5)  # concrete batches for shape inference: a symbol's size at both tells how it scales


@dataclass(frozen=True)
class IntermediatePeak:
    """The intermediate tensors' peak at one batch size. peak_bytes = fixed_bytes + per_sample_bytes * batch at this
    batch (the peak node can move with the batch, so the split describes this batch's peak, not every batch's)."""

    batch: int
    peak_bytes: int
    fixed_bytes: int  # batch-independent part of the peak: kernel scratch, weight-shaped gradient temporaries
    per_sample_bytes: float
    peak_node: str  # the node running when the peak is reached ("op_type#position" if unnamed)
    fallback_share: float  # fraction of peak_bytes whose shapes came from a fallback rule
    unresolved: tuple[str, ...]  # tensors of unknown shape, counted as 0 bytes


def ort_order(nodes: list[onnx.NodeProto]) -> list[int]:
    """Node positions in the order ORT 1.19's sequential executor runs them (ExecutionOrder::DEFAULT of a training
    build, core/graph/graph_viewer.cc): ReverseDFSFrom(leaf nodes) emitting each node after its inputs' producers,
    leaves taken from the last, inputs from the highest position; then each Shape/Size node with a producer is
    moved right after that producer (so a forward tensor read only for its shape can be freed early)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    preds = [sorted({producer[t] for t in n.input if t in producer}) for n in nodes]
    has_consumer = [False] * len(nodes)
    for ps in preds:
        for j in ps:
            has_consumer[j] = True
    stack = [(i, False) for i in range(len(nodes)) if not has_consumer[i]]
    visited = [False] * len(nodes)
    dfs: list[int] = []
    while stack:
        i, leave = stack.pop()
        if leave:
            dfs.append(i)
        elif not visited[i]:
            visited[i] = True
            stack.append((i, True))
            stack.extend((j, False) for j in preds[i] if not visited[j])
    follow: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        if n.op_type in SHAPE_OPS and n.input and n.input[0] in producer:
            follow.setdefault(producer[n.input[0]], []).append(i)
    order: list[int] = []
    seen: set[int] = set()
    for i in dfs:
        if i in seen:
            continue
        for j in [i, *follow.get(i, [])]:
            order.append(j)
            seen.add(j)
    return order


def _dims(vi: onnx.ValueInfoProto) -> tuple[int | str, ...] | None:
    """A tensor's dims as ints or symbols (dim_param); None when the rank or a dim is unknown."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    out: list[int | str] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            return None
    return tuple(out)


def _concrete_shapes(model: onnx.ModelProto, batch_symbols: set[str], batch: int) -> dict[str, onnx.ValueInfoProto]:
    """Shapes by onnx shape inference (with data propagation, so Reshape targets computed from Shape resolve) on a
    copy whose batch symbols are set to this batch and whose stored value_info is dropped."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for vi in m.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in batch_symbols:
                d.dim_value = batch
    try:
        inferred = shape_inference.infer_shapes(m, strict_mode=False, data_prop=True).graph
    except Exception:  # noqa: BLE001  (inference can fail on contrib ops: the stored value_info still serves)
        return {}
    return {vi.name: vi for vi in [*inferred.value_info, *inferred.output]}  # outputs' shapes land in graph.output


def _scaling(v1: int, v2: int, b1: int, b2: int) -> Dim | None:
    """A dim seen as v1 at batch b1 and v2 at b2: constant, proportional to the batch, or neither (None)."""
    if v1 == v2:
        return (v1, False)
    if v1 * b2 == v2 * b1 and v1 % b1 == 0:
        return (v1 // b1, True)
    return None


def _itemsize(elem_type: int) -> int:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


class GraphLiveness:
    """One graph parsed once (shapes, order, lifetimes); `peak(batch)` is then cheap for any batch."""

    def __init__(self, model: str | Path | onnx.ModelProto, threads: int = 2):
        """threads: intra-op threads of the session (MLAS sizes a segmented conv's scratch per thread)."""
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model), load_external_data=False)
        g = model.graph
        self.threads = threads
        self.shapes: dict[str, Dims] = {}
        self.itemsize: dict[str, int] = {}
        self.fallback: set[str] = set()
        self._read_shapes(model)
        self._fill_fallbacks(g)
        self.nodes = list(g.node)
        self.order = ort_order(self.nodes)
        self._lifetimes({o.name for o in g.output})

    def _read_shapes(self, model: onnx.ModelProto) -> None:
        """Stored shapes first; the batch is every symbol of the graph inputs. Other symbols (ViT's reshapes make
        "unk__N") and tensors without a stored shape are resolved by concrete inference at two batches."""
        g = model.graph
        stored = {vi.name: vi for vi in [*g.input, *g.output, *g.value_info]}
        for vi in stored.values():
            if vi.type.tensor_type.elem_type:
                self.itemsize.setdefault(vi.name, _itemsize(vi.type.tensor_type.elem_type))
        batch_syms = {d for vi in g.input for d in (_dims(vi) or ()) if isinstance(d, str)}
        b1, b2 = PROBE_BATCHES
        v1, v2 = (_concrete_shapes(model, batch_syms, b) for b in PROBE_BATCHES)
        for vi in v1.values():
            if vi.type.tensor_type.elem_type:
                self.itemsize.setdefault(vi.name, _itemsize(vi.type.tensor_type.elem_type))
        c1 = {n: d for n, vi in v1.items() if (d := _dims(vi)) is not None}
        c2 = {n: d for n, vi in v2.items() if (d := _dims(vi)) is not None}
        symbols: dict[str, Dim] = {s: (1, True) for s in batch_syms}
        for name, vi in stored.items():  # learn each symbol's size from a tensor inference made concrete
            dims, d1, d2 = _dims(vi), c1.get(name), c2.get(name)
            if dims and d1 and d2 and len(dims) == len(d1) == len(d2):
                for d, v1, v2 in zip(dims, d1, d2):
                    if isinstance(d, str) and isinstance(v1, int) and isinstance(v2, int):
                        symbols.setdefault(d, _scaling(v1, v2, b1, b2))
        for name in {*stored, *c1}:
            dims = _dims(stored[name]) if name in stored else None
            if dims is None or any(isinstance(d, str) and d not in symbols for d in dims):
                d1, d2 = c1.get(name), c2.get(name)
                if d1 is None or d2 is None or len(d1) != len(d2):
                    continue
                resolved = [_scaling(v1, v2, b1, b2) if isinstance(v1, int) and isinstance(v2, int) else None
                            for v1, v2 in zip(d1, d2)]
            else:
                resolved = [symbols[d] if isinstance(d, str) else (d, False) for d in dims]
            if all(r is not None for r in resolved):
                self.shapes[name] = tuple(resolved)  # type: ignore[arg-type]
        for name, vi in stored.items():  # last resort: a symbol nothing resolved is taken as the batch
            dims = _dims(vi)
            if name not in self.shapes and dims is not None:
                self.shapes[name] = tuple(symbols.get(d, (1, True)) if isinstance(d, str) else (d, False)
                                          for d in dims)
                self.fallback.add(name)
        for init in g.initializer:  # weights are not counted, but Conv scratch is sized from them
            self.shapes.setdefault(init.name, tuple((d, False) for d in init.dims))
            self.itemsize.setdefault(init.name, _itemsize(init.data_type))

    def _fill_fallbacks(self, graph: onnx.GraphProto) -> None:
        """Shapes ORT knows at run time but the file does not store (see the module docstring)."""
        for n in graph.node:
            for k, out in enumerate(n.output):
                if not out or out in self.shapes:
                    continue
                src = None
                if out.endswith("_grad") and out[:-5] in self.shapes:
                    src = out[:-5]
                elif n.op_type == "BatchNormInternal" and k >= 1 and len(n.input) > 1:
                    src = n.input[1]
                elif n.op_type == "Scale" and k == 0:
                    src = n.input[0]
                if src is not None and src in self.shapes:
                    self.shapes[out] = self.shapes[src]
                    self.itemsize.setdefault(out, self.itemsize.get(src, 4))
                    self.fallback.add(out)

    def _lifetimes(self, graph_outputs: set[str]) -> None:
        """Per step of the order: the buffers born there and the buffers that die after it. A view's name maps to
        the buffer it shares; a buffer dies after the last reader
        of any of its names; graph outputs never die."""
        last_read: dict[str, int] = {}
        for step, i in enumerate(self.order):
            for t in self.nodes[i].input:
                last_read[t] = step
        end = len(self.order)
        for o in graph_outputs:
            last_read[o] = end
        self.buffer_of: dict[str, str] = {}
        root_last: dict[str, int] = {}  # buffer -> last step any of its names is read
        self.born: list[list[str]] = []
        for step, i in enumerate(self.order):
            n = self.nodes[i]
            new = []
            for k, out in enumerate(n.output):
                if not out:
                    continue
                shared = self._view_of(n) if k == 0 else None
                if shared == "":
                    continue  # a view of a graph input or initializer: not an intermediate
                if shared is not None:
                    self.buffer_of[out] = shared
                    root_last[shared] = max(root_last[shared], last_read.get(out, step))
                    continue
                self.buffer_of[out] = out
                root_last[out] = last_read.get(out, step)
                new.append(out)
            self.born.append(new)
        self.dies: list[list[str]] = [[] for _ in self.order]
        for buf, step in root_last.items():
            if step < end:
                self.dies[step].append(buf)
        produced = {o for n in self.nodes for o in n.output if o}
        self.unresolved = tuple(sorted(b for b in produced if self.buffer_of.get(b) == b and b not in self.shapes))

    def _view_of(self, n: onnx.NodeProto) -> str | None:
        """The buffer a view's output shares: its input's ("" when that input is not an intermediate); None: not a
        view, a new buffer."""
        if n.domain in ("", "ai.onnx") and n.op_type in VIEW_OPS:
            return self.buffer_of.get(n.input[0], "")
        return None

    def _bytes(self, name: str, batch: int) -> int:
        dims = self.shapes.get(name)
        if dims is None:
            return 0
        return math.prod(size * batch if scales else size for size, scales in dims) * self.itemsize.get(name, 4)

    def _static(self, name: str) -> tuple[int, ...] | None:
        dims = self.shapes.get(name)
        if dims is None or any(scales for _, scales in dims):
            return None
        return tuple(size for size, _ in dims)

    def _scratch(self, n: onnx.NodeProto) -> int:
        """Bytes a kernel allocates for itself and frees before returning (module docstring): batch-independent."""
        if n.op_type not in ("Conv", "ConvGrad") or len(n.input) < 2:
            return 0
        w = self._static(n.input[2] if n.op_type == "ConvGrad" else n.input[1])
        y = self.shapes.get(n.input[0] if n.op_type == "ConvGrad" else n.output[0])
        if w is None or y is None or any(scales for _, scales in y[2:]):
            return 0
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        kernel = math.prod(w[2:])
        out_size = math.prod(size for size, _ in y[2:])
        k = w[1] * kernel  # C_in / group * prod(kernel)
        if n.op_type == "ConvGrad":
            return 4 * (k * out_size + out_size)
        if kernel == 1 and all(s == 1 for s in attrs.get("strides", [1])) and not any(attrs.get("pads", [0])):
            return 0
        if w[0] // int(attrs.get("group", 1)) > out_size:
            return 4 * out_size * k
        return 4 * MLAS_STRIDE_FLOATS * self.threads

    def peak(self, batch: int) -> IntermediatePeak:
        """The largest live set (plus the running node's scratch) over the run, at this batch."""
        live: set[str] = set()
        live_bytes = 0
        best: tuple[int, int, set[str], int] = (-1, -1, set(), 0)  # bytes, step, live buffers, scratch
        for step, i in enumerate(self.order):
            for b in self.born[step]:
                live.add(b)
                live_bytes += self._bytes(b, batch)
            scratch = self._scratch(self.nodes[i])
            if live_bytes + scratch > best[0]:
                best = (live_bytes + scratch, step, set(live), scratch)
            for b in self.dies[step]:
                live.discard(b)
                live_bytes -= self._bytes(b, batch)
        total, step, bufs, scratch = best
        if step < 0:
            return IntermediatePeak(batch, 0, 0, 0.0, "", 0.0, self.unresolved)
        fixed = scratch + sum(self._bytes(b, batch) for b in bufs if self._static(b) is not None)
        node = self.nodes[self.order[step]]
        fallback = sum(self._bytes(b, batch) for b in bufs if b in self.fallback)
        return IntermediatePeak(batch=batch, peak_bytes=total, fixed_bytes=fixed,
                                per_sample_bytes=(total - fixed) / batch,
                                peak_node=node.name or f"{node.op_type}#{self.order[step]}",
                                fallback_share=fallback / total if total else 0.0, unresolved=self.unresolved)
