"""A batch pinned in the file, and the unpinned working copy the pipeline runs at any batch.

torch.onnx.export without `dynamic_axes` (most TensorRT-bound exports) pins dim 0 of the inputs and
outputs to the export batch b (usually 1), and `x.view(x.size(0), -1)` becomes a Reshape target
[b, -1]. Paddle's `dim_value: -1` and a `dim_param` are dynamic, nothing to do for them.

`unpin` makes the working copy: dim 0 of each pinned input and of the outputs becomes the symbol
`BATCH`, and element 0 of a Reshape target that provably holds the batch becomes 0 ("copy dim 0 of
the data"): the target's element 0 equals b and symbolic shape inference (onnxruntime's, which keeps
the symbol through Resize and computed shapes; onnx's as a fallback) gives its data input dim 0 =
`BATCH` (repeated until no target changes, since an unpinned Reshape lets the batch reach the next).
The copy is then checked on data: one run of the copy on k·b samples must equal k runs of the file
(relative max difference ≤ `TOLERANCE`). A batch pinned some other way (Expand, Tile, a Concat with a
[1, ..] constant, a computed target) fails that check, and the pipeline keeps the file as it is:
`runtime.Runner` then splits larger feeds into runs of b samples, and the search runs b samples per
trial run (see `search_run.run`). `repin` writes the file's declarations back into a model cut from the
copy: dim 0 of the inputs and outputs and element 0 of the rewritten targets; the copy keeps the same
node and initializer names, so values trained or refitted on it belong to the file's graph unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from .graph import Graph, with_input_shapes
from .modeldata import ModelData, copy_model
from .runtime import Runner, pinned_batches

BATCH = "aofp_batch"  # the working copy's batch symbol (never written: `repin` restores the file's dims)
TOLERANCE = {np.dtype(np.float16): 1e-2, np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-8}
CHECK_RUNS = 2  # the copy on CHECK_RUNS·b samples against CHECK_RUNS runs of the file
MAX_PASSES = 64


@dataclass
class Unpinning:
    """What `unpin` changed, so that `repin` can put it back."""

    inputs: dict[str, int]  # pinned input → its batch b
    outputs: dict[str, int] = field(default_factory=dict)  # graph output → its declared dim 0
    targets: dict[str, int] = field(default_factory=dict)  # Reshape node output → its target's element 0
    value_info: bool = False  # the file had value_info (re-inferred on the repinned model)
    declared: dict[str, int | str | None] = field(default_factory=dict)  # input → the file's dynamic dim 0,
    #   for inputs the graph pins though the file declares them dynamic (`probe._graph_pinned`)
    unpinned: bool = True  # False: the working graph declares the pinned batch and runs b samples at a time

    def to_json(self) -> dict:
        out = {"pinned": dict(self.inputs), "reshapes_unpinned": len(self.targets),
               "working_copy": "unpinned (checked on data)" if self.unpinned
               else "none (the batch is pinned beyond Reshape targets): one pinned batch per run"}
        if self.declared:
            out["pinned_in_graph"] = sorted(self.declared)  # declared dynamic in the file, pinned by its graph
        return out


def working_graph(graph: Graph, feeds: dict | None = None,
                  graph_pinned: dict[str, int] | None = None) -> tuple[Graph, Unpinning | None]:
    """The graph the pipeline works on: `graph` unpinned where that is proven (else `graph` itself).

    `graph_pinned` (inputs declared dynamic whose batch the graph pins): the working graph first declares
    that batch, then is unpinned like a pinned export; where that cannot be proven it stays pinned, so
    every run takes b samples. Either way the file's own declarations are written back (`repin`)."""
    data, declared = graph.data, {}
    if graph_pinned:
        data, declared = _declare_pinned(data, graph_pinned)
    found = unpin(data, feeds, graph.input_shapes)
    if found is None and not declared:
        return graph, None
    if found is None:
        model, record = data.proto, Unpinning(dict(graph_pinned), unpinned=False)
    else:
        model, record = found[0].proto, found[1]
    record.declared = declared
    view = with_input_shapes(model, graph.input_shapes)
    return Graph(model, dict(graph.input_shapes), dict(graph.shapes), view, graph.weights, dict(graph.dtypes)), record


