"""Latency tables: how a model's measured latency falls as its channel groups narrow, on the target.

Model. A MAC-counted node c (Conv, ConvTranspose, Gemm, MatMul) costs t_c ms at full width; pruning
scales it by Π_{t ∈ scale_with(c)} ρ_{c,t}(w_t), w_t the kept width of channel tensor t (the product form
of the MACs count, with measured curves instead of w_t / W_t):

    L(keep) = L_fixed + s · Σ_c t_c · Π_t ρ_{c,t}(w_t),

Measurement (on the chosen provider, at the real input shape and batch, with the given threads;
`layertimes`). t_c and ρ come from one-node models (the node's op and attributes, random weights, its input
at the real shape), all samples of a node timed interleaved; a sample's time is the 10th percentile of its
runs, which a machine shared with other work disturbs least. With one thread the time is the thread's CPU
time (onnxruntime then runs on the calling thread), which preemption by other processes does not inflate. A
curve is sampled at W, m ≈ W/2 and m − 32 on a 32-grid (an 8-grid below 64 channels) and interpolated
linearly (through 0 below the smallest sample). Kernels that block channels make off-grid widths slower, so
between m − 32 and m the widths m−16 (a multiple of 16, not 32), m−8 (of 8, not 16) and m−1 (odd) are timed
too, and a width of alignment class k ∈ {32, 16, 8, 1} (the largest dividing it) gets that class's measured
penalty; in a whole model an off-grid width also costs layout changes around its layers, so the penalties
applied are those measured on the whole model with every group at m − k, against the model at m and m − grid
(`probe_keeps`), when available. Nodes with the same configuration are measured once. Grouped
(non-depthwise) convs and dense layers are not measured: their t_c is the measured ms per MAC times their
MACs, and ρ = w/W.
One-node models carry their own overheads, and the ops between counted nodes narrow too, so the scale s
and the part no group changes, L_fixed, are fitted to the whole model measured (interleaved) at full
width and with every group cut to its middle sample m (`half_keep`).

Tables are cached as JSON per model fingerprint, provider, input shapes, batch, threads and machine in
`$AOFP_ONNX_CACHE` (default `~/.cache/aofp-onnx/`), under `latency/`.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .cost import TensorWidths
from .groups import ChannelMap
from .io import write_atomic
from .layertimes import CLASSES, Curve, NodeKind, alignment, measure_node, sample_widths, timings
from .modeldata import ModelData
from .runtime import Runner, latency_ms
from .surgery import cut

TOLERANCE = 0.10  # a class whose measured penalty stays within 10 % is as good as aligned to 32 (noise: ±5 %)


def cache_dir() -> Path:
    env = os.environ.get("AOFP_ONNX_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "aofp-onnx") / "latency"


def machine() -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.machine()}|{cpu}|{os.cpu_count()}|onnxruntime {ort.__version__}"


def measure_latency(before: ModelData, after: ModelData, feeds: dict, provider: str,
                    repeats: int = 20, threads: int | None = None, cpu: bool = False) -> dict:
    """Original and pruned timed interleaved: medians with p10-p90, and whether the pruned one is slower
    (`cpu`: thread CPU time, see `runtime.latency_ms`)."""
    runners = [Runner(m, provider, threads=threads, exact=False, spin=True) for m in (before, after)]
    stats = latency_ms(runners, [feeds, feeds], repeats=repeats, cpu=cpu)
    b, a = stats
    return {"before": b["median"], "after": a["median"], "ratio": a["median"] / b["median"],
            "before_p10": b["p10"], "before_p90": b["p90"], "after_p10": a["p10"], "after_p90": a["p90"],
            "provider": runners[0].provider, "threads": threads or "default",
            "batch_size": int(len(next(iter(feeds.values())))),
            "input_shapes": {k: list(v.shape) for k, v in feeds.items()}, "repeats": repeats,
            "clock": "thread cpu" if cpu else "wall",
            "slower": a["median"] > b["median"]}


class LatencyTable:
    """Measured latency of the model and of its counted nodes; estimates the latency of any keep vector."""

    def __init__(self, cmap: ChannelMap, data: dict, build_seconds: float = 0.0):
        self.cmap, self.data = cmap, data
        self.build_seconds = build_seconds  # spent by this run (0 when all came from the cache)
        self.widths = TensorWidths(cmap)
        self.full_ms = float(data["full_ms"])
        counted = cmap.counted
        kinds = [NodeKind(cmap, c) for c in counted]
        keys = data["node_keys"]
        node_ms = np.zeros(len(counted))
        measured = np.zeros(len(counted), dtype=bool)
        for k, (kind, key) in enumerate(zip(kinds, keys)):
            if key is not None:
                node_ms[k], measured[k] = data["nodes"][key]["full"], True
        macs = self.widths.node_macs
        rate = node_ms[measured].sum() / max(macs[measured].sum(), 1) if measured.any() else 0.0
        node_ms[~measured] = macs[~measured] * rate
        self.node_ms, self.fixed_ms = node_ms, 0.0
        # one lookup array ρ(0..W) per (node, tensor) pair, concatenated
        parts, smooth, offsets, pos = [], [], [], 0
        for (k, i), t in zip(self.widths.pairs, self.widths.pair_tensor):
            full = int(self.widths.full[t])
            rho = rho_aligned = np.arange(full + 1) / max(full, 1)
            if keys[k] is not None:
                role = kinds[k].roles[[self.widths.index[s] for s in counted[k].scale_with].index(i)]
                curve = Curve.from_json(data["nodes"][keys[k]]["curves"][role])
                if data.get("model_penalty"):  # in the model, an off-grid width also costs layout changes
                    curve.penalty = {int(c): float(v) for c, v in data["model_penalty"].items()}
                if curve.full == full:
                    rho, rho_aligned = curve.ratios(), curve.ratios(aligned=True)
            parts.append(rho)
            smooth.append(rho_aligned)
            offsets.append(pos)
            pos += full + 1
        self._lookup = np.concatenate(parts) if parts else np.zeros(0)
        self._lookup_aligned = np.concatenate(smooth) if smooth else np.zeros(0)
        self._offsets = np.array(offsets, dtype=np.int64)
        self._calibrate(data.get("half_ms"))
        self._penalties = [(self.node_ms[k], Curve.from_json(c).penalty)
                           for k, key in enumerate(keys) if key is not None
                           for c in data["nodes"][key]["curves"].values()]

    def _calibrate(self, half_ms: float | None) -> None:
        """Scale the node times by s and add L_fixed so that the estimate meets the whole model measured at
        full width and at `half_keep`: L_full = f + s·E_full, L_half = f + s·E_half (f ≥ 0, s > 0)."""
        e_full = float(self.node_ms.sum())
        if e_full <= 0:
            self.fixed_ms = self.full_ms
            return
        s, f = self.full_ms / e_full, 0.0
        if half_ms is not None:
            e_half = self.estimate_ms(half_keep(self.cmap))
            if e_full - e_half > 0 and half_ms < self.full_ms:
                s = (self.full_ms - half_ms) / (e_full - e_half)
                f = self.full_ms - s * e_full
                if f < 0:
                    s, f = self.full_ms / e_full, 0.0
        self.node_ms, self.fixed_ms = self.node_ms * s, f

    def estimate_ms(self, keep: np.ndarray, aligned: bool = False) -> float:
        """L(keep); `aligned`: without alignment penalties (monotone in the widths: what a search or a
        channel ranking stops on, before the widths are rounded to the rewarded multiple)."""
        w = np.rint(self.widths.widths(keep)).astype(np.int64)
        lookup = self._lookup_aligned if aligned else self._lookup
        rho = lookup[self._offsets + w[self.widths.pair_tensor]] if len(self._offsets) else np.zeros(0)
        return float(self.fixed_ms + (self.node_ms * self.widths.node_products(rho)).sum())

    def ratio(self, keep: np.ndarray) -> float:
        """Estimated latency of `keep` as a fraction of the measured full latency."""
        return self.estimate_ms(keep) / self.full_ms if self.full_ms > 0 else 1.0

    def aligned_ratio(self, keep: np.ndarray) -> float:
        """`ratio` without alignment penalties."""
        return self.estimate_ms(keep, aligned=True) / self.full_ms if self.full_ms > 0 else 1.0

    def class_penalty(self) -> dict[int, float]:
        """Per alignment class, the penalty measured on the whole model (`probe_keeps`), else the
        node-time-weighted median over the one-node curves that probed it (1 when none did)."""
        model = self.data.get("model_penalty") or {}
        if model:
            return {k: float(model.get(str(k), 1.0)) for k in CLASSES[1:]}
        out = {}
        for k in CLASSES[1:]:
            pairs = [(pen[k], ms) for ms, pen in self._penalties if k in pen]
            out[k] = weighted_median([v for v, _ in pairs], [ms for _, ms in pairs], default=1.0)
        return out

    def rewarded_multiple(self) -> int:
        """The smallest width multiple k ∈ {1, 8, 16, 32} whose widths run as fast as the 32-aligned ones
        (class k within TOLERANCE of its aligned interpolation). Multiples of k are multiples of every
        divisor of k, so a kernel that rewards k also rewards its multiples: a coarser class measured slower
        than a finer one is timing noise, and does not veto the finer class."""
        pen = self.class_penalty()
        return next((k for k in (1, 8, 16) if pen[k] <= 1 + TOLERANCE), 32)

    def summary(self) -> dict:
        return {"provider": self.data["provider"], "batch": self.data["batch"], "threads": self.data["threads"],
                "input_shapes": self.data["input_shapes"], "full_ms": self.full_ms,
                "explained_ms": float(self.node_ms.sum()), "node_configs": len(self.data["nodes"]),
                "class_penalty": {str(k): round(v, 3) for k, v in self.class_penalty().items()},
                "round_to": self.rewarded_multiple(), "seconds": self.build_seconds,
                "cached": bool(self.data.get("cached"))}


def weighted_median(values, weights, default: float) -> float:
    """The value at half of the total weight (values sorted), or `default` when the weights sum to 0."""
    order = np.argsort(np.asarray(values, dtype=np.float64), kind="stable")
    values, cum = np.asarray(values, dtype=np.float64)[order], np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    if len(cum) == 0 or cum[-1] <= 0:
        return default
    return float(values[int(np.searchsorted(cum, cum[-1] / 2))])


def build_table(cmap: ChannelMap, feeds: dict[str, np.ndarray], provider: str = "auto", *,
                threads: int | None = None, full: bool = True, progress=None) -> LatencyTable:
    """Measure (or load from the cache) the latency table of `cmap`'s model at the inputs `feeds`.

    `full=False` measures the whole model only (full, half and the alignment probes of `probe_keeps`):
    enough for the rewarded multiple, not for a latency target."""
    start = time.perf_counter()
    batch = int(len(next(iter(feeds.values()))))
    runner = Runner(cmap.graph.data, provider, threads=threads, exact=False, spin=True)
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    key = {"fingerprint": cmap.graph.fingerprint(), "provider": runner.provider, "input_shapes": shapes,
           "batch": batch, "threads": threads, "machine": machine()}
    path = cache_dir() / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24] + ".json")
    data = _load(path, key)
    kinds = [NodeKind(cmap, c) for c in cmap.counted]
    wanted = {k.key(batch): k for k in kinds if k.measured} if full else {}
    todo = [k for key_, k in wanted.items() if key_ not in data["nodes"]]
    if todo or data.get("full_ms") is None:
        if progress:
            progress(f"latency table: timing the model and {len(todo)} layer configurations at batch {batch} "
                     f"({runner.provider}, {threads or 'default'} threads)")
        _measure_model(cmap, runner, feeds, provider, threads, data)
        for kind in todo:
            data["nodes"][kind.key(batch)] = measure_node(kind, batch, cmap.graph.opset, provider, threads)
        data["seconds"] = data.get("seconds", 0.0) + time.perf_counter() - start
        _save(path, data)
    else:
        data["cached"] = True
    del runner
    data["node_keys"] = [k.key(batch) if k.measured and k.key(batch) in data["nodes"] else None for k in kinds]
    return LatencyTable(cmap, data, time.perf_counter() - start)


def half_keep(cmap: ChannelMap) -> np.ndarray:
    """Every prunable group cut to its middle sample width (`sample_widths`), first channels kept."""
    keep = cmap.full_keep()
    for g in cmap.prunable:
        aligned, _ = sample_widths(g.width)
        keep[g.slots[min(aligned[-2] if len(aligned) > 1 else g.width, g.width):]] = False
    return keep


def _grid(h: int) -> int:
    return 32 if h >= 64 else 8 if h >= 16 else 0


def probe_keeps(cmap: ChannelMap) -> dict:
    """Keep vectors around `half_keep` (half width h per group, on its grid: 32 when h ≥ 64, else 8):
    "lower" with every group at h − grid, and per class k ∈ {16, 8, 1} every group whose grid allows it
    at h − k (a width of class exactly k); classes no group can take are left out."""
    half = half_keep(cmap)
    out = {"lower": half.copy()}
    for k in CLASSES[1:]:
        out[k] = half.copy()
    for g in cmap.prunable:
        h = int(half[g.slots].sum())
        grid = _grid(h) if h < g.width else 0
        if grid:
            out["lower"][g.slots[h - grid:h]] = False
        for k in CLASSES[1:]:
            if k < grid and alignment(h - k) == k:
                out[k][g.slots[h - k:h]] = False
    return {k: keep for k, keep in out.items() if not np.array_equal(keep, half)}


def _measure_model(cmap: ChannelMap, runner: Runner, feeds: dict, provider: str, threads: int | None,
                   data: dict) -> None:
    """The whole model timed interleaved at full width, at `half_keep` and at the `probe_keeps`: full_ms,
    half_ms, and per class k the penalty P_k = L_k / L̂_k, where L̂_k interpolates between half and lower
    by MACs: L̂_k = L_half − (L_half − L_lower) · (M_half − M_k) / (M_half − M_lower)."""
    keeps = {"full": cmap.full_keep()}
    if cmap.prunable:
        keeps["half"] = half_keep(cmap)
        keeps.update(probe_keeps(cmap))
    runners = [runner] + [Runner(cut(cmap, keep), provider, threads=threads, exact=False, spin=True)
                          for name, keep in keeps.items() if name != "full"]
    times = dict(zip(keeps, timings(runners, [feeds] * len(runners), threads)))
    data["full_ms"], data["half_ms"] = times["full"], times.get("half")
    data["model_penalty"] = {}
    if "lower" not in times:
        return
    m_half, m_lower = cmap.macs(keeps["half"]), cmap.macs(keeps["lower"])
    slope = (times["half"] - times["lower"]) / max(m_half - m_lower, 1)
    for k in CLASSES[1:]:
        if k in times:
            expected = times["half"] - slope * (m_half - cmap.macs(keeps[k]))
            data["model_penalty"][str(k)] = times[k] / max(expected, 1e-9)


def _macs_of(cmap: ChannelMap, kind: NodeKind) -> int:
    return next(c.macs for c in cmap.counted if cmap.graph.nodes[c.node_index] is kind.node)


def _load(path: Path, key: dict) -> dict:
    try:
        data = json.loads(path.read_text())
        if data.get("key") == key:
            return data
    except (OSError, ValueError):
        pass
    return {"key": key, **{k: key[k] for k in ("provider", "input_shapes", "batch", "threads")},
            "full_ms": None, "nodes": {}}


def _save(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = {k: v for k, v in data.items() if k not in ("node_keys", "cached")}
        write_atomic(path, json.dumps(keep).encode())
    except OSError:  # a read-only cache costs a rebuild next time, nothing more
        pass
