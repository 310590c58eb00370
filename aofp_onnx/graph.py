"""Load and normalize an ONNX model; give the analysis its shapes.

Two views of one model:

* the **working model** (`Graph.model`): the file as loaded (external data included) with every
  constant subgraph (Constant nodes, Paddle's `Reshape(bias)`, casts and arithmetic of constants)
  folded into initializers and opsets below 11 upgraded (both in `normalize`), so every weight is
  an initializer. Dynamic dims stay dynamic: this is the graph that is cut and written.
* weights of at least `LARGE` elements live outside the proto (`ModelData.weights`, numpy arrays); the
  proto keeps an external-data placeholder for each, so protos stay small to copy and onnxruntime
  sessions read the arrays in place (zero copy). `ModelData.materialize()` puts them back for writing.
* the **shape view**: a copy whose dynamic input dims are fixed (`--input-shape`, the data, or 1 for a
  leading batch dim), shapes inferred by `onnx.shape_inference` with data propagation; tensors that
  inference leaves unknown are read from one onnxruntime run of that copy.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from .errors import InputError, shape_hint
from .modeldata import ModelData, copy_model, default_opset, split_weights
from .normalize import MIN_OPSET, fold_constants, upgrade_opset
from .runtime import Runner

MAX_OPSET = onnx.defs.onnx_opset_version()  # the newest the installed onnx knows
OLDEST_OPSET = 7  # opsets OLDEST_OPSET..MIN_OPSET-1 are upgraded to MIN_OPSET at load (onnx.version_converter)
QUANTIZED_OPS = {
    "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QuantizeLinear",
    "DequantizeLinear", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul", "QGemm",
    "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
}


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an .onnx file (external data too) and check it is a float model we can work on."""
    return read_model(path)[0]


def read_model(path: str | os.PathLike, notes: list[str] | None = None) -> tuple[onnx.ModelProto, bool]:
    """(model, whether its weights came from external data files), checked like `load_model` and
    upgraded to MIN_OPSET when older; what was changed is appended to `notes`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not an ONNX file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file")
    try:  # the checker reads the file in C++ before Python holds a copy (and has no 2 GB limit)
        onnx.checker.check_model(path)
        problem = None
    except Exception as exc:
        problem = exc
    try:
        model = onnx.load(path, load_external_data=False)
        has_external = any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
        if has_external:
            onnx.external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as exc:  # protobuf decode errors, missing external data, ...
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    check_model(model, path, problem)
    return upgrade_opset(model, path, notes), has_external


def check_model(model: onnx.ModelProto, label: str = "model", checker_error: Exception | None = None) -> None:
    """Refuse what is not a float ONNX model of a supported opset, with a reason.

    `checker_error`: what onnx.checker said of the file already (it is run here otherwise)."""
    if not model.graph.node:
        raise InputError(f"{label}: not an ONNX model (the graph has no nodes)")
    if checker_error is None and not os.path.isfile(label):
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            checker_error = exc
    if checker_error is not None:
        raise InputError(f"{label}: invalid ONNX model ({_first_line(checker_error)})")
    opset = default_opset(model)
    if not OLDEST_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"{label}: opset {opset} is not supported (supported: {OLDEST_OPSET} to {MAX_OPSET}; "
                         f"below {MIN_OPSET} upgraded to {MIN_OPSET})")
    refused = _ort_refuses_opset(opset)
    if refused:
        raise InputError(f"{label}: opset {opset} is newer than this onnxruntime runs ({refused})")
    if _uses_bfloat16(model):
        try:
            Runner(ModelData(model, {}), "cpu", optimization="disable")
        except Exception as exc:
            reason = _first_line(exc).split("Type Error: ")[-1]
            raise InputError(f"{label}: bfloat16 model that onnxruntime cannot run ({reason}); "
                             "convert it to float16 or float32") from None
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS or node.domain == "com.microsoft" and node.op_type.startswith("QLinear"):
            raise InputError(
                f"{label}: quantized graph ({node.op_type} at node '{node.name}'); aofp-onnx prunes float models, "
                "prune before quantizing")


@functools.cache
def _ort_refuses_opset(opset: int) -> str:
    """'' when onnxruntime builds a one-Relu session at `opset`, else the reason it gives."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "opset", [x], [y])
    try:
        Runner(ModelData(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                                ir_version=8), {}), "cpu")
    except Exception as exc:
        text = str(exc)
        return next((part.strip() for part in text.split(". ") if "support" in part and "till opset" in part),
                    _first_line(exc))
    return ""


