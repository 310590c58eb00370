"""Channel analysis: from a graph to channel groups.

Every channel of every tensor that carries channels is labelled with an *atom* id. Handlers create
atoms (a Conv's filters), pass them on (ReLU), map them (Concat, Split, Flatten: one channel becomes
H·W features), and tie them (Add: channel i of both inputs is one atom, via union-find). After the
walk, an atom is the unit of removal: removing it removes every tensor position labelled with it.

A **group** is the set of atoms that occur in exactly the same tensors (same "signature"); its
channels are ordered as they first appear in its *anchor*, the first tensor (in graph order) that
holds them. A group is **blocked** when any of its atoms was blocked (it reaches a graph output, an
op without handler, a channel reduction, ...); the reasons are kept for `inspect`.

The keep state of the whole model is one boolean vector over the *positions* of the prunable
groups' channels, concatenated in group order, plus one trailing always-true slot that every blocked
atom maps to. `ChannelMap.positions(tensor)` maps each index along a tensor's channel axis to its slot.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .channels import Channels, handler_for
from .channels.attrs import attr
from .graph import Graph
from .normalize import subgraph_reads  # noqa: F401  (surgery and reconstruct read it here)


@dataclass
class Binding:
    """Initializer input `input_index` of node `node_index` is per-channel along `axis`, indexed like `tensor`.

    `local` is set for grouped convolutions whose weight holds one group's slice of the channel
    axis: the kept indices are taken modulo `local`, from the first group.
    """

    node_index: int
    input_index: int
    axis: int
    tensor: str
    local: int | None = None


@dataclass
class Sink:
    """Node `node_index` consumes the channels of its input `input_index` (mask point; AOFP damage point)."""

    node_index: int
    input_index: int
    tensor: str


@dataclass
class Source:
    """Node `node_index` creates the channels of `tensor`: its weight input `input_index`, filters along `axis`."""

    node_index: int
    input_index: int
    axis: int
    tensor: str


@dataclass
class Counted:
    """A MAC-counted node: per-sample MACs at full width and the channel tensors its MACs scale with."""

    node_index: int
    macs: int
    scale_with: tuple[str, ...]


@dataclass
class Group:
    id: str
    anchor: str
    atoms: np.ndarray
    tensors: list[str]
    reasons: list[str]
    offset: int = -1  # first slot in the keep vector; -1 when blocked
    sources: list[Source] = field(default_factory=list)
    sinks: list[Sink] = field(default_factory=list)
    macs: int = 0

    @property
    def width(self) -> int:
        return len(self.atoms)

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def slots(self) -> np.ndarray:
        return np.arange(self.offset, self.offset + self.width)


class Analysis:
    """The context handlers write into while the graph is walked."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.channels: dict[str, Channels] = {}
        self.parent: list[int] = []
        self.blocked: dict[int, list[str]] = {}
        self.bindings: list[Binding] = []
        self.rewrites: list[tuple[int, object]] = []
        self.sinks: list[Sink] = []
        self.sources: list[Source] = []
        self.counted: list[Counted] = []
        self.node_index = {n.output[0]: k for k, n in enumerate(graph.nodes)}  # outputs are unique (SSA)

    # -- atoms -------------------------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie atoms a[i] and b[i] for every i (same length)."""
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def block(self, ids: np.ndarray, reason: str) -> None:
        for a in np.unique(ids).tolist():
            reasons = self.blocked.setdefault(a, [])
            if reason not in reasons:
                reasons.append(reason)

    # -- tensors -----------------------------------------------------------------------------
    def get(self, tensor: str) -> Channels | None:
        return self.channels.get(tensor)

    def set(self, tensor: str, ch: Channels) -> None:
        self.channels[tensor] = ch

    def need(self, tensor: str, node: onnx.NodeProto) -> Channels | None:
        """Channels of a data input; a tensor nobody labelled gets fresh blocked atoms on axis 1."""
        ch = self.channels.get(tensor)
        if ch is not None:
            return ch
        shape = self.graph.shape(tensor)
        if shape is None or len(shape) < 2 or tensor in self.graph.inits:
            return None
        ch = Channels(1, self.fresh(shape[1]))
        producer = self.graph.producer.get(tensor)
        if producer is None:
            self.block(ch.ids, f"comes from model input '{tensor}'")
        else:
            self.block(ch.ids, f"comes from {producer.op_type} '{producer.name}', which carries no channel mapping")
        self.channels[tensor] = ch
        return ch

    def shape(self, tensor: str) -> tuple[int, ...] | None:
        return self.graph.shape(tensor)

    def init(self, tensor: str) -> np.ndarray | None:
        return self.graph.array(tensor)

    # -- what the cut and the search need ----------------------------------------------------
    def idx(self, node: onnx.NodeProto) -> int:
        return self.node_index[node.output[0]]

    def bind(self, node, input_index: int, axis: int, tensor: str, local: int | None = None) -> None:
        self.bindings.append(Binding(self.idx(node), input_index, axis, tensor, local))

    def rewrite(self, node, fn) -> None:
        """`fn(node, cut)` runs at cut time to rewrite attributes or shape constants of `node`."""
        self.rewrites.append((self.idx(node), fn))

    def sink(self, node, input_index: int) -> None:
        self.sinks.append(Sink(self.idx(node), input_index, node.input[input_index]))

    def source(self, node, input_index: int, axis: int, tensor: str) -> None:
        self.sources.append(Source(self.idx(node), input_index, axis, tensor))

    def count(self, node, macs: int, *scale_with: str) -> None:
        self.counted.append(Counted(self.idx(node), int(macs), tuple(scale_with)))

    def describe(self, node: onnx.NodeProto) -> str:
        return f"{node.op_type} '{node.name or node.output[0]}'"


