"""The masked original: the working model with a keep mask multiplied in at every channel sink.

A graph input `aofp_keep` of shape [K, S+1] (K = 1 or the batch; S = prunable slots; the last column
is the always-kept slot of blocked channels) is gathered per sink tensor T with T's slot indices and
reshaped to broadcast along T's channel axis: T' = T · keep[:, pos(T)] (the mask cast to T's element
type, float16 too). With keep = the plan's keep vector this is the core invariant's reference: removed
channels zeroed at every consumer. The search's trial graph builds on the same `MaskInserter`.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .modeldata import ModelData
from .groups import ChannelMap

KEEP_INPUT = "aofp_keep"


class MaskInserter:
    """Builds mask nodes `tensor · mask[:, idx]` for a mask input, once per (tensor, index set)."""

    def __init__(self, cmap: ChannelMap, mask_input: str, prefix: str):
        self.cmap = cmap
        self.mask_input = mask_input
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._done: dict[tuple[str, bytes], str] = {}
        self.masks: dict[str, tuple[np.ndarray, str]] = {}  # each Mul's output -> (slots it masks, the mask)

    def masked(self, tensor: str, index: np.ndarray | None = None, source: str | None = None) -> str:
        """Name of `source` (default: `tensor`) multiplied by the mask gathered at `index` (default: T's slots)."""
        index = self.cmap.positions(tensor) if index is None else index
        source = source or tensor
        key = (source, index.tobytes())
        if key in self._done:
            return self._done[key]
        k = len(self._done)
        base = f"{self.prefix}{k}"
        rank = len(self.cmap.graph.shape(tensor))
        axis = self.cmap.tensor_axis[tensor]
        shape = [1] * rank
        shape[0], shape[axis] = 0, len(index)
        self.inits += [numpy_helper.from_array(index.astype(np.int64), f"{base}_idx"),
                       numpy_helper.from_array(np.array(shape, np.int64), f"{base}_shape")]
        self.nodes += [
            helper.make_node("Gather", [self.mask_input, f"{base}_idx"], [f"{base}_g"], axis=1, name=f"{base}_gather"),
            helper.make_node("Reshape", [f"{base}_g", f"{base}_shape"], [f"{base}_m"], name=f"{base}_reshape"),
        ]
        mask = cast_to(self.nodes, f"{base}_m", self.cmap.graph.dtype(tensor))
        self.nodes.append(helper.make_node("Mul", [source, mask], [f"{base}_out"], name=f"{base}_mul"))
        self._done[key] = f"{base}_out"
        self.masks[f"{base}_out"] = index, mask
        return f"{base}_out"

    def take_nodes(self) -> list[onnx.NodeProto]:
        out, self.nodes = self.nodes, []
        return out


def cast_to(nodes: list[onnx.NodeProto], name: str, dtype: int) -> str:
    """`name` (a float32 tensor) cast to element type `dtype` by a node appended to `nodes`, or `name` itself."""
    if dtype == TensorProto.FLOAT:
        return name
    nodes.append(helper.make_node("Cast", [name], [f"{name}_cast"], to=dtype, name=f"{name}_cast"))
    return f"{name}_cast"


def mask_input(name: str, n_slots: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"{name}_rows", n_slots + 1])


def masked_model(cmap: ChannelMap, with_masks: bool = False):
    """The working model with `aofp_keep` applied at every sink of a prunable group; `with_masks`: also
    `MaskInserter.masks`, what each mask node multiplies in."""
    model = onnx.ModelProto()
    model.CopyFrom(cmap.graph.model)
    graph = model.graph
    inserter = MaskInserter(cmap, KEEP_INPUT, "aofp_keep_")
    sinks: dict[int, list] = {}
    for s in cmap.sinks:
        if any(g.prunable for g in cmap.groups_of_tensor.get(s.tensor, [])):
            sinks.setdefault(s.node_index, []).append(s)
    nodes = []
    for ni, node in enumerate(graph.node):
        for s in sinks.get(ni, []):
            node.input[s.input_index] = inserter.masked(s.tensor)
        nodes.extend(inserter.take_nodes())
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inserter.inits)
    graph.input.append(mask_input(KEEP_INPUT, cmap.n_slots))
    del graph.value_info[:]
    data = ModelData(model, cmap.graph.weights)
    return (data, inserter.masks) if with_masks else data


def keep_feed(keep: np.ndarray) -> np.ndarray:
    """The `aofp_keep` value for one keep vector."""
    return keep.astype(np.float32)[None, :]
