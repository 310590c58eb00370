"""Recovery after the cut: re-fit the consumers whose inputs lost channels, by least squares.

A *consumer* is a channel sink (Conv with group=1, Gemm, MatMul with a constant weight) whose input
tensor lost channels in the cut. For consumer n, with X the input it receives in the pruned model (kept
channels only) and Y the output of n in the ORIGINAL model (restricted to n's kept output channels), its
weight M' and intercept β are the ridge least-squares map from the patches of X to Y (`lstsq.fit`). β
is written to the consumer's own bias (Conv B, Gemm C/beta), or, for a consumer without one, to the
constant that adds a per-channel bias right after it (the mean of a following BatchNormalization:
mean' = mean − β; the constant of a following Add: c' = c + β). With neither, the fit has no intercept
(and a fixed bias the node has but may not change is subtracted from the target). The intercept is what
captures the removed channels' mean contribution, which dominates the damage on BN-folded nets.

Consumers are fitted in graph order, in *waves*: a wave is every pending consumer that no other pending
consumer feeds. Per wave the pruned model is run with the waves before it already reconstructed, so X is
what the consumer will really see (errors do not compound); Y comes from the original model.

Reported per consumer (on the calibration samples used, over all positions):
error_before = ‖Y_n − Y‖² / ‖Y‖² with the cut weights, error_after the same with the fitted ones. A fit
that does not lower the error is not written (error_after = error_before, with a note); so
error_after ≤ error_before always. Grouped and depthwise convolutions and ConvTranspose are skipped with a
reason (a depthwise filter reads a single input channel: there is no cross-channel freedom to re-fit).

Requires: the cut model of `surgery.cut` (same nodes in the same order as the working graph).
Ensures: only initializer values change — names, shapes, dtypes, nodes, opset and metadata are the cut's.
The core invariant (masked original ≡ pruned) holds for the cut, not for the reconstructed model: verify
the cut first, then reconstruct. The result is checked with onnx.checker (full check) and a run.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .calib import Data
from .channels.attrs import attr
from .errors import VerificationError
from .modeldata import ModelData, is_placeholder
from .groups import ChannelMap, subgraph_reads
from .lstsq import POSITIONS, RIDGE, Layer, fit
from .runtime import Runner

SAMPLES = 256  # calibration samples used
FAST_BYTES = 256 << 20  # models with at most this many bytes of weights run fully optimized (a copy)


class _Model:
    """The pruned model being rewritten: initializer values by name, replaceable without touching the graph."""

    def __init__(self, data: ModelData):
        self.proto = data.copy_proto()
        self.weights = dict(data.weights)
        self.index = {init.name: k for k, init in enumerate(self.proto.graph.initializer)}
        self.readers: dict[str, int] = {}
        for n in self.proto.graph.node:
            for name in [*n.input, *subgraph_reads(n)]:
                self.readers[name] = self.readers.get(name, 0) + 1
        self.graph_outputs = {o.name for o in self.proto.graph.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in self.proto.graph.node:
            for k, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, k))

    def array(self, name: str) -> np.ndarray | None:
        """An initializer's value: the weights' array for a placeholder (a stale entry of `weights` for an
        inline initializer is ignored), the proto's data otherwise."""
        k = self.index.get(name)
        if k is None:
            return None
        init = self.proto.graph.initializer[k]
        return self.weights[name] if is_placeholder(init) else numpy_helper.to_array(init)

    def set(self, name: str, value: np.ndarray) -> None:
        old = self.array(name)
        if old is None or old.shape != value.shape:
            have = None if old is None else old.shape
            raise ValueError(f"initializer '{name}': cannot write shape {value.shape} over {have}")
        value = np.ascontiguousarray(value.astype(old.dtype))
        init = self.proto.graph.initializer[self.index[name]]
        if is_placeholder(init):
            self.weights[name] = value  # a new array: the cut shares unchanged arrays with the original
        else:
            init.CopyFrom(numpy_helper.from_array(value, name))

    def writable(self, name: str) -> bool:
        """An initializer only this one node input reads."""
        return name in self.index and self.readers.get(name, 0) == 1

    @property
    def data(self) -> ModelData:
        return ModelData(self.proto, self.weights)