def _uses_bfloat16(model: onnx.ModelProto) -> bool:
    """Whether a graph input/output, initializer, value_info, Constant or Cast of `model` is bfloat16."""
    bf16 = onnx.TensorProto.BFLOAT16
    g = model.graph
    if any(i.data_type == bf16 for i in g.initializer):
        return True
    if any(v.type.tensor_type.elem_type == bf16 for v in [*g.input, *g.output, *g.value_info]):
        return True
    for node in g.node:
        for a in node.attribute:
            if a.name == "to" and a.i == bf16 or a.type == onnx.AttributeProto.TENSOR and a.t.data_type == bf16:
                return True
    return False


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def input_dims(value_info: onnx.ValueInfoProto) -> list:
    """Dims of a graph input: ints where fixed, the symbol (or None) where dynamic (Paddle's -1 too)."""
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None))
    return dims


def fixed_input_shapes(model: onnx.ModelProto, given: dict[str, tuple[int, ...]] | None) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for the graph inputs: `given` where named, static dims, and 1 for a dynamic batch dim."""
    given = dict(given or {})
    inits = {i.name for i in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = input_dims(vi)
        if vi.name in given:
            shape = tuple(given.pop(vi.name))
            if len(shape) != len(dims):
                raise InputError(f"--input-shape {vi.name}: rank {len(shape)} but the model input has rank {len(dims)}")
            for axis, (want, got) in enumerate(zip(dims, shape)):
                if isinstance(want, int) and want > 0 and want != got:
                    raise InputError(f"--input-shape {vi.name}: dim {axis} is fixed to {want} in the model, got {got}")
            shapes[vi.name] = shape
            continue
        shape = []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif axis == 0:
                shape.append(1)
            else:
                raise InputError(f"input '{vi.name}' has dynamic dim {axis} ({d or '?'}): pass "
                                 + shape_hint(vi.name, dims))
        shapes[vi.name] = tuple(shape)
    if given:
        raise InputError(f"--input-shape names unknown input(s) {sorted(given)}; the model's inputs are "
                         f"{[n for n in shapes]}")
    return shapes


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """Copy of `model` with its inputs' dims set to `shapes` and stale value_info dropped."""
    model = copy_model(model)
    for vi in model.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, value in zip(dims, shapes[vi.name]):
                d.Clear()
                d.dim_value = int(value)
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    return model