class ChannelMap:
    """The analysis result: groups, the slot of every channel position, and what the cut must touch."""

    def __init__(self, graph: Graph, ctx: Analysis):
        self.graph = graph
        self.bindings = ctx.bindings
        self.rewrites = ctx.rewrites
        roots = np.array([ctx.find(a) for a in range(len(ctx.parent))], dtype=np.int64)
        self.tensor_axis = {t: ch.axis for t, ch in ctx.channels.items()}
        self.tensor_roots = {t: roots[ch.ids] for t, ch in ctx.channels.items()}
        blocked_roots: dict[int, list[str]] = {}
        for atom, reasons in ctx.blocked.items():
            merged = blocked_roots.setdefault(int(roots[atom]), [])
            merged.extend(r for r in reasons if r not in merged)
        self.groups = self._make_groups(blocked_roots)
        n_slots = sum(g.width for g in self.groups if g.prunable)
        self.n_slots = n_slots
        slot_of_root = {}
        for g in self.groups:
            if g.prunable:
                for j, r in enumerate(g.atoms.tolist()):
                    slot_of_root[r] = g.offset + j
        self._slot_of_root = slot_of_root
        self._positions: dict[str, np.ndarray] = {}
        by_tensor: dict[str, list[Group]] = {}
        for g in self.groups:
            for t in g.tensors:
                by_tensor.setdefault(t, []).append(g)
        self.groups_of_tensor = by_tensor
        for s in ctx.sources:
            for g in by_tensor.get(s.tensor, []):
                g.sources.append(s)
        self.sinks = ctx.sinks
        for s in ctx.sinks:
            for g in by_tensor.get(s.tensor, []):
                g.sinks.append(s)
        self.counted = ctx.counted
        self.total_macs = sum(c.macs for c in self.counted)
        for c in self.counted:
            touched = {id(g): g for t in c.scale_with for g in by_tensor.get(t, [])}
            for g in touched.values():
                g.macs += c.macs
        self.by_id = {g.id: g for g in self.groups}

    def _make_groups(self, blocked_roots: dict[int, list[str]]) -> list[Group]:
        signature: dict[int, list[str]] = {}
        order: list[tuple[int, str]] = []  # (root, anchor) in first-appearance order
        for t, r in self.tensor_roots.items():
            for root in dict.fromkeys(r.tolist()):
                sig = signature.get(root)
                if sig is None:
                    signature[root] = [t]
                    order.append((root, t))
                else:
                    sig.append(t)
        groups: dict[tuple[str, ...], list[int]] = {}
        anchors: dict[tuple[str, ...], str] = {}
        for root, anchor in order:
            key = tuple(signature[root])
            groups.setdefault(key, []).append(root)
            anchors.setdefault(key, anchor)
        result: list[Group] = []
        names: dict[str, int] = {}
        sparse: dict[str, int] = {}
        offset = 0
        for key, roots in groups.items():
            anchor = anchors[key]
            atoms = np.array(roots, dtype=np.int64)
            reasons = []
            for r in roots:
                reasons.extend(x for x in blocked_roots.get(r, []) if x not in reasons)
            positions = np.flatnonzero(np.isin(self.tensor_roots[anchor], atoms))
            whole = len(positions) == len(self.tensor_roots[anchor])
            contiguous = positions[-1] - positions[0] + 1 == len(positions)
            if whole:
                gid = anchor
            elif contiguous:
                gid = f"{anchor}[{positions[0]}:{positions[-1] + 1}]"
            else:  # interleaved channels (e.g. tied across the groups of a grouped conv): numbered
                sparse[anchor] = sparse.get(anchor, -1) + 1
                gid = f"{anchor}#{sparse[anchor]}"
            if gid in names:
                names[gid] += 1
                gid = f"{gid}#{names[gid]}"
            else:
                names[gid] = 0
            g = Group(gid, anchor, atoms, list(key), reasons)
            if g.prunable:
                g.offset = offset
                offset += g.width
            result.append(g)
        return result

    # -- keep state ----------------------------------------------------------------------------
    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def positions(self, tensor: str) -> np.ndarray:
        """Slot in the keep vector of each index along `tensor`'s channel axis (n_slots = always kept)."""
        pos = self._positions.get(tensor)
        if pos is None:
            lookup = self._slot_of_root
            pos = np.array([lookup.get(r, self.n_slots) for r in self.tensor_roots[tensor].tolist()], dtype=np.int64)
            self._positions[tensor] = pos
        return pos

    def full_keep(self) -> np.ndarray:
        return np.ones(self.n_slots + 1, dtype=bool)

    def kept_indices(self, tensor: str, keep: np.ndarray) -> np.ndarray:
        return np.flatnonzero(keep[self.positions(tensor)])

    def fraction(self, tensor: str, keep: np.ndarray) -> float:
        pos = self.positions(tensor)
        return float(keep[pos].mean()) if len(pos) else 1.0

    def macs(self, keep: np.ndarray) -> int:
        """Per-sample MACs of the model pruned to `keep` (each counted node scales with its channel fractions)."""
        total = 0.0
        for c in self.counted:
            f = 1.0
            for t in c.scale_with:
                f *= self.fraction(t, keep)
            total += c.macs * f
        return int(round(total))

    def layers(self, g: Group) -> tuple[list[str], list[str]]:
        """(producers, consumers) of group `g` as "OpType name": the nodes whose weights create its channels,
        and the nodes that read them (where a cut removes input channels)."""
        def label(node_index: int) -> str:
            node = self.graph.nodes[node_index]
            return f"{node.op_type} {node.name or node.output[0]}"

        return (list(dict.fromkeys(label(s.node_index) for s in g.sources)),
                list(dict.fromkeys(label(s.node_index) for s in g.sinks)))

    def prunable_macs_fraction(self) -> float:
        if not self.total_macs:
            return 0.0
        hit = sum(c.macs for c in self.counted
                  if any(g.prunable for t in c.scale_with for g in self.groups_of_tensor.get(t, [])))
        return hit / self.total_macs


