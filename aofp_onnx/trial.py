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
[N, ..] and Z_R,n the copy's [T, N, ..], each consumer's relative error is summed, relative per sample
s and averaged over the N samples with `damage_norm="sample"` (what `auto` uses on classifiers, see
`damage_point.resolve_norm`):

    t_g[t] = Σ_n (1/N) Σ_s ‖(Z_n,s − Z_R,n[t, s])·K‖²
             / max(‖Z_n,s·K‖², SAMPLE_FLOOR · mean_s' ‖Z_n,s'·K‖²)

or, with `damage_norm="batch"`, the paper's Σ(base − ablated)² / Σ base² over the whole batch,
t_g[t] = Σ_n ‖(Z_n − Z_R,n[t])·K‖² / ‖Z_n·K‖². Over the batch, the samples with the largest responses
dominate: at a classifier's logits those are the confident ones, and the samples near the decision
boundary, the ones a cut flips, weigh least: on PP-OCR's MobileNetV3 text-orientation classifier the
batch ratio cut the last stage (200 channels, feeding the classifier) to 18-34 channels (figures in
`damage_point`). The floor keeps a sample that barely excites a consumer from dominating the mean.
Damages are summed in float32 (a float16 model's trial masks are cast to its type, its Z to float32)
into the output `aofp_damage` [T, G]. With one consumer (the paper's setting) that is its relative
error. A group read by several consumers (a residual stream, a concat, a split) adds theirs: pooling
their squares into one ratio instead would weight each consumer by its output energy, so a large conv
drowns a small head — the stage-3 stream of a ResNet-20 feeds two convs and the classifier, and with
pooled ratios AOFP removed 38 of its 128 channels where the oracle removes 9 (benchmarks/aofp_vs_oracle.py,
slimmed network). Cost of one run: one base forward on N samples plus T forwards of the consumers,
instead of T full forwards.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .damage_point import resolve_norm
from .modeldata import ModelData
from .groups import ChannelMap
from .masking import KEEP_INPUT, MaskInserter, cast_to, keep_feed, mask_input
from .runtime import CUDA, Runner

TRIAL_INPUT = "aofp_trial"
DAMAGE_OUTPUT = "aofp_damage"
DAMAGE_AT = ("next", "block", "output")  # where a trial's damage is read (block, output: `trial_downstream`)
TINY = 1e-30  # floor of a consumer's base energy: a consumer silent on the batch adds 0/TINY
DAMAGE_NORMS = ("auto", "sample", "batch")  # what a damage is relative to (see the module docstring)
DEFAULT_DAMAGE_NORM = "auto"
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of activations one stacked run may use (AOFP_ONNX_MEMORY_BUDGET)
SAMPLE_FLOOR = 0.1  # a sample's base energy counts as at least this share of the batch's mean
INT64_MAX = np.iinfo(np.int64).max
# ops a consumer's damage is read through (elementwise; other inputs must be constants)
CHAIN_OPS = {"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
             "Celu", "Gelu", "Mish", "Softplus", "BatchNormalization", "Mul", "Add", "Sub", "Div", "Identity"}


class _Builder:
    """Nodes and constants of the trial paths, with per-tensor helpers built once."""

    def __init__(self, cmap: ChannelMap, graph: onnx.GraphProto, damage_norm: str):
        self.cmap = cmap
        self.graph = graph
        self.per_sample = damage_norm == "sample"
        self.opset = cmap.graph.opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._cache: dict[tuple, str] = {}
        self.const("aofp_zero", np.array([0], np.int64))
        self.const("aofp_one", np.array([1], np.int64))
        self.const("aofp_minus_one", np.array([-1], np.int64))
        self.const("aofp_int_max", np.array([INT64_MAX], np.int64))
        self.const("aofp_tiny", np.array(TINY, np.float32))
        self.const("aofp_floor", np.array(SAMPLE_FLOOR, np.float32))
        self.const("aofp_two", np.array([2], np.int64))
        self.const("aofp_per_sample", np.array([0, 0, -1], np.int64))  # [L, N, ..] -> [L, N, rest]

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

    def reduce(self, op: str, x: str, out: str, axis: int, keepdims: int = 1) -> str:
        """`op` over axis 1 or 2 of x."""
        if self.opset >= 18:  # reductions take their axes as an input from opset 18
            return self.node(op, [x, {1: "aofp_one", 2: "aofp_two"}[axis]], out, keepdims=keepdims)
        return self.node(op, [x], out, axes=[axis], keepdims=keepdims)

    def energies(self, x: str, out: str) -> str:
        """Σ of squares of x [L, N, ..] (trials or 1, samples, ..): per sample [L, N] when damages are
        relative per sample, else over the batch [L, 1]."""
        if self.per_sample:
            flat = self.node("Reshape", [x, "aofp_per_sample"], f"{out}_flat")
            return self.reduce("ReduceSumSquare", flat, out, axis=2, keepdims=0)
        return self.reduce("ReduceSumSquare", self.node("Flatten", [x], f"{out}_flat", axis=1), out, axis=1)

    def read(self, z: str, z_r: str, pre: str, own: bool = True) -> tuple[str, str]:
        """`energies` of a read point's trial difference and of its base, in float32: z_r is the stacked
        copy of z ([T·N, ..]); with `own`, both are masked by K where z carries channels (a read layer's own
        removed filters do not count)."""
        y = self.as_float(self.node("Reshape", [z_r, self.shape_with_lead(z, drop_first=False)], f"{pre}_y"), z)
        ref = self.as_float(self.unsqueeze0(z), z)
        diff = self.node("Sub", [y, ref], f"{pre}_d")
        if own and z in self.cmap.tensor_axis:
            mask = self.trial_mask(z, self.cmap.positions(z), f"{pre}_own", source=KEEP_INPUT)
            diff = self.node("Mul", [diff, mask], f"{pre}_dm")
            ref = self.node("Mul", [ref, mask], f"{pre}_zm")
        return self.energies(diff, f"{pre}_num"), self.energies(ref, f"{pre}_den")

    def relative(self, nums: list[str], dens: list[str], out: str) -> str:
        """[T, 1] damage from `energies` of the differences [T, ·] and of the base [1, ·]: Σnums / Σdens, or
        per sample the mean over n of Σnums[:, n] / max(Σdens[n], SAMPLE_FLOOR · mean_m Σdens[m])."""
        num = nums[0] if len(nums) == 1 else self.node("Sum", nums, f"{out}_num")
        den = dens[0] if len(dens) == 1 else self.node("Sum", dens, f"{out}_den")
        if self.per_sample:
            mean = self.reduce("ReduceMean", den, f"{out}_den_mean", axis=1)
            den = self.node("Max", [den, self.node("Mul", [mean, "aofp_floor"], f"{out}_den_floor")], f"{out}_den_n")
        ratio = self.node("Div", [num, self.node("Max", [den, "aofp_tiny"], f"{out}_den_safe")],
                          f"{out}_ratio" if self.per_sample else out)
        return self.reduce("ReduceMean", ratio, out, axis=1) if self.per_sample else ratio

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


def build_trial_model(cmap: ChannelMap, groups: list[str] | None = None, damage_at: str = "next",
                      damage_norm: str = DEFAULT_DAMAGE_NORM) -> ModelData:
    """The trial graph of `cmap`'s model (see the module docstring); its only outputs are the damages.

    `groups`: score only these group ids (the outputs then have one column per listed group);
    `damage_at`: 'next' (this module), 'block' or 'output' (`trial_downstream`)."""
    chosen = [g for g in cmap.prunable if groups is None or g.id in groups]
    damage_norm = resolve_norm(cmap, damage_norm)
    if damage_at != "next":
        from .trial_downstream import build_downstream_trial_model  # it builds on this module's helpers

        return build_downstream_trial_model(cmap, chosen, damage_at, damage_norm)
    model = onnx.ModelProto()
    model.CopyFrom(cmap.graph.model)
    graph = model.graph
    keep = MaskInserter(cmap, KEEP_INPUT, "aofp_k")
    b = _Builder(cmap, graph, damage_norm)
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
                num, den = b.read(z, z_r, base)  # the consumer's own removed filters do not count
                terms[g.id].append(b.relative([num], [den], f"{base}_t"))
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


STACK_FACTOR = 4  # activation sets one stacked trial-sample may hold at once (see activation_bytes)


def activation_bytes(cmap: ChannelMap) -> int:
    """Bytes one stacked sample may hold: STACK_FACTOR x the peak of the live node outputs for one sample
    (shapes of the analysis view), the graph run in its node order and each output freed after its last
    consumer, as onnxruntime's memory planner does; at most the sum of all node outputs, the bound before.
    Measured (peak RSS growth of one trial run per stacked trial and sample, over stack 1): 0.8-1.7x that
    peak at next, block and output on the PP-OCR and PP-LCNet classifiers and the digits ResNet-20, where
    the sum was 7-28x what the runs took and held the PP-LCNet classifier to 2 trials per run."""
    last = {name: len(cmap.graph.nodes) for name in cmap.graph.outputs}
    for k, node in enumerate(cmap.graph.nodes):
        for name in node.input:
            last[name] = max(last.get(name, k), k)
    live, peak, total, freed = 0, 0, 0, {}
    for k, node in enumerate(cmap.graph.nodes):
        for out in node.output:
            shape = cmap.graph.shape(out)
            size = 4 * int(np.prod(shape)) // max(cmap.graph.batch, 1) if shape else 0
            total += size
            if out in last:
                live += size
                freed[last[out]] = freed.get(last[out], 0) + size
        peak = max(peak, live)
        live -= freed.pop(k, 0)
    return max(min(STACK_FACTOR * peak, total), 1)


def stack_within(sample_bytes: int, memory: int, batch: int) -> int:
    """How many stacked copies of a `batch` of samples of `sample_bytes` activations each fit `memory` (at least 1)."""
    return max(1, int(memory // (sample_bytes * batch)))


class TrialEngine:
    """The trial graph's session; scores stacked trials for every group in one run.

    A group whose channels no row removes scores exactly 0 and is left out of the run: once a quarter of
    the session's groups have saturated, the session is rebuilt for the groups still searching
    (`build_trial_model(cmap, ids)`), so the others' consumer copies, which would cost as much as ever,
    stop running (at most log₄⁄₃ G rebuilds per restart of the search). One session at a time holds the
    weights. With `devices` (`pool.parse_devices`), one session per device shares the rows of each run."""

    def __init__(self, cmap: ChannelMap, provider: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 devices: list | None = None, damage_at: str = "next", damage_norm: str = DEFAULT_DAMAGE_NORM):
        self.cmap = cmap
        self.devices = devices
        self.point = {"damage_at": damage_at, "damage_norm": damage_norm}
        self._session = tuple(range(len(cmap.prunable))), self._runner(build_trial_model(cmap, **self.point), provider)
        self.provider = self._session[1].provider
        # per stacked trial and sample (each copy's stacked input, output and difference are freed once its
        # damage is reduced); benchmarks/aofp_vs_oracle.py prints the search's peak memory
        self.sample_bytes = activation_bytes(cmap)
        self.memory_budget = memory_budget

    def max_stack(self, batch: int) -> int:
        return stack_within(self.sample_bytes, self.memory_budget, batch)

    def _session_for(self, active: tuple[int, ...]) -> tuple[tuple[int, ...], Runner]:
        covered = self._session[0]
        if not set(active) <= set(covered) or 4 * len(active) <= 3 * len(covered):
            ids = [self.cmap.prunable[k].id for k in active]
            self._session = None  # the old session's memory goes before the new one is built
            provider = "cuda" if self.provider == CUDA else "cpu"
            self._session = active, self._runner(build_trial_model(self.cmap, ids, **self.point), provider)
        return self._session

    def _runner(self, model, provider: str):
        if self.devices:
            from .pool import RunnerPool

            return RunnerPool(model, self.devices, split=TRIAL_INPUT)
        return Runner(model, provider)

    def damage(self, keep: np.ndarray, rows: np.ndarray, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """[T, G] damage of T trial rows (each [S+1], 0 = removed by the trial) on one calibration batch."""
        out = np.zeros((len(rows), len(self.cmap.prunable)))
        active = tuple(k for k, g in enumerate(self.cmap.prunable) if not rows[:, g.slots].all())
        if active:
            covered, runner = self._session_for(active)
            (damage,) = runner.run({**feeds, KEEP_INPUT: keep_feed(keep), TRIAL_INPUT: rows.astype(np.float32)},
                                   [DAMAGE_OUTPUT])
            out[:, list(active)] = damage[:, [covered.index(k) for k in active]]
        return out