def infer_shapes(model: onnx.ModelProto, weights: dict | None = None,
                 dtypes: dict[str, int] | None = None) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor: onnx shape inference (data propagation on), then onnxruntime for the rest.

    `dtypes`, when given, receives every tensor's element type (onnx.TensorProto.FLOAT, FLOAT16, ...)."""
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = model
    shapes: dict[str, tuple[int, ...]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") and d.dim_value >= 0 for d in tt.shape.dim):
            shapes[vi.name] = tuple(d.dim_value for d in tt.shape.dim)
        if dtypes is not None and tt.elem_type:
            dtypes[vi.name] = tt.elem_type
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
        if dtypes is not None:
            dtypes[init.name] = init.data_type
    missing = [o for n in g.node for o in n.output if o and o not in shapes]
    missing += [o for n in g.node for o in n.output if dtypes is not None and o and o not in dtypes]
    if missing:
        for name, value in probe_values(model, list(dict.fromkeys(missing)), weights).items():
            shapes[name] = tuple(value.shape)
            if dtypes is not None:
                dtypes[name] = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    return shapes


def probe_values(model: onnx.ModelProto, names: list[str], weights: dict | None = None) -> dict[str, np.ndarray]:
    """Values of tensors `names` from one onnxruntime run of `model` on zeros ({} when it cannot run)."""
    probe = copy_model(model)
    have = {o.name for o in probe.graph.output}
    for name in names:
        if name not in have:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    feeds = {}
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = np.zeros([d.dim_value for d in vi.type.tensor_type.shape.dim], dtype)
    try:
        values = Runner(ModelData(probe, weights or {}), "cpu", optimization="disable").run(feeds, names)
    except Exception:
        return {}
    return {n: v for n, v in zip(names, values) if isinstance(v, np.ndarray)}


@dataclass
class Graph:
    """The working model plus what the analysis reads from it: initializers, producers, consumers, shapes."""

    model: onnx.ModelProto  # light: large initializers are placeholders for `weights`
    input_shapes: dict[str, tuple[int, ...]]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    view: onnx.ModelProto | None = None  # the shape view (fixed input dims)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)  # element type of every tensor (onnx.TensorProto.*)

    def __post_init__(self):
        g = self.model.graph
        self.nodes = list(g.node)
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in self.nodes:
            for k, name in enumerate(n.input):
                if name:
                    self.consumers.setdefault(name, []).append((n, k))
        self.outputs = [o.name for o in g.output]
        self.inputs = [i.name for i in g.input if i.name not in self.inits]
        self.opset = default_opset(self.model)
        first = next(iter(self.input_shapes.values()), (1,))
        self.batch = int(first[0]) if first else 1  # MACs are reported per sample
        self._arrays: dict[str, np.ndarray] = {}

    @classmethod
    def from_model(cls, model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> "Graph":
        """The working graph of `model` (which it takes over: folded and split in place)."""
        data = split_weights(fold_constants(model))
        fixed = fixed_input_shapes(data.proto, input_shapes)
        view = with_input_shapes(data.proto, fixed)
        dtypes: dict[str, int] = {}
        shapes = infer_shapes(view, data.weights, dtypes)
        return cls(data.proto, fixed, shapes, view, data.weights, dtypes)

    @property
    def data(self) -> ModelData:
        return ModelData(self.model, self.weights)

    def array(self, name: str) -> np.ndarray | None:
        """The value of an initializer (cached), or None when `name` is not one."""
        if name in self.weights:
            return self.weights[name]
        if name not in self.inits:
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.inits[name])
        return self._arrays[name]

    def assign(self, values: dict[str, np.ndarray]) -> None:
        """Replace initializer values in place (same names, shapes and dtypes), dropping cached arrays.

        Large arrays are replaced in `weights` (a dict the masked and trial models share), small ones in the proto."""
        for name, value in values.items():
            init = self.inits[name]
            if name in self.weights:
                self.weights[name] = np.array(value, dtype=self.weights[name].dtype)
            else:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
                init.CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
            self._arrays.pop(name, None)

    def value(self, name: str) -> np.ndarray | None:
        """A constant, or a computed tensor's value at the analysis shapes (one onnxruntime run, cached)."""
        found = self.array(name)
        if found is None and self.view is not None:
            if name not in self._arrays:
                self._arrays[name] = probe_values(self.view, [name], self.weights).get(name)
            found = self._arrays[name]
        return found

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.shapes.get(name)

    def dtype(self, name: str) -> int:
        """Element type of tensor `name` (onnx.TensorProto.FLOAT when unknown)."""
        return self.dtypes.get(name, onnx.TensorProto.FLOAT)

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)

    def fingerprint(self) -> str:
        """sha256 of the graph's structure (ops, wiring, attributes, initializer names/shapes/types), not its values."""
        h = hashlib.sha256()
        g = self.model.graph
        h.update(str(self.opset).encode())
        for vi in g.input:
            h.update(vi.name.encode())
        for n in g.node:
            h.update(f"{n.domain}:{n.op_type}|{','.join(n.input)}|{','.join(n.output)}".encode())
            for a in n.attribute:
                h.update(a.SerializeToString())
        for i in sorted(g.initializer, key=lambda t: t.name):
            h.update(f"{i.name}:{i.data_type}:{list(i.dims)}".encode())
        return h.hexdigest()[:16]
