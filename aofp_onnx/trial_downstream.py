"""Trial graphs that read a group's damage further downstream: `damage_at` 'block' and 'output'.

Same inputs and output as the next-layer trial graph (`trial`): `aofp_keep` [1, S+1], `aofp_trial`
[T, S+1], `aofp_damage` [T, G]. The base path is the model masked by K at every sink (as in `masking`),
run once on the N calibration samples. For each group g, a copy of everything downstream of g's sinks
runs on the T·N stacked samples, row block t seeing "K with R_g,t also removed":

- every K-mask of a tensor carrying g (each sink of g, also one a residual stream reaches again
  further on) is followed by the trial mask: X_R = X·K·trial[t, idx_g(X)], stacked [T, N, ..] then
  flattened to [T·N, ..] (read from the base when X is not itself downstream of g);
- every other node with an input downstream of g is copied (same initializers); its inputs that are
  not downstream of g but carry the batch are tiled T times; a Reshape whose constant target pins the
  batch gets −1 there.

Where the damage is read:
- `block`: at the first channel-mixing layer (a non-depthwise Conv, ConvTranspose, Gemm, MatMul) that
  is not itself a sink of g, after its elementwise chain (as `trial` reads a consumer), masked by K
  where it carries channels; the walk goes on through channel-tied layers (depthwise convs, SE gates,
  BN, activations, residual adds) and through g's own sinks. Per read point Z,
      t_g[t] = Σ_Z ‖(Z − Z_R[t])·K‖² / ‖Z·K‖²  (summed per read point, as `trial` sums consumers);
  a model output reached without a mixing layer is a read point too.
- `output`: at the model outputs, pooled as the oracle measures,
  t_g[t] = Σ_o ‖y_o − y_o,R[t]‖² / Σ_o ‖y_o‖².
Each ratio is relative per sample and averaged over the samples (floored as in `trial`), or over the
whole batch with `damage_norm="batch"`.
A float16 model's trial masks are cast to its type; its damages are summed in float32 (as in `trial`).
Cost per run: one base forward on N samples plus, per group, T forwards of its downstream part.
"""
from __future__ import annotations

import numpy as np
import onnx

from .groups import ChannelMap
from .masking import KEEP_INPUT, MaskInserter, cast_to
from .modeldata import ModelData
from .trial import TRIAL_INPUT, _Builder, _chain, _zeros_per_trial, finish_trial_model

MIXING_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
NO_BATCH_OPS = {"Shape", "Size"}  # their outputs do not carry the batch axis


def _is_mixing(cmap: ChannelMap, node: onnx.NodeProto) -> bool:
    if node.op_type not in MIXING_OPS:
        return False
    if node.op_type == "Conv":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        w = cmap.graph.shape(node.input[1])
        return not (group > 1 and w is not None and w[1] == 1)  # depthwise ties channels
    return True


def build_downstream_trial_model(cmap: ChannelMap, chosen: list, damage_at: str, damage_norm: str) -> ModelData:
    """The trial graph for `chosen` groups with damage read at `damage_at` ('block' or 'output')."""
    model = onnx.ModelProto()
    model.CopyFrom(cmap.graph.model)
    graph = model.graph
    keep = MaskInserter(cmap, KEEP_INPUT, "aofp_k")
    b = _Builder(cmap, graph, damage_norm)
    masked_tensor: dict[str, str] = {}  # K-mask output -> the tensor it masks
    by_node: dict[int, list] = {}
    for s in cmap.sinks:
        if any(g.prunable for g in cmap.groups_of_tensor.get(s.tensor, [])):
            by_node.setdefault(s.node_index, []).append(s)
    base: list[tuple[int, onnx.NodeProto]] = []  # (index in the model, -1 for mask nodes; node)
    for ni, node in enumerate(graph.node):
        for s in by_node.get(ni, []):
            node.input[s.input_index] = keep.masked(s.tensor)
            masked_tensor[node.input[s.input_index]] = s.tensor
        base.extend((-1, n) for n in keep.take_nodes())
        base.append((ni, node))
    walk = _Walk(cmap, b, base, masked_tensor, {o.name for o in graph.output})
    damages = [walk.group(k, g, damage_at) for k, g in enumerate(chosen)]
    return finish_trial_model(model, cmap, [n for _, n in base], b, keep, damages)


