"""The cut: rewrite a copy of the working model so the removed channels no longer exist.

Per-channel initializers (bindings) are sliced with `np.take` along their channel axis by the kept
indices of the tensor they are indexed like; handlers' rewrites then fix attributes and shape
constants (depthwise `group`, Split sizes, Slice bounds, Reshape/Resize/Expand targets).

An initializer read by several nodes is changed in place only when every reader wants the same new
value; otherwise each distinct value becomes a clone (`NAME__aofp<k>`) and readers that need no change
keep the original. Unused initializers are dropped, graph outputs are typed by shape inference, and
value_info is re-inferred when the model had any (shapes onnx infers where the file gave none can send
onnxruntime's optimizer astray, e.g. its transpose optimizer on a Resize whose empty roi is an
initializer listed among the graph inputs).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import shape_inference

from .modeldata import ModelData, initializer
from .groups import ChannelMap, subgraph_reads


class Cut:
    """What rewrites see: kept indices per tensor, initializer inputs to read and replace."""

    def __init__(self, cmap: ChannelMap, keep: np.ndarray, model: onnx.ModelProto):
        self.cmap = cmap
        self.keep = keep
        self.model = model
        self.weights = dict(cmap.graph.weights)
        self.opset = cmap.graph.opset
        self._pending: dict[tuple[int, int], np.ndarray] = {}
        self._added: list[onnx.TensorProto] = []
        self._node_ids = {n.output[0]: k for k, n in enumerate(model.graph.node)}  # outputs are unique (SSA)

    def kept(self, tensor: str) -> np.ndarray:
        return self.cmap.kept_indices(tensor, self.keep)

    def input_value(self, node: onnx.NodeProto, index: int) -> np.ndarray:
        key = (self._node_ids[node.output[0]], index)
        if key in self._pending:
            return self._pending[key]
        return self.cmap.graph.array(node.input[index])

    def set_input(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        self._pending[(self._node_ids[node.output[0]], index)] = np.asarray(value)

    def add_input(self, node: onnx.NodeProto, index: int, value: np.ndarray, hint: str) -> None:
        name = _unique(f"{node.name or node.output[0]}__{hint}", self.cmap.graph.inits)
        self._added.append(initializer(name, np.asarray(value), self.weights))
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    def finish(self) -> None:
        graph = self.model.graph
        nodes = list(graph.node)
        wanted: dict[str, dict[tuple[int, int], np.ndarray]] = defaultdict(dict)
        for (ni, ii), value in self._pending.items():
            wanted[nodes[ni].input[ii]][(ni, ii)] = value
        readers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for ni, node in enumerate(nodes):
            for ii, name in enumerate(node.input):
                readers[name].append((ni, ii))
            for name in subgraph_reads(node):  # read inside an If/Loop body: never cut in place
                readers[name].append((ni, -1))
        replace: dict[str, onnx.TensorProto] = {}
        taken = set(self.cmap.graph.inits)
        for name, values in wanted.items():
            distinct: list[tuple[np.ndarray, list[tuple[int, int]]]] = []
            for key, value in values.items():
                for arr, keys in distinct:
                    if arr.shape == value.shape and arr.dtype == value.dtype and np.array_equal(arr, value):
                        keys.append(key)
                        break
                else:
                    distinct.append((value, [key]))
            if len(distinct) == 1 and len(distinct[0][1]) == len(readers[name]):
                replace[name] = initializer(name, distinct[0][0], self.weights)
                continue
            for k, (arr, keys) in enumerate(distinct):
                clone = _unique(f"{name}__aofp{k}", taken)
                taken.add(clone)
                self._added.append(initializer(clone, arr, self.weights))
                for ni, ii in keys:
                    nodes[ni].input[ii] = clone
        used = {name for n in nodes for name in [*n.input, *subgraph_reads(n)]}
        kept_inits = []
        for init in graph.initializer:
            if init.name not in used:
                continue
            kept_inits.append(replace.get(init.name, init))
        del graph.initializer[:]
        graph.initializer.extend(kept_inits + self._added)
        self.weights = {n: a for n, a in self.weights.items() if n in used}
        inits = {i.name: i for i in graph.initializer}
        for vi in graph.input:  # old exports list initializers as inputs too
            if vi.name in inits:
                dims = vi.type.tensor_type.shape.dim
                del dims[:]
                for d in inits[vi.name].dims:
                    dims.add().dim_value = d
        kept_inputs = [vi for vi in graph.input if vi.name in used or vi.name not in self.cmap.graph.inits]
        del graph.input[:]
        graph.input.extend(kept_inputs)


def _unique(name: str, taken) -> str:
    out, k = name, 0
    while out in taken:
        k += 1
        out = f"{name}{k}"
    return out


def cut(cmap: ChannelMap, keep: np.ndarray) -> ModelData:
    """A pruned copy of the working model: every channel whose slot in `keep` is False is removed.

    Large initializers stay numpy arrays (unchanged ones shared with the original); `.materialize()`
    gives a self-contained ModelProto."""
    model = onnx.ModelProto()
    model.CopyFrom(cmap.graph.model)
    cutter = Cut(cmap, keep, model)
    nodes = list(model.graph.node)
    slices: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = defaultdict(list)
    for b in cmap.bindings:
        if b.tensor not in cmap.tensor_roots:
            continue
        kept = cmap.kept_indices(b.tensor, keep)
        full = len(cmap.positions(b.tensor))
        if b.local is not None:
            kept, full = kept[kept < b.local], b.local
        if len(kept) != full:
            slices[(b.node_index, b.input_index)].append((b.axis, kept))
    for (ni, ii), ops in slices.items():
        arr = cutter.input_value(nodes[ni], ii)
        for axis, kept in ops:
            arr = np.take(arr, kept, axis=axis)
        cutter.set_input(nodes[ni], ii, arr)
    if not keep.all():
        for ni, fn in cmap.rewrites:
            fn(nodes[ni], cutter)
    cutter.finish()
    had_value_info = bool(model.graph.value_info)
    del model.graph.value_info[:]
    try:
        model = shape_inference.infer_shapes(model)  # also types the graph outputs (the full check wants them)
    except Exception:
        pass
    if not had_value_info:  # a file without value_info stays so: inferred shapes can trip onnxruntime's optimizer
        del model.graph.value_info[:]
    return ModelData(model, cutter.weights)
