"""Independent MACs / parameter counter: the ground truth the tests compare aofp_onnx against.

It deliberately shares no code with ``aofp_onnx`` and does no shape arithmetic of its own: the model
is run in onnxruntime (CPU) with the inputs and outputs of every counted node exposed as extra graph
outputs, and the MACs are read off the *real* tensor shapes.

Per node (N = batch, ``W`` the weight tensor, shapes as observed at run time):

- Conv:          N·Cout·prod(out spatial) · (Cin/group)·prod(kernel)  =  |Y| · W[1]·prod(W[2:])
- ConvTranspose: N·Cin·prod(in spatial) · (Cout/group)·prod(kernel)   =  |X| · W[1]·prod(W[2:])
- Gemm:          M·K·N  (with transA / transB honoured)
- MatMul:        prod(output shape) · K,  K = A.shape[-1]

The sum is divided by the batch size of the feeds, so the result is MACs *per sample*. Bias adds,
activations, pooling, BN and element-wise ops are not counted. Nodes inside subgraphs (If/Loop/Scan)
are not counted.
"""
from __future__ import annotations

import math
import os
import pathlib
from typing import Mapping, Union

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}

ModelLike = Union[str, os.PathLike, onnx.ModelProto]


def _load(path_or_model: ModelLike) -> onnx.ModelProto:
    if isinstance(path_or_model, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(path_or_model)
        return model
    return onnx.load(os.fspath(path_or_model))


def _batch_size(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> int:
    """The leading dimension of the first real (non-initializer) graph input."""
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if inp.name not in feeds:
            raise KeyError(f"no feed for graph input {inp.name!r}")
        arr = np.asarray(feeds[inp.name])
        if arr.ndim == 0:
            raise ValueError(f"graph input {inp.name!r} is a scalar: no batch dimension")
        return int(arr.shape[0])
    raise ValueError("model has no graph inputs to take the batch size from")


def node_shapes(path_or_model: ModelLike, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Run the model and return the observed shape of every input/output of every counted node."""
    model = _load(path_or_model)
    graph = model.graph
    init_shapes = {i.name: tuple(int(d) for d in i.dims) for i in graph.initializer}
    present = {o.name for o in graph.output}
    wanted: list[str] = []
    for node in graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        for name in list(node.input) + list(node.output):
            if name and name not in wanted:
                wanted.append(name)
    for name in wanted:
        if name in present or name in feeds or name in init_shapes:
            continue
        graph.output.append(onnx.ValueInfoProto(name=name))  # untyped: onnxruntime fills it in
        present.add(name)

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, {k: np.asarray(v) for k, v in feeds.items()})
    shapes: dict[str, tuple[int, ...]] = dict(init_shapes)
    shapes.update({n: tuple(v.shape) for n, v in zip(names, values)})
    shapes.update({k: tuple(np.asarray(v).shape) for k, v in feeds.items()})
    return shapes


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """MACs of one counted node for the whole batch, from observed shapes."""
    op = node.op_type
    if op == "Conv":
        y, w = shapes[node.output[0]], shapes[node.input[1]]
        return math.prod(y) * w[1] * math.prod(w[2:])
    if op == "ConvTranspose":
        x, w = shapes[node.input[0]], shapes[node.input[1]]
        return math.prod(x) * w[1] * math.prod(w[2:])
    if op == "Gemm":
        a, b = shapes[node.input[0]], shapes[node.input[1]]
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return m * k * n
    if op == "MatMul":
        a, y = shapes[node.input[0]], shapes[node.output[0]]
        return math.prod(y) * a[-1]
    raise ValueError(f"{op} is not a counted op")


def count_macs_by_node(path_or_model: ModelLike, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Per-sample MACs of each counted node, keyed by node name (or 'op#index' when unnamed)."""
    model = _load(path_or_model)
    shapes = node_shapes(model, feeds)
    batch = _batch_size(model, feeds)
    out: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type in COUNTED_OPS:
            macs = node_macs(node, shapes)
            if macs % batch:
                raise ValueError(f"{node.name or node.op_type}: {macs} MACs not divisible by batch {batch}")
            out[node.name or f"{node.op_type}#{i}"] = macs // batch
    return out


def count_macs(path_or_model: ModelLike, feeds: Mapping[str, np.ndarray]) -> int:
    """Total per-sample MACs of Conv/ConvTranspose/Gemm/MatMul nodes, from a real onnxruntime run."""
    return sum(count_macs_by_node(path_or_model, feeds).values())


def count_params(path_or_model: ModelLike) -> int:
    """Total elements of float initializers plus float tensors held by Constant nodes.

    Everything floating point counts (conv/linear weights and biases, BN scale/bias/mean/var, SE and
    affine constants, Clip bounds held as float Constants, ...). Integer tensors (shapes, axes, Split
    sizes) do not. Each initializer is counted once, however many nodes use it.
    """
    model = _load(path_or_model)
    total = sum(math.prod(i.dims) for i in model.graph.initializer if i.data_type in _FLOAT_TYPES)
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for a in node.attribute:
            if a.name == "value" and a.t.data_type in _FLOAT_TYPES:
                total += math.prod(a.t.dims)
            elif a.name == "value_float":
                total += 1
            elif a.name == "value_floats":
                total += len(a.floats)
    return total


def constant_arrays(path_or_model: ModelLike) -> dict[str, np.ndarray]:
    """Initializers and Constant-node ``value`` tensors by name (test helper)."""
    model = _load(path_or_model)
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(a.t)
    return out


__all__ = [
    "COUNTED_OPS",
    "constant_arrays",
    "count_macs",
    "count_macs_by_node",
    "count_params",
    "node_macs",
    "node_shapes",
]

if __name__ == "__main__":  # pragma: no cover - manual use: python tests/reference_macs.py MODEL.onnx 1,3,224,224
    import sys

    m = onnx.load(sys.argv[1])
    dims = tuple(int(d) for d in sys.argv[2].split(","))
    f = {m.graph.input[0].name: np.random.rand(*dims).astype(np.float32)}
    print(pathlib.Path(sys.argv[1]).name, "MACs", count_macs(m, f), "params", count_params(m))