def _declare_pinned(data: ModelData, pins: dict[str, int]) -> tuple[ModelData, dict[str, int | str | None]]:
    """A copy of `data` whose inputs `pins` declare their batch, and the file's declarations of them."""
    proto = data.copy_proto()
    declared = {}
    for vi in proto.graph.input:
        if vi.name in pins:
            dim = vi.type.tensor_type.shape.dim[0]
            declared[vi.name] = dim.dim_param if dim.HasField("dim_param") else (
                dim.dim_value if dim.HasField("dim_value") else None)
            _set_dim0(vi, pins[vi.name])
    return ModelData(proto, data.weights), declared


def working_model(data: ModelData, feeds: dict | None = None) -> tuple[ModelData, dict[str, int]]:
    """(the model to run and train at any batch, the batches it still pins): `data` unpinned where proven."""
    found = unpin(data, feeds)
    model = data if found is None else found[0]
    return model, pinned_batches(model.proto)


def unpin(data: ModelData, feeds: dict[str, np.ndarray] | None = None,
          shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[ModelData, Unpinning] | None:
    """The working copy of a model whose batch is pinned, checked equal to the file on `feeds`
    (samples for every input; where absent, seeded noise at `shapes` or the file's fixed dims); None
    when the model pins no batch or when the batch is pinned in a way the copy cannot prove away."""
    pins = pinned_batches(data.proto)
    if not pins:
        return None
    proto = data.copy_proto()
    graph = proto.graph
    record = Unpinning(dict(pins), value_info=bool(graph.value_info))
    for vi in graph.input:
        if vi.name in pins:
            _set_dim0(vi, BATCH)
    for vi in graph.output:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value in pins.values():
            record.outputs[vi.name] = dims[0].dim_value
            _set_dim0(vi, BATCH)
    del graph.value_info[:]
    batch_values = set(pins.values())
    for _ in range(MAX_PASSES):
        if not _unpin_targets(proto, data.weights, batch_values, record, shapes or {}):
            break
    copy = ModelData(proto, data.weights)
    return (copy, record) if _same_on_data(data, copy, pins, feeds, shapes) else None


def repin(model: ModelData, record: Unpinning | None) -> ModelData:
    """`model` (cut from the working copy) with the file's batch declarations written back."""
    if record is None:
        return model
    proto = model.copy_proto()
    graph = proto.graph
    for vi in graph.input:
        if vi.name in record.inputs:
            _set_dim0(vi, record.declared.get(vi.name, record.inputs[vi.name]))
    for vi in graph.output:
        if vi.name in record.outputs:
            _set_dim0(vi, record.outputs[vi.name])
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for node in graph.node:
        if node.op_type != "Reshape" or node.output[0] not in record.targets:
            continue
        init = inits[node.input[1]]
        target = numpy_helper.to_array(init).copy()
        target[0] = record.targets[node.output[0]]
        if readers[init.name] > 1:  # shared with a Reshape of another batch convention: a clone of its own
            init = graph.initializer.add()
            init.name = f"{node.input[1]}__pinned_{node.output[0]}"
            node.input[1] = init.name
        init.CopyFrom(numpy_helper.from_array(target, init.name))
    if record.value_info:
        try:
            proto = shape_inference.infer_shapes(proto)
        except Exception:  # the file's value_info is informative only; onnxruntime infers its own
            pass
    return ModelData(proto, model.weights)


def _set_dim0(vi: onnx.ValueInfoProto, value: int | str | None) -> None:
    """Declare dim 0 of `vi` as `value`: a symbol, a number (Paddle's -1 too), or unknown (None)."""
    dim = vi.type.tensor_type.shape.dim[0]
    dim.Clear()
    if isinstance(value, str):
        dim.dim_param = value
    elif value is not None:
        dim.dim_value = value


def _unpin_targets(proto: onnx.ModelProto, weights: dict, batch_values: set[int], record: Unpinning,
                   shapes: dict) -> bool:
    """One pass: rewrite element 0 of the Reshape targets that hold the batch; whether any changed.

    Inference sees the other input dims fixed at `shapes`: only the batch is a symbol."""
    view = copy_model(proto)
    for vi in view.graph.input:
        if vi.name in shapes:
            for axis, (dim, size) in enumerate(zip(vi.type.tensor_type.shape.dim, shapes[vi.name])):
                if axis > 0:
                    dim.Clear()
                    dim.dim_value = int(size)
    inits = {i.name: i for i in proto.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def pinned_target(node: onnx.NodeProto) -> bool:
        """A Reshape whose constant target starts with a pinned batch size."""
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            return False
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            return False
        if node.input[1] not in inits or node.input[1] in weights:
            return False
        target = numpy_helper.to_array(inits[node.input[1]])
        return target.ndim == 1 and len(target) > 0 and int(target[0]) in batch_values

    first = _first_dims(_onnx_shapes(view))
    if any(pinned_target(n) and first.get(n.input[0]) != BATCH and not isinstance(first.get(n.input[0]), int)
           for n in proto.graph.node):  # onnx lost the symbol on the way to some target
        first = _first_dims(_symbolic_shapes(view))

    def holds_batch(node: onnx.NodeProto) -> bool:
        return pinned_target(node) and first.get(node.input[0]) == BATCH

    changed = False
    for node in proto.graph.node:
        if node.output[0] in record.targets or not holds_batch(node):
            continue
        name = node.input[1]
        if not all(holds_batch(r) for r in readers[name]):
            continue  # the same constant shapes something else: left as it is (the data check decides)
        target = numpy_helper.to_array(inits[name]).copy()
        for r in readers[name]:
            record.targets[r.output[0]] = int(target[0])
        target[0] = 0
        inits[name].CopyFrom(numpy_helper.from_array(target, name))
        changed = True
    return changed


def _first_dims(model: onnx.ModelProto | None) -> dict[str, str | int | None]:
    """Dim 0 of every typed tensor: its symbol, its value, or None when unknown."""
    first: dict[str, str | int | None] = {}
    if model is None:
        return first
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            d = dims[0]
            first[vi.name] = (d.dim_param if d.HasField("dim_param")
                              else d.dim_value if d.HasField("dim_value") else None)
    return first


def _onnx_shapes(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        return shape_inference.infer_shapes(proto)
    except Exception:
        return None


def _symbolic_shapes(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """`proto` typed by onnxruntime's symbolic shape inference, which carries a symbolic batch through
    Resize, computed shapes and Concat where onnx's own inference loses it (None when it fails)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception:
        return None


def _same_on_data(original: ModelData, copy: ModelData, pins: dict[str, int], feeds: dict | None,
                  shapes: dict | None) -> bool:
    """Whether the copy on CHECK_RUNS·b samples gives the file's outputs of CHECK_RUNS runs."""
    feeds = _check_feeds(original.proto, pins, feeds, shapes or {})
    if feeds is None:
        return False
    try:
        # unoptimized sessions read the weight arrays in place (see runtime.Runner): no copies of them
        reference = Runner(original, "cpu", optimization="disable", prepack=False, arena=False).run(feeds)
        got = Runner(copy, "cpu", optimization="disable", prepack=False, arena=False).run(feeds)
    except Exception:  # the copy does not run at a larger batch: the batch is pinned elsewhere
        return False
    for y, z in zip(reference, got):
        y, z = np.asarray(y), np.asarray(z)
        if y.shape != z.shape:
            return False
        if y.dtype.kind != "f":
            if not np.array_equal(y, z):
                return False
            continue
        scale = max(float(np.max(np.abs(y))) if y.size else 0.0, 1.0)
        if y.size and float(np.max(np.abs(y.astype(np.float64) - z))) > TOLERANCE.get(y.dtype, 1e-4) * scale:
            return False
    return True


def _check_feeds(model: onnx.ModelProto, pins: dict[str, int], feeds: dict | None, shapes: dict) -> dict | None:
    """CHECK_RUNS·b samples per input: from `feeds` where they hold enough, else seeded noise (zeros
    for integer inputs) at `shapes` or the fixed dims; None when an input has an unknown dim past the batch."""
    rng = np.random.default_rng(0)
    inits = {i.name for i in model.graph.initializer}
    n = CHECK_RUNS * max(pins.values())
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        given = (feeds or {}).get(vi.name)
        if given is not None and len(given) >= n:
            out[vi.name] = np.asarray(given[:n])
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in vi.type.tensor_type.shape.dim]
        if given is not None:
            dims = [None] + list(given.shape[1:])
        elif vi.name in shapes:
            dims = [None] + list(shapes[vi.name][1:])
        if not dims or any(d is None for d in dims[1:]):
            return None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = (n, *dims[1:])
        out[vi.name] = rng.standard_normal(shape).astype(dtype) if np.dtype(dtype).kind == "f" \
            else np.zeros(shape, dtype)
    return out
