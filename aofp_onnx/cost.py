"""What a keep vector costs, fast: MACs (and, with a latency table, latency) as functions of tensor widths.

Every MAC-counted node c scales with the kept widths w_t of its channel tensors t (`Counted.scale_with`):
MACs(keep) = Σ_c m_c · Π_t w_t / W_t, the same sum as `ChannelMap.macs`. The widths of all those
tensors are one product w = A · keep with A[t, s] = how many positions of t map to slot s, so a cost
is a few vectorized gathers; the width selection evaluates thousands of candidate keep vectors.
"""
from __future__ import annotations

import numpy as np

from .groups import ChannelMap


class TensorWidths:
    """The channel tensors of the counted nodes and their kept widths under a keep vector."""

    def __init__(self, cmap: ChannelMap):
        self.cmap = cmap
        self.tensors = sorted({t for c in cmap.counted for t in c.scale_with})
        self.index = {t: i for i, t in enumerate(self.tensors)}
        rows, cols = [], []
        for i, t in enumerate(self.tensors):
            pos = cmap.positions(t)
            rows.append(np.full(len(pos), i, dtype=np.int64))
            cols.append(pos)
        self._rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)  # one entry per tensor position
        self._cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        self.full = np.bincount(self._rows, minlength=len(self.tensors)).astype(np.float64)
        # (node, tensor) pairs: which counted node scales with which tensor
        self.pairs = [(k, self.index[t]) for k, c in enumerate(cmap.counted) for t in c.scale_with]
        self.pair_node = np.array([k for k, _ in self.pairs], dtype=np.int64)
        self.pair_tensor = np.array([i for _, i in self.pairs], dtype=np.int64)
        self.node_macs = np.array([c.macs for c in cmap.counted], dtype=np.float64)

    def widths(self, keep: np.ndarray) -> np.ndarray:
        return np.bincount(self._rows, weights=keep[self._cols], minlength=len(self.tensors)).astype(np.float64)

    def node_products(self, pair_factors: np.ndarray) -> np.ndarray:
        """Π over each node's pairs of `pair_factors` (1 for a node without channel tensors)."""
        out = np.ones(len(self.node_macs))
        np.multiply.at(out, self.pair_node, pair_factors)
        return out

    def macs_ratio(self, keep: np.ndarray) -> float:
        total = self.node_macs.sum()
        if total <= 0:
            return 1.0
        w = self.widths(keep)
        fractions = w[self.pair_tensor] / np.maximum(self.full[self.pair_tensor], 1)
        return float((self.node_macs * self.node_products(fractions)).sum() / total)