def _describe(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _layer(ni: int, node: onnx.NodeProto, model: _Model) -> Layer | str:
    """The consumer as a Layer, or why it is skipped."""
    op = node.op_type
    if op == "ConvTranspose":
        return "ConvTranspose is not reconstructed"
    if op == "Conv":
        group = int(attr(node, "group", 1))
        if group > 1:
            return f"grouped convolution (group={group}): channels mix only within a group; not reconstructed"
        kind, out_axis = "conv", 1
    elif op == "Gemm":
        if float(attr(node, "alpha", 1.0)) == 0.0:
            return "Gemm with alpha=0"
        kind, out_axis = "gemm", 1
    elif op == "MatMul":
        kind, out_axis = "matmul", -1
    else:
        return f"{op} is not reconstructed"
    w = node.input[1]
    if not model.writable(w):
        return f"weight '{w}' is not an initializer read by this node alone"
    layer = Layer(ni, node, kind, out_axis)
    has_bias = kind in ("conv", "gemm") and len(node.input) > 2 and bool(node.input[2])
    if has_bias:
        b = node.input[2]
        value = model.array(b)
        n_out = layer.matrix(model.array(w)).shape[0]
        if value is None:
            return f"bias '{b}' is not a constant initializer"
        if value.size not in (1, n_out):
            return f"bias '{b}' of shape {list(value.shape)} is not one value per output channel"
        beta = float(attr(node, "beta", 1.0)) if kind == "gemm" else 1.0
        if model.writable(b) and value.size == n_out and beta != 0.0:
            layer.bias, layer.bias_name = "own", b
        else:
            layer.fixed_bias = b
        return layer
    carrier = _carrier(node, layer, model)
    if carrier is not None:
        layer.bias, layer.bias_name = carrier
    return layer


def _carrier(node: onnx.NodeProto, layer: Layer, model: _Model) -> tuple[str, str] | None:
    """A per-channel constant right after a bias-less consumer that can take its intercept."""
    out = node.output[0]
    users = model.consumers.get(out, [])
    if out in model.graph_outputs or len(users) != 1:
        return None
    user, k = users[0]
    n_out = layer.matrix(model.array(node.input[1])).shape[0]
    if user.op_type == "BatchNormalization" and k == 0 and layer.kind in ("conv", "gemm") and len(user.input) >= 5:
        mean = user.input[3]
        value = model.array(mean)
        if model.writable(mean) and value is not None and value.size == n_out:
            return "BatchNormalization mean", mean
        return None
    if user.op_type == "Add" and len(user.input) == 2:
        const = user.input[1 - k]
        value = model.array(const)
        if value is None or not model.writable(const) or value.size != n_out:
            return None
        rank = 2 + (len(model.array(node.input[1]).shape) - 2 if layer.kind == "conv" else 0)
        if layer.kind != "conv":
            return ("Add constant", const) if value.shape[-1:] == (n_out,) else None
        shape = (1,) * (rank - value.ndim) + tuple(value.shape)
        if len(shape) == rank and shape[1] == n_out and all(s == 1 for i, s in enumerate(shape) if i != 1):
            return "Add constant", const
    return None


# --------------------------------------------------------------------------------------------------
# running the models

def _run(runner: Runner, data: Data, names: list[str], batch_size: int) -> list[np.ndarray]:
    parts = [runner.run(feeds, names) for feeds in data.batches(batch_size)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]


def _runner(model: ModelData, names: list[str], provider: str) -> Runner:
    """A session computing only `names`: the nodes they need, with those tensors as the graph outputs.

    Fully optimized for models up to FAST_BYTES of weights (several times faster on CPU); larger ones run
    unoptimized, on the caller's arrays in place (no copy of the weights)."""
    proto = model.copy_proto()
    graph = proto.graph
    needed, wanted = [], set(names)
    for node in reversed(graph.node):
        if any(o in wanted for o in node.output):
            needed.append(node)
            wanted.update(i for i in [*node.input, *subgraph_reads(node)] if i)
    used = {i for n in needed for i in [*n.input, *subgraph_reads(n)]}
    kept_inits = [i for i in graph.initializer if i.name in used]
    del graph.node[:]
    graph.node.extend(reversed(needed))
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.output[:]
    graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    del graph.value_info[:]
    weights = {k: v for k, v in model.weights.items() if k in used}
    small = sum(a.nbytes for a in weights.values()) <= FAST_BYTES
    return Runner(ModelData(proto, weights), provider, optimization="all" if small else "disable",
                  prepack=small, arena=False)


def _single_node(node: onnx.NodeProto, model: _Model, dtype: np.dtype) -> onnx.ModelProto:
    """A model of `node` alone: its constant inputs as initializers, its first input the graph input."""
    inits = [numpy_helper.from_array(model.array(name), name) for name in node.input[1:] if name]
    x = onnx.helper.make_tensor_value_info(node.input[0], onnx.helper.np_dtype_to_tensor_dtype(dtype), None)
    graph = onnx.helper.make_graph([node], "consumer", [x], [onnx.ValueInfoProto(name=node.output[0])], inits)
    return onnx.helper.make_model(graph, opset_imports=list(model.proto.opset_import),
                                  ir_version=model.proto.ir_version)


def _relative(y: np.ndarray, ref: np.ndarray) -> float:
    den = float(np.sum(np.square(ref, dtype=np.float64)))
    num = float(np.sum(np.square(y.astype(np.float64) - ref)))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def _waves(cmap: ChannelMap, pending: list[int]) -> list[list[int]]:
    """Split consumer node indices into waves: a wave holds every pending consumer no pending one feeds."""
    graph = cmap.graph
    downstream: dict[int, set[int]] = {}
    index = {id(n): k for k, n in enumerate(graph.nodes)}
    for ni in pending:
        seen, queue = set(), deque(o for o in graph.nodes[ni].output if o)
        while queue:
            for user, _ in graph.consumers.get(queue.popleft(), []):
                k = index[id(user)]
                if k not in seen:
                    seen.add(k)
                    queue.extend(o for o in user.output if o)
        downstream[ni] = seen
    waves, left = [], list(pending)
    while left:
        wave = [c for c in left if not any(c in downstream[p] for p in left if p != c)]
        waves.append(wave)
        left = [c for c in left if c not in wave]
    return waves


# --------------------------------------------------------------------------------------------------
# the pass

@dataclass
class Reconstruction:
    consumers: list[dict]
    seconds: float
    samples: int
    output_error: dict = field(default_factory=dict)  # graph outputs vs the original: cut and reconstructed
    checks: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"consumers": self.consumers, "seconds": self.seconds, "samples": self.samples,
                "output_error": self.output_error, "checks": self.checks,
                "verification": "the report's 'verification' compares the CUT model (before reconstruction) with "
                                "the masked original; the reconstructed model differs from it by design and is "
                                "checked with onnx.checker (full check) and a run on the calibration data"}


