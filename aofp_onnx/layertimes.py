"""Per-layer timings behind the latency table (`latency`): one-node models of a counted node at sampled
widths, and the curves ρ(w) that interpolate them, with the measured penalties of off-grid widths.

A node's one-node model is its op and attributes with random weights, its input at the real shape; all
widths of a node are timed interleaved, and a width's time is the 10th percentile of its runs (with one
thread, the thread's CPU time). A curve is sampled at W, m ≈ W/2 and m − 32 on a 32-grid (an 8-grid below
64 channels); between m − 32 and m the widths m−16, m−8 and m−1 measure the penalty of each alignment
class k ∈ {32, 16, 8, 1} (the largest power dividing the width).
"""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .groups import ChannelMap
from .runtime import Runner, latency_ms

CLASSES = (32, 16, 8, 1)
REPEATS = 7


def alignment(width: int) -> int:
    return next(k for k in CLASSES if width % k == 0)


def sample_widths(full: int) -> tuple[list[int], dict[int, int]]:
    """(aligned widths to time, including `full`; {class: probe width}) for a curve of width `full`.

    The probes lie between the aligned samples m − grid and m, so a penalty compares like with like."""
    grid = 32 if full >= 64 else 8
    if full < 16:
        return [full], {}
    mid = max(2 * grid, int(round(full / 2 / grid)) * grid) if full >= 2 * grid else grid
    aligned = sorted({full, mid, mid - grid} - {0})
    probes = {k: mid - k for k in (16, 8, 1) if k < grid and mid - k > 0 and alignment(mid - k) == k}
    return aligned, probes


class Curve:
    """ρ(w) = time at width w / time at full width, from aligned samples and per-class penalties."""

    def __init__(self, full: int, widths: list[int], times: list[float], penalty: dict[int, float]):
        self.full = int(full)
        self.widths, self.times = list(map(int, widths)), list(map(float, times))
        self.penalty = {int(k): float(v) for k, v in penalty.items()}

    def _pen(self, w: int) -> float:
        return self.penalty.get(alignment(w), 1.0)

    def smooth(self, w: float) -> float:
        """Aligned-kernel time at width w (linear between samples, through 0 below the smallest)."""
        xs = [0] + self.widths
        ys = [0.0] + [t / (self._pen(x) if x == self.full else 1.0) for x, t in zip(self.widths, self.times)]
        return float(np.interp(w, xs, ys))

    def ratios(self, aligned: bool = False) -> np.ndarray:
        """ρ(w) for w = 0..full; `aligned`: as if every width ran at the aligned kernels' speed."""
        base = self.times[self.widths.index(self.full)]
        if base <= 0:
            return np.arange(self.full + 1) / max(self.full, 1)
        if aligned:
            return np.array([self.smooth(w) for w in range(self.full + 1)]) / max(self.smooth(self.full), 1e-12)
        return np.array([self.smooth(w) * self._pen(w) / base if w else 0.0 for w in range(self.full + 1)])

    def to_json(self) -> dict:
        return {"full": self.full, "widths": self.widths, "times": self.times, "penalty": self.penalty}

    @classmethod
    def from_json(cls, d: dict) -> "Curve":
        return cls(d["full"], d["widths"], d["times"], d["penalty"])