def analyze(graph: Graph) -> ChannelMap:
    """Walk the graph in order with the registered handlers and build the channel groups."""
    ctx = Analysis(graph)
    for name in graph.inputs:
        shape = graph.shape(name)
        if shape is not None and len(shape) >= 2:
            axis = _input_channel_axis(graph, name)
            ch = Channels(axis, ctx.fresh(shape[axis]))
            ctx.block(ch.ids, f"comes from model input '{name}'")
            ctx.set(name, ch)
    for node in graph.nodes:
        handler = handler_for(node.op_type, node.domain)
        if handler is None:
            _unhandled(node, ctx)
            continue
        handler.analyze(node, ctx)
    for name in graph.outputs:
        ch = ctx.get(name)
        if ch is not None:
            ctx.block(ch.ids, f"reaches model output '{name}'")
    return ChannelMap(graph, ctx)


def _input_channel_axis(graph: Graph, name: str) -> int:
    """Axis 1, or for an input only Transposes read, all alike, the axis they move to axis 1 (NHWC → NCHW)."""
    readers = graph.consumers.get(name, [])
    perms = {tuple(attr(n, "perm") or ()) for n, _ in readers if n.op_type == "Transpose"}
    if readers and len(perms) == 1 and len(readers) == sum(n.op_type == "Transpose" for n, _ in readers):
        perm = perms.pop()
        return perm[1] if len(perm) > 1 else 1
    return 1


def _unhandled(node: onnx.NodeProto, ctx: Analysis) -> None:
    """An op without handler: every channel tensor it reads is blocked; its outputs carry no channels."""
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    for name in list(node.input) + subgraph_reads(node):
        ch = ctx.get(name) if name else None
        if ch is not None:
            ctx.block(ch.ids, f"feeds {op} '{node.name or node.output[0]}', which has no channel handler")
