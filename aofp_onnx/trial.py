"""The multi-path trial graph: one onnxruntime session scores every group's trial at once.

Inputs: the model's inputs (a calibration batch of N samples), `aofp_keep` [1, S+1] (the current kept
set K) and `aofp_trial` [T, S+1] (one row per trial: 0 on the channels R it removes, 1 elsewhere;
column S is always 1). The base path is the model masked by K at every sink, run once for all T
trials. For each prunable group g and each sink node n of g reading tensor X, a copy of n (same
initializers, no weight copies) reads the base's K-masked X broadcast against the T trial masks,
X·trial[t, idx_g(X)] for t < T, stacked to a batch of T·N (idx_g keeps only g's slots; the others
point at the always-1 column), so row block t sees exactly "K with R_g,t also removed". As in the
reference implementation, the damage is read after the consumer's own post-processing: the copy
follows n's output through the chain of single-consumer elementwise ops behind it (BatchNormalization,
activations, per-channel affine with constants) and the chain's end Z is masked by K where it carries
channels (the consumer's own removed filters do not count). With Z_n the base chain end of consumer n
[N, ..] and Z_R,n the copy's [T, N, ..], each consumer's relative error is summed:

    t_g[t] = Σ_n ‖(Z_n − Z_R,n[t])·K‖² / ‖Z_n·K‖²   (norms over the whole batch)

(in float32: a float16 model's trial masks are cast to its type, its Z to float32), the output `aofp_damage` [T, G] — the paper's Σ(base − ablated)² / Σ base² at each next layer. With
one consumer (the paper's setting) that is its relative error. A group read by several consumers (a
residual stream, a concat, a split) adds theirs: pooling their squares into one ratio instead would
weight each consumer by its output energy, so a large conv drowns a small head — the stage-3 stream of
a ResNet-20 feeds two convs and the classifier, and with pooled ratios AOFP removed 38 of its 128
channels where the oracle removes 9 (benchmarks/aofp_vs_oracle.py, slimmed network). Cost of one run:
one base forward on N samples plus T forwards of the consumers, instead of T full forwards.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .modeldata import ModelData
from .groups import ChannelMap
from .masking import KEEP_INPUT, MaskInserter, cast_to, mask_input

TRIAL_INPUT = "aofp_trial"
DAMAGE_OUTPUT = "aofp_damage"
DAMAGE_AT = ("next", "block", "output")  # where a trial's damage is read (block, output: `trial_downstream`)
TINY = 1e-30  # floor of a consumer's base energy: a consumer silent on the batch adds 0/TINY
INT64_MAX = np.iinfo(np.int64).max
# ops a consumer's damage is read through (elementwise; other inputs must be constants)
CHAIN_OPS = {"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
             "Celu", "Gelu", "Mish", "Softplus", "BatchNormalization", "Mul", "Add", "Sub", "Div", "Identity"}


class _Builder:
    """Nodes and constants of the trial paths, with per-tensor helpers built once."""

    def __init__(self, cmap: ChannelMap, graph: onnx.GraphProto):
        self.cmap = cmap
        self.graph = graph
        self.opset = cmap.graph.opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._cache: dict[tuple, str] = {}
        self.const("aofp_zero", np.array([0], np.int64))
        self.const("aofp_one", np.array([1], np.int64))
        self.const("aofp_minus_one", np.array([-1], np.int64))
        self.const("aofp_int_max", np.array([INT64_MAX], np.int64))
        self.const("aofp_tiny", np.array(TINY, np.float32))

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(onnx.numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def unsqueeze0(self, x: str) -> str:
        """x[None]: opset ≥ 13 takes axes as an input."""
        key = ("unsqueeze", x)
        if key not in self._cache:
            out = f"{x}__u0"
            if self.opset >= 13:
                self.node("Unsqueeze", [x, "aofp_zero"], out)
            else:
                self.node("Unsqueeze", [x], out, axes=[0])
            self._cache[key] = out
        return self._cache[key]

    def shape_with_lead(self, x: str, drop_first: bool) -> str:
        """[-1] + shape(x)[1:] (drop_first) or [-1] + shape(x): reshape targets that fold/unfold trials."""
        key = ("shape", x, drop_first)
        if key not in self._cache:
            if ("shape", x) not in self._cache:
                self._cache[("shape", x)] = self.node("Shape", [x], f"{x}__shape")
            shape = self._cache[("shape", x)]
            if drop_first:
                shape = self.node("Slice", [shape, "aofp_one", "aofp_int_max"], f"{x}__tail")
            self._cache[key] = self.node("Concat", ["aofp_minus_one", shape], f"{x}__lead{int(drop_first)}", axis=0)
        return self._cache[key]

    def sq_norm(self, x: str, out: str, axis: int) -> str:
        """Σ of squares of x flattened from `axis` on: [T, 1] for axis 1, [1, 1] for axis 0."""
        flat = self.node("Flatten", [x], f"{out}_flat", axis=axis)
        if self.opset >= 18:  # ReduceSumSquare takes axes as an input from opset 18
            return self.node("ReduceSumSquare", [flat, "aofp_one"], out, keepdims=1)
        return self.node("ReduceSumSquare", [flat], out, axes=[1], keepdims=1)

    def trial_mask(self, tensor: str, idx: np.ndarray, base: str, source: str = TRIAL_INPUT) -> str:
        """source[:, idx] reshaped to [T, 1, .., C, ..] (C at the tensor's channel axis + 1)."""
        rank = len(self.cmap.graph.shape(tensor))
        axis = self.cmap.tensor_axis[tensor]
        shape = [1] * (rank + 1)
        shape[0], shape[axis + 1] = 0, len(idx)
        self.const(f"{base}_idx", idx.astype(np.int64))
        self.const(f"{base}_mshape", np.array(shape, np.int64))
        gathered = self.node("Gather", [source, f"{base}_idx"], f"{base}_g", axis=1)
        return self.node("Reshape", [gathered, f"{base}_mshape"], f"{base}_m")

    def as_float(self, x: str, tensor: str) -> str:
        """x (typed like `tensor`) in float32: damages are summed in float32 whatever the model's type."""
        if self.cmap.graph.dtype(tensor) == onnx.TensorProto.FLOAT:
            return x
        key = ("float", x)
        if key not in self._cache:
            self._cache[key] = self.node("Cast", [x], f"{x}__f32", to=onnx.TensorProto.FLOAT)
        return self._cache[key]


def build_trial_model(cmap: ChannelMap, groups: list[str] | None = None, damage_at: str = "next") -> ModelData:
    """The trial graph of `cmap`'s model (see the module docstring); its only outputs are the damages.

    `groups`: score only these group ids (the outputs then have one column per listed group);
    `damage_at`: 'next' (this module), 'block' or 'output' (`trial_downstream`)."""
    chosen = [g for g in cmap.prunable if groups is None or g.id in groups]
    if damage_at != "next":
        from .trial_downstream import build_downstream_trial_model  # it builds on this module's helpers

        return build_downstream_trial_model(cmap, chosen, damage_at)
    model = onnx.ModelProto()
    model.CopyFrom(cmap.graph.model)
    graph = model.graph
    keep = MaskInserter(cmap, KEEP_INPUT, "aofp_k")
    b = _Builder(cmap, graph)
    by_node: dict[int, list] = {}
    for s in cmap.sinks:
        if any(g.prunable for g in cmap.groups_of_tensor.get(s.tensor, [])):
            by_node.setdefault(s.node_index, []).append(s)
    terms: dict[str, list[str]] = {g.id: [] for g in chosen}  # per group, its consumers' relative errors [T, 1]
    nodes: list[onnx.NodeProto] = []
    pending: dict[str, list[onnx.NodeProto]] = {}  # trial nodes that wait for the end of a consumer's chain
    extra = 0
    for ni, node in enumerate(graph.node):
        sinks = by_node.get(ni, [])
        masked = {}
        for s in sinks:
            masked[s.input_index] = keep.masked(s.tensor)
            node.input[s.input_index] = masked[s.input_index]
        nodes.extend(keep.take_nodes())
        nodes.append(node)
        nodes.extend(pending.pop(node.output[0], []))
        for s in sinks:
            pos = cmap.positions(s.tensor)
            x = masked[s.input_index]
            for g in cmap.groups_of_tensor.get(s.tensor, []):
                if g.id not in terms:
                    continue
                base = f"aofp_c{extra}"
                extra += 1
                idx = np.where((pos >= g.offset) & (pos < g.offset + g.width), pos, cmap.n_slots)
                trial = cast_to(b.nodes, b.trial_mask(s.tensor, idx, base), cmap.graph.dtype(s.tensor))
                stacked = b.node("Mul", [b.unsqueeze0(x), trial], f"{base}_x")
                flat = b.node("Reshape", [stacked, b.shape_with_lead(x, drop_first=True)], f"{base}_xf")
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.name = f"{base}_{node.op_type}"
                copy.input[s.input_index] = flat
                del copy.output[:]
                copy.output.append(f"{base}_yf")
                b.nodes.append(copy)
                z, z_r = node.output[0], f"{base}_yf"
                for step, follower in enumerate(_chain(cmap, node)):
                    follow = onnx.NodeProto()
                    follow.CopyFrom(follower)
                    follow.name = f"{base}_chain{step}"
                    follow.input[0] = z_r
                    del follow.output[:]
                    follow.output.append(f"{base}_chain{step}_out")
                    b.nodes.append(follow)
                    z, z_r = follower.output[0], f"{base}_chain{step}_out"
                z_r = b.node("Reshape", [z_r, b.shape_with_lead(z, drop_first=False)], f"{base}_y")
                diff = b.node("Sub", [b.as_float(z_r, z), b.as_float(b.unsqueeze0(z), z)], f"{base}_d")
                ref = b.as_float(z, z)
                if z in cmap.tensor_axis:  # the consumer's own removed filters do not count
                    own = b.trial_mask(z, cmap.positions(z), f"{base}_own", source=KEEP_INPUT)
                    diff = b.node("Mul", [diff, own], f"{base}_dm")
                    ref = b.node("Mul", [b.as_float(b.unsqueeze0(z), z), own], f"{base}_zm")
                num = b.sq_norm(diff, f"{base}_num", axis=1)
                den = b.node("Max", [b.sq_norm(ref, f"{base}_den", axis=0), "aofp_tiny"], f"{base}_den_safe")
                terms[g.id].append(b.node("Div", [num, den], f"{base}_t"))
                pending.setdefault(z, []).extend(b.nodes)
                b.nodes = []
        nodes.extend(pending.pop(node.output[0], []))
    damages = []
    for k, g in enumerate(chosen):
        # a group without sinks is free to remove: zero damage
        damages.append(b.node("Sum", terms[g.id], f"aofp_g{k}_t") if terms[g.id] else _zeros_per_trial(b, f"aofp_g{k}"))
    return finish_trial_model(model, cmap, nodes, b, keep, damages)


def finish_trial_model(model: onnx.ModelProto, cmap: ChannelMap, nodes: list, b: _Builder, keep: MaskInserter,
                       damages: list[str]) -> ModelData:
    """`model` rewired as a trial graph: `nodes` then the builder's, the mask inputs, and one output
    `DAMAGE_OUTPUT` [T, G] concatenating the per-group damages; nodes no output needs are dropped."""
    graph = model.graph
    b.node("Concat", damages, DAMAGE_OUTPUT, axis=1)
    del graph.node[:]
    graph.node.extend(list(nodes) + b.nodes)
    graph.initializer.extend(keep.inits + b.inits)
    graph.input.extend([mask_input(KEEP_INPUT, cmap.n_slots), mask_input(TRIAL_INPUT, cmap.n_slots)])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(DAMAGE_OUTPUT, onnx.TensorProto.FLOAT, ["trials", len(damages)]))
    del graph.value_info[:]
    _drop_dead_nodes(graph)
    return ModelData(model, cmap.graph.weights)