def consumers(cmap: ChannelMap, keep: np.ndarray) -> list[int]:
    """Node indices, in graph order, of the sinks and grouped/depthwise Convs whose input lost channels."""
    def lost(tensor):
        return tensor in cmap.tensor_axis and len(cmap.kept_indices(tensor, keep)) < len(cmap.positions(tensor))

    found = {s.node_index for s in cmap.sinks if lost(s.tensor)}
    for ni, node in enumerate(cmap.graph.nodes):
        if node.op_type in ("Conv", "ConvTranspose") and int(attr(node, "group", 1)) > 1 and lost(node.input[0]):
            found.add(ni)
    return sorted(found)


def reconstruct(cmap: ChannelMap, keep: np.ndarray, pruned: ModelData, data: Data, *, provider: str = "auto",
                samples: int = SAMPLES, positions: int = POSITIONS, ridge: float = RIDGE, seed: int = 0,
                batch_size: int = 64) -> tuple[ModelData, Reconstruction]:
    """The cut model `pruned` with its affected consumers re-fitted (a new ModelData; `pruned` is not changed)."""
    start = time.perf_counter()
    data = data.take(samples)
    model = _Model(pruned)
    nodes = list(model.proto.graph.node)
    results: dict[int, dict] = {}
    layers: dict[int, Layer] = {}
    for ni in consumers(cmap, keep):
        node = nodes[ni]
        if node.op_type == "Conv" and int(attr(node, "group", 1)) > 1 and \
                model.array(node.input[1]) is not None and model.array(node.input[1]).shape[1] == 1:
            results[ni] = {"node": _describe(node), "skipped": "depthwise convolution: each filter reads one input "
                           "channel, there is no cross-channel freedom to re-fit (its filters were cut with them)"}
            continue
        layer = _layer(ni, node, model)
        if isinstance(layer, str):
            results[ni] = {"node": _describe(node), "skipped": layer}
        else:
            layers[ni] = layer
    outputs = [o.name for o in model.proto.graph.output]
    reference_out = _run(_runner(cmap.graph.data, outputs, provider), data, outputs, batch_size)
    cut_out = _run(_runner(pruned, outputs, provider), data, outputs, batch_size)
    for wave in _waves(cmap, sorted(layers)):
        y_names = [nodes[ni].output[0] for ni in wave]
        x_names = list(dict.fromkeys(nodes[ni].input[0] for ni in wave))
        y_orig = dict(zip(y_names, _run(_runner(cmap.graph.data, y_names, provider), data, y_names, batch_size)))
        names = x_names + y_names
        values = dict(zip(names, _run(_runner(model.data, names, provider), data, names, batch_size)))
        for ni in wave:
            results[ni] = _refit(layers[ni], model, cmap, keep, values, y_orig, provider=provider, positions=positions,
                                 ridge=ridge, seed=seed, batch_size=batch_size)
    result = model.data
    checks = {}
    try:
        result.check()
        checks["onnx_checker"] = True
    except Exception as exc:
        raise VerificationError("the reconstructed model fails onnx.checker: "
                                f"{str(exc).splitlines()[0][:300]}") from None
    final_out = _run(_runner(result, outputs, provider), data, outputs, batch_size)
    checks["ran"] = all(np.all(np.isfinite(o)) for o in final_out)
    if not checks["ran"]:
        raise VerificationError("the reconstructed model produces non-finite outputs on the calibration data")
    output_error = {
        "cut": float(np.mean([_relative(c, r) for c, r in zip(cut_out, reference_out)])),
        "reconstructed": float(np.mean([_relative(c, r) for c, r in zip(final_out, reference_out)])),
    }
    return result, Reconstruction([results[k] for k in sorted(results)], time.perf_counter() - start, len(data),
                                  output_error, checks)


