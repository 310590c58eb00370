"""Ranking criteria that need no search: L1 magnitude and random, scored per channel slot.

L1 (Li et al. 2017): a channel's score is Σ over the group's producers of ‖W_c‖₁, the L1 norm of the
filter that creates it (a Conv's output filter, a Gemm/MatMul column, a ConvTranspose's output slice);
scores are divided by the group's mean so that groups of different scale compare. Random: uniform
scores from the seed. Higher score = more important.
"""
from __future__ import annotations

import numpy as np

from .groups import ChannelMap


def l1_scores(cmap: ChannelMap) -> np.ndarray:
    scores = np.zeros(cmap.n_slots)
    for g in cmap.prunable:
        total = np.zeros(g.width)
        for s in g.sources:
            node = cmap.graph.nodes[s.node_index]
            w = np.abs(cmap.graph.array(node.input[s.input_index]).astype(np.float64))
            per_index = np.moveaxis(w, s.axis, 0).reshape(w.shape[s.axis], -1).sum(axis=1)
            slots = cmap.positions(s.tensor)
            for idx, value in zip(slots, per_index):
                if idx < cmap.n_slots and g.offset <= idx < g.offset + g.width:
                    total[idx - g.offset] += value
        mean = total.mean()
        scores[g.slots] = total / mean if mean > 0 else 1.0
    return scores


def random_scores(cmap: ChannelMap, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(cmap.n_slots)