def _zeros_per_trial(b: _Builder, name: str) -> str:
    """A [T, 1] tensor of zeros, T taken from the trial mask."""
    rows = b.node("Shape", [TRIAL_INPUT], f"{name}_rows_full")
    rows = b.node("Slice", [rows, "aofp_zero", "aofp_one"], f"{name}_rows")
    dims = b.node("Concat", [rows, "aofp_one"], f"{name}_dims", axis=0)
    return b.node("ConstantOfShape", [dims], f"{name}_zeros",
                  value=onnx.numpy_helper.from_array(np.array([0.0], np.float32)))


def _chain(cmap: ChannelMap, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The single-consumer elementwise ops behind `node` (BN, activation, constant affine), in order."""
    chain = []
    tensor = node.output[0]
    while tensor not in cmap.graph.outputs:
        readers = cmap.graph.consumers.get(tensor, [])
        if len(readers) != 1:
            break
        follower, index = readers[0]
        if follower.op_type not in CHAIN_OPS or index != 0 or follower.domain not in ("", "ai.onnx"):
            break
        if any(name and cmap.graph.array(name) is None for name in follower.input[1:]):
            break
        if len([o for o in follower.output if o]) != 1:
            break
        chain.append(follower)
        tensor = follower.output[0]
    return chain


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes no graph output depends on (the model's own heads, when not needed for damage)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