def _refit(layer: Layer, model: _Model, cmap: ChannelMap, keep: np.ndarray, values: dict, y_orig: dict, *,
           provider: str, positions: int, ridge: float, seed: int, batch_size: int) -> dict:
    """Fit one consumer on its current input, write the new values when they lower its output error."""
    node = layer.node
    x, y_now = values[node.input[0]], values[node.output[0]]
    target = y_orig[node.output[0]]
    out = node.output[0]
    axis = layer.out_axis % target.ndim
    if out in cmap.tensor_axis and out not in cmap.graph.outputs:
        target = np.take(target, cmap.kept_indices(out, keep), axis=cmap.tensor_axis[out])
    entry = {"node": _describe(node)}
    if target.shape != y_now.shape:
        return {**entry, "skipped": f"output shape {list(y_now.shape)} differs from the original's kept "
                                    f"channels {list(target.shape)}"}
    w = model.array(layer.weight_name)
    n_out = target.shape[axis]
    fixed = np.zeros(n_out)
    if layer.fixed_bias is not None:
        fixed = layer.own_bias_vector(model.array(layer.fixed_bias).astype(np.float64), n_out)
    shape = [1] * target.ndim
    shape[axis] = n_out
    goal = target - fixed.reshape(shape) if layer.fixed_bias is not None else target
    intercept = layer.bias != "none"
    m, beta = fit(layer, x, goal, w.shape, intercept=intercept, positions=positions, ridge=ridge, seed=seed)
    before = _relative(y_now, target)
    # the new values, tried on the consumer alone (exact: onnxruntime runs the node with its attributes)
    saved = {layer.weight_name: w}
    model.set(layer.weight_name, layer.weight(m, w))
    shift = 0.0
    if layer.bias == "own":
        saved[layer.bias_name] = model.array(layer.bias_name)
        value = beta / (float(attr(node, "beta", 1.0)) if layer.kind == "gemm" else 1.0)
        model.set(layer.bias_name, value.reshape(saved[layer.bias_name].shape))
    elif intercept:
        shift = beta.reshape(shape)
    single = Runner(_single_node(node, model, x.dtype), provider)
    y_new = np.concatenate([single.run({node.input[0]: x[s:s + batch_size]})[0]
                            for s in range(0, len(x), batch_size)]) + shift
    after = _relative(y_new, target)
    entry.update(error_before=before, error_after=after, bias=layer.bias)
    if not after < before:
        for name, value in saved.items():
            model.set(name, value)
        entry.update(error_after=before, note="the fit did not lower the error; the cut weights are kept")
        return entry
    if layer.bias != "own" and intercept:
        carrier = model.array(layer.bias_name)
        delta = beta.reshape(carrier.shape)
        model.set(layer.bias_name, carrier - delta if layer.bias.startswith("BatchNormalization") else carrier + delta)
    return entry