class _Walk:
    """Copies of the downstream part of one group at a time, on the K-masked base node list."""

    def __init__(self, cmap, b, base, masked_tensor, outputs):
        self.cmap, self.b, self.base, self.masked_tensor, self.outputs = cmap, b, base, masked_tensor, outputs
        self.batched = _batch_carrying([n for _, n in base], cmap.graph.inputs)
        self._tiled: dict[str, str] = {}
        self._rows = None

    def shape(self, name: str):
        return self.cmap.graph.shape(self.masked_tensor.get(name, name))

    def tiled(self, name: str) -> str:
        """name repeated T times along the batch: [T·N, ..]."""
        if name not in self._tiled:
            b = self.b
            if self._rows is None:
                self._rows = b.node("Slice", [b.node("Shape", [TRIAL_INPUT], "aofp_rows_all"), "aofp_zero", "aofp_one"],
                                    "aofp_rows")
            ones = b.const(f"{name}__ones", np.ones(len(self.shape(name)) - 1, np.int64))
            reps = b.node("Concat", [self._rows, ones], f"{name}__reps", axis=0)
            self._tiled[name] = b.node("Tile", [name, reps], f"{name}__tiled")
        return self._tiled[name]

    def group(self, k: int, g, damage_at: str) -> str:
        """The [T, 1] damage of group g read at `damage_at`."""
        b, cmap = self.b, self.cmap
        pre = f"aofp_d{k}"
        copies: dict[str, str] = {}  # base tensor -> its copy on the stacked samples
        reads: list[tuple[str, str]] = []  # (base tensor, copy) where the damage is read
        own = {s.node_index for s in g.sinks}
        count = 0
        for index, node in self.base:
            tensor = self.masked_tensor.get(node.output[0])
            if tensor is not None and any(h is g for h in cmap.groups_of_tensor.get(tensor, [])):  # g's sink
                x = node.output[0]
                idx = np.where((cmap.positions(tensor) >= g.offset) & (cmap.positions(tensor) < g.offset + g.width),
                               cmap.positions(tensor), cmap.n_slots)
                src = node.input[0]
                if src in copies:  # K-mask the copy, then unfold the trials
                    masked = b.node("Mul", [copies[src], node.input[1]], f"{pre}_{count}_k")
                    stacked = b.node("Reshape", [masked, b.shape_with_lead(x, drop_first=False)], f"{pre}_{count}_s")
                else:
                    stacked = b.unsqueeze0(x)
                mask = cast_to(b.nodes, b.trial_mask(tensor, idx, f"{pre}_{count}"), cmap.graph.dtype(tensor))
                trial = b.node("Mul", [stacked, mask], f"{pre}_{count}_x")
                copies[x] = b.node("Reshape", [trial, b.shape_with_lead(x, drop_first=True)], f"{pre}_{count}_xf")
                count += 1
                continue
            if not any(i in copies for i in node.input):
                continue
            if damage_at == "block" and _is_mixing(cmap, node) and index not in own:
                reads.append(self._read_point(node, copies, f"{pre}_{count}"))
                count += 1
                continue
            self._copy(node, copies, f"{pre}_{count}")
            count += 1
        reads += [(o, copies[o]) for o in sorted(self.outputs) if o in copies]
        return self._damage(reads, pre, pooled=damage_at == "output")

    def _copy(self, node: onnx.NodeProto, copies: dict, name: str) -> onnx.NodeProto:
        b = self.b
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{name}_{node.op_type}"
        for j, i in enumerate(node.input):
            if i in copies:
                copy.input[j] = copies[i]
            elif i and i in self.batched:
                copy.input[j] = self.tiled(i)
        if node.op_type == "Reshape":
            target = self.cmap.graph.array(node.input[1])
            if target is not None and target.size and target[0] not in (0, -1) and -1 not in target:
                copy.input[1] = b.const(f"{name}_target", np.concatenate([[-1], target[1:]]).astype(np.int64))
        del copy.output[:]
        for j, o in enumerate(node.output):
            copy.output.append(f"{name}_o{j}" if o else "")
            if o:
                copies[o] = f"{name}_o{j}"
        b.nodes.append(copy)
        return copy

    def _read_point(self, node: onnx.NodeProto, copies: dict, name: str) -> tuple[str, str]:
        """Copy a mixing node and its elementwise chain; (base chain end, copy's chain end)."""
        local: dict[str, str] = dict(copies)
        self._copy(node, local, name)
        z = node.output[0]
        for step, follower in enumerate(_chain(self.cmap, node)):
            self._copy(follower, local, f"{name}_c{step}")
            z = follower.output[0]
        return z, local[z]

    def _damage(self, reads: list[tuple[str, str]], pre: str, pooled: bool) -> str:
        b = self.b
        if not reads:  # nothing downstream reads g: free to remove
            return _zeros_per_trial(b, pre)
        # a read layer's own removed filters do not count; a model output counts whole
        nums, dens = zip(*(b.read(z, z_r, f"{pre}_r{j}", own=z not in self.outputs)
                           for j, (z, z_r) in enumerate(reads)))
        if pooled:
            return b.relative(nums, dens, f"{pre}_t")
        terms = [b.relative([n], [d], f"{pre}_r{j}_t") for j, (n, d) in enumerate(zip(nums, dens))]
        return terms[0] if len(terms) == 1 else b.node("Sum", terms, f"{pre}_t")


def _batch_carrying(nodes: list[onnx.NodeProto], inputs: list[str]) -> set[str]:
    """Tensors computed from the model inputs along the data path (not through Shape/Size)."""
    batched = set(inputs)
    for node in nodes:
        if node.op_type not in NO_BATCH_OPS and any(i in batched for i in node.input):
            batched.update(o for o in node.output if o)
    return batched
