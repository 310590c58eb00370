"""The multi-path trial graph: one onnxruntime session scores every group's trial at once.

Inputs: the model's inputs, `aofp_keep` [1, S+1] (the current kept set K) and `aofp_trial` [B, S+1]
(per batch row, 0 on the channels R that row's trial removes, 1 elsewhere; column S is always 1).
The base path is the model masked by K at every sink. For each prunable group g and each sink node n
of g reading tensor T, a copy of n (same initializers, no weight copies) reads
T·K·trial[:, idx_g(T)], where idx_g keeps only g's slots (others point at the always-1 column), so
the copy sees exactly "K with R_g also removed". With Y = n's base output and Y_R the copy's:

    num_g[b] = Σ_n ‖Y_n[b] − Y_R,n[b]‖²,   den_g[b] = Σ_n ‖Y_n[b] − bias_n‖²

are the outputs `aofp_damage_num` / `aofp_damage_den`, both [B, G]. Several trials are stacked along
the batch axis (the calibration batch tiled, each tile with its own trial rows); the damage of one
trial is Σ_b num / Σ_b den over its tile — the paper's Σ(base − ablated)² / Σ base² at the next layer.
The consumer's own bias (Conv/ConvTranspose B, Gemm C) is left out of the base energy: with BN folded
into the conv that bias is the folded BN shift, which would dilute every damage by a constant the
channels have no part in (it cancels in the numerator anyway).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .graph import ModelData
from .groups import ChannelMap
from .masking import KEEP_INPUT, MaskInserter, mask_input

TRIAL_INPUT = "aofp_trial"
NUM_OUTPUT, DEN_OUTPUT = "aofp_damage_num", "aofp_damage_den"


def _sq_norm(x: str, out: str, prefix: str) -> list[onnx.NodeProto]:
    """out[b, 0] = Σ x[b, ...]²  (Flatten then ReduceSumSquare over axis 1; axes as attribute or input)."""
    flat = f"{prefix}_flat"
    return [helper.make_node("Flatten", [x], [flat], axis=1, name=f"{prefix}_flatten"),
            helper.make_node("ReduceSumSquare", [flat], [out], axes=[1], keepdims=1, name=f"{prefix}_rss")]


def build_trial_model(cmap: ChannelMap) -> ModelData:
    """The trial graph of `cmap`'s model (see the module docstring); its only outputs are the damages."""
    src = cmap.graph.model
    opset = cmap.graph.opset
    model = onnx.ModelProto()
    model.CopyFrom(src)
    graph = model.graph
    keep = MaskInserter(cmap, KEEP_INPUT, "aofp_k")
    trial = MaskInserter(cmap, TRIAL_INPUT, "aofp_t")
    by_node: dict[int, list] = {}
    for s in cmap.sinks:
        if any(g.prunable for g in cmap.groups_of_tensor.get(s.tensor, [])):
            by_node.setdefault(s.node_index, []).append(s)
    group_terms: dict[str, tuple[list[str], list[str]]] = {g.id: ([], []) for g in cmap.prunable}
    nodes: list[onnx.NodeProto] = []
    extra = 0
    for ni, node in enumerate(graph.node):
        sinks = by_node.get(ni, [])
        masked_inputs = {}
        for s in sinks:
            masked_inputs[s.input_index] = keep.masked(s.tensor)
            node.input[s.input_index] = masked_inputs[s.input_index]
        nodes.extend(keep.take_nodes())
        nodes.append(node)
        for s in sinks:
            pos = cmap.positions(s.tensor)
            for g in cmap.groups_of_tensor.get(s.tensor, []):
                if not g.prunable:
                    continue
                idx = np.where((pos >= g.offset) & (pos < g.offset + g.width), pos, cmap.n_slots)
                trial_in = trial.masked(s.tensor, idx, source=masked_inputs[s.input_index])
                nodes.extend(trial.take_nodes())
                base = f"aofp_c{extra}"
                extra += 1
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.name = f"{base}_{node.op_type}"
                copy.input[s.input_index] = trial_in
                del copy.output[:]
                copy.output.extend([f"{base}_y"])
                nodes.append(copy)
                nodes.append(helper.make_node("Sub", [node.output[0], f"{base}_y"], [f"{base}_d"], name=f"{base}_sub"))
                nodes.extend(_sq_norm(f"{base}_d", f"{base}_num", f"{base}_n"))
                response = _without_bias(cmap, node, base, nodes, graph)
                nodes.extend(_sq_norm(response, f"{base}_den", f"{base}_b"))
                group_terms[g.id][0].append(f"{base}_num")
                group_terms[g.id][1].append(f"{base}_den")
    nums, dens = [], []
    for k, g in enumerate(cmap.prunable):
        num_terms, den_terms = group_terms[g.id]
        for terms, out, acc in ((num_terms, f"aofp_g{k}_num", nums), (den_terms, f"aofp_g{k}_den", dens)):
            if not terms:  # a group without sinks is free to remove: zero damage over a unit base
                terms = [_constant_like(nodes, out, 0.0 if acc is nums else 1.0, graph)]
            nodes.append(helper.make_node("Sum", terms, [out], name=f"{out}_sum"))
            acc.append(out)
    nodes.append(helper.make_node("Concat", nums, [NUM_OUTPUT], axis=1, name="aofp_num_concat"))
    nodes.append(helper.make_node("Concat", dens, [DEN_OUTPUT], axis=1, name="aofp_den_concat"))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(keep.inits + trial.inits)
    graph.input.extend([mask_input(KEEP_INPUT, cmap.n_slots), mask_input(TRIAL_INPUT, cmap.n_slots)])
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["batch", len(nums)])
                         for n in (NUM_OUTPUT, DEN_OUTPUT)])
    del graph.value_info[:]
    _drop_dead_nodes(graph)
    if opset >= 18:  # ReduceSumSquare takes axes as an input from opset 18
        _add_axes_initializer(graph)
    return ModelData(model, cmap.graph.weights)