class NodeKind:
    """How a counted node's one-node model is built for widths (cin, cout), or None when not measured."""

    def __init__(self, cmap: ChannelMap, counted):
        self.node = cmap.graph.nodes[counted.node_index]
        self.roles: list[str] = []
        g = cmap.graph
        x, w = g.shape(self.node.input[0]), g.array(self.node.input[1]) if len(self.node.input) > 1 else None
        self.x_shape, self.w = x, w
        self.measured = False
        if self.node.op_type not in ("Conv", "ConvTranspose") or x is None or w is None:
            return
        group = next((a.i for a in self.node.attribute if a.name == "group"), 1)
        out = self.node.output[0]
        if group == 1:
            self.depthwise = False
            self.roles = ["in" if t == self.node.input[0] else "out" for t in counted.scale_with]
        elif group == x[1] and w.shape[0] == group and self.node.op_type == "Conv":
            self.depthwise = True
            self.roles = ["out" for _ in counted.scale_with]
        else:
            return
        self.measured = all(t in (self.node.input[0], out) for t in counted.scale_with)
        self.transposed = self.node.op_type == "ConvTranspose"
        self.has_bias = len(self.node.input) > 2 and bool(self.node.input[2])
        self.cin, self.cout = x[1], (w.shape[1] if self.transposed else w.shape[0])

    def key(self, batch: int) -> str:
        attrs = sorted(a.SerializeToString().hex() for a in self.node.attribute)
        text = f"{self.node.op_type}|{list(self.x_shape[1:])}|{list(self.w.shape)}|{self.w.dtype}|{self.has_bias}|" \
               f"{self.depthwise}|{batch}|{attrs}"
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def model(self, cin: int, cout: int, batch: int, opset: int) -> tuple[onnx.ModelProto, dict]:
        rng = np.random.default_rng(0)
        dtype = self.w.dtype
        elem = helper.np_dtype_to_tensor_dtype(dtype)
        kernel = list(self.w.shape[2:])
        if self.depthwise:
            cout = cin
            w_shape, group = [cin, 1] + kernel, cin
        else:
            w_shape, group = ([cin, cout] if self.transposed else [cout, cin]) + kernel, 1
        inits = [numpy_helper.from_array((rng.standard_normal(w_shape) * 0.1).astype(dtype), "W")]
        inputs = ["X", "W"]
        if self.has_bias:
            inits.append(numpy_helper.from_array(np.zeros(cout, dtype), "B"))
            inputs.append("B")
        attrs = [a for a in self.node.attribute if a.name != "group"]
        node = helper.make_node(self.node.op_type, inputs, ["Y"])
        node.attribute.extend(attrs)
        node.attribute.append(helper.make_attribute("group", group))
        x_shape = [batch, cin] + list(self.x_shape[2:])
        graph = helper.make_graph([node], "one_node", [helper.make_tensor_value_info("X", elem, x_shape)],
                                  [helper.make_tensor_value_info("Y", elem, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 11))], ir_version=8)
        return model, {"X": rng.standard_normal(x_shape).astype(dtype)}


def timings(runners: list[Runner], feeds: list[dict], threads: int | None) -> list[float]:
    """10th percentile ms per runner over REPEATS interleaved runs (after one warm-up run each); the
    thread's CPU time with one thread, wall time otherwise."""
    return [st["p10"] for st in latency_ms(runners, feeds, warmup=1, repeats=REPEATS, cpu=threads == 1)]


def measure_node(kind: NodeKind, batch: int, opset: int, provider: str, threads: int | None) -> dict:
    """{"full": ms, "curves": {role: Curve json}} for one node configuration, all samples interleaved."""
    settings = [(kind.cin, kind.cout)]
    plan = {}
    for role in dict.fromkeys(kind.roles):
        full = kind.cout if role == "out" else kind.cin
        aligned, probes = sample_widths(full)
        plan[role] = (full, aligned, probes)
        for w in aligned + list(probes.values()):
            setting = (w, kind.cout) if role == "in" else (kind.cin, w)
            if kind.depthwise:
                setting = (w, w)
            if setting not in settings:
                settings.append(setting)
    runners, feeds = [], []
    for cin, cout in settings:
        model, feed = kind.model(cin, cout, batch, opset)
        runners.append(Runner(model, provider, threads=threads, exact=False, spin=True))
        feeds.append(feed)
    times = dict(zip(settings, timings(runners, feeds, threads)))

    def at(role, w):
        return times[(w, w) if kind.depthwise else ((w, kind.cout) if role == "in" else (kind.cin, w))]

    curves = {}
    for role, (full, aligned, probes) in plan.items():
        curve = Curve(full, aligned, [at(role, w) for w in aligned], {})
        curve.penalty = {k: at(role, w) / max(curve.smooth(w), 1e-9) for k, w in probes.items()}
        curves[role] = curve.to_json()
    return {"full": times[settings[0]], "curves": curves}
