"""The criteria: from a pruner and a target to the channels kept (`choose_keep`), and the two that need no
search, L1 magnitude and random, scored per channel slot.

L1 (Li et al. 2017): a channel's score is Σ over the group's producers of ‖W_c‖₁, the L1 norm of the
filter that creates it (a Conv's output filter, a Gemm/MatMul column, a ConvTranspose's output slice);
scores are divided by the group's mean so that groups of different scale compare. Random: uniform
scores from the seed. Higher score = more important. AOFP and the oracle search (`search_run`), the
descent ranks and lands (`descent`).
"""
from __future__ import annotations

import time

import numpy as np

from .errors import InputError
from .groups import ChannelMap
from .select import select_by_score

CRITERIA = ("aofp", "descent", "l1", "random", "oracle")


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


def check_criterion(criterion: str, flops_target: float | None, latency_target: float | None = None) -> None:
    if criterion not in CRITERIA:
        raise InputError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if criterion != "aofp" and flops_target is None and latency_target is None:
        raise InputError(f"--criterion {criterion} needs --flops-target or --latency-target (the share to keep)")


def choose_keep(pruner, criterion: str, *, flops_target: float | None, min_channels: int = 1,
                seed: int = 0, table=None, latency_target: float | None = None, weights=None, step: int = 1,
                errors=None, **search_options) -> tuple[np.ndarray, np.ndarray, dict]:
    """(keep, scores, search stats) for a criterion; all but AOFP need a target. With `latency_target`,
    the target counts the latency `table` estimates (without alignment penalties) instead of MACs.
    `descent` lands in steps of `step` channels valued by `errors` (`targets.step_errors`; None: its scores).
    `weights` (per slot, `targets.latency_weights`) divide the scores the selection and the rounding use.
    AOFP's and the oracle's searches read damage alone (divided damage let AOFP cut PP-OCRv4 det until its
    output collapsed at 0.6 of the MACs, with α = 2 and with α = 1); their widths are then fitted with it."""
    check_criterion(criterion, flops_target, latency_target)
    if search_options.get("devices") and criterion != "aofp":
        raise InputError("--devices shares the AOFP trials between sessions; use it with --criterion aofp")
    start = time.perf_counter()
    target = latency_target if latency_target is not None else flops_target
    cost = table.aligned_ratio if latency_target is not None else None  # rounding then meets the real one
    if criterion in ("l1", "random"):
        scores = l1_scores(pruner.cmap) if criterion == "l1" else random_scores(pruner.cmap, seed)
        scores = scores / weights if weights is not None else scores
        keep = select_by_score(pruner.cmap, scores, target, min_channels, cost=cost)
        return keep, scores, {"trials": 0, "seconds": time.perf_counter() - start}
    if criterion == "descent":
        from . import descent

        return descent.run(pruner, target=target, step=step, min_channels=min_channels, cost=cost, errors=errors,
                           **search_options)
    from . import search_run

    keep, scores, info = search_run.run(pruner, criterion, flops_target=target, min_channels=min_channels, seed=seed,
                                        cost=cost, **search_options)
    return keep, (scores / weights if weights is not None and len(scores) else scores), info