def _without_bias(cmap: ChannelMap, node: onnx.NodeProto, base: str, nodes: list, graph) -> str:
    """The consumer's output minus its constant bias (Conv/ConvTranspose input 2, Gemm input 2), if any."""
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return node.output[0]
    bias = cmap.graph.array(node.input[2])
    out_shape = cmap.graph.shape(node.output[0])
    if bias is None or out_shape is None:
        return node.output[0]
    shape = [1] * len(out_shape)
    shape[1 if node.op_type != "Gemm" else -1] = -1
    if bias.ndim > 1 or bias.size not in (1, out_shape[1 if node.op_type != "Gemm" else -1]):
        return node.output[0]
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(shape, np.int64), f"{base}_bshape"))
    nodes.append(helper.make_node("Reshape", [node.input[2], f"{base}_bshape"], [f"{base}_bias"], name=f"{base}_breshape"))
    nodes.append(helper.make_node("Sub", [node.output[0], f"{base}_bias"], [f"{base}_resp"], name=f"{base}_bsub"))
    return f"{base}_resp"


def _constant_like(nodes, name, value, graph):
    """A [B, 1] tensor of `value`, B taken from the trial mask's batch (for groups with no sink)."""
    shape_name = f"{name}_shape"
    nodes.append(helper.make_node("Shape", [TRIAL_INPUT], [shape_name], end=1, name=f"{name}_shape_node"))
    nodes.append(helper.make_node("Concat", [shape_name, "aofp_one_i64"], [f"{name}_dims"], axis=0,
                                  name=f"{name}_dims_node"))
    nodes.append(helper.make_node("ConstantOfShape", [f"{name}_dims"], [f"{name}_c"],
                                  value=onnx.numpy_helper.from_array(np.array([value], np.float32)),
                                  name=f"{name}_const"))
    if not any(i.name == "aofp_one_i64" for i in graph.initializer):
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "aofp_one_i64"))
    return f"{name}_c"


def _add_axes_initializer(graph: onnx.GraphProto) -> None:
    """Opset ≥ 18: move ReduceSumSquare's `axes` attribute of our nodes to an input."""
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "aofp_axes1"))
    for node in graph.node:
        if node.op_type == "ReduceSumSquare" and node.name.startswith("aofp_"):
            for k, a in enumerate(node.attribute):
                if a.name == "axes":
                    del node.attribute[k]
                    break
            node.input.append("aofp_axes1")


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
