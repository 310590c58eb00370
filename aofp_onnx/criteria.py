"""The criteria: from a pruner and a target to the channels kept (`choose_keep`), and the two that need no
search, L1 magnitude and random, scored per channel slot.

L1 (Li et al. 2017): a channel's score is Σ over the group's producers of ‖W_c‖₁, the L1 norm of the
filter that creates it (a Conv's output filter, a Gemm/MatMul column, a ConvTranspose's output slice);
scores are divided by the group's mean so that groups of different scale compare. Random: uniform
scores from the seed. Higher score = more important. AOFP and the oracle search (`search_run`), the
descent ranks and lands (`descent`).

`auto` (the default, `resolve_auto`): the descent where a target is given and its ranking costs at most
RANKING_LIMIT forwards of the model (`descent.ranking_forwards`), else AOFP. Side by side with the exact oracle
(`benchmarks/estimators.py`, no recovery), on the PP-OCR text-orientation classifier at 0.7 / 0.5 of the MACs
the descent kept 96.7 / 89.5 % of the test lines (the oracle 96.1 / 89.5 %, AOFP 87.1 / 62.6 %), on the
digits ResNet-20 91.7 / 34.8 % (the oracle 55.1 / 14.9 %, AOFP 87.3 / 17.4 %). Where its ranking is long
(one ablation per channel of the widest group: open_nsfw's ResNet-50, 682 forwards, 415 s against AOFP's
51 s prune; ddddocr's YOLOX, 499, 754 s against 159 s), where no target is given (AOFP's threshold then sets
each width: the paper's destructive search) and where an option only AOFP reads is given, AOFP runs.
"""
from __future__ import annotations

import time

import numpy as np

from .errors import InputError
from .groups import ChannelMap
from .select import select_by_score

CRITERIA = ("auto", "aofp", "descent", "l1", "random", "oracle")
RANKING_LIMIT = 256  # forwards of the model the descent's ranking may cost under `auto` (`descent.ranking_forwards`)
# options only AOFP's search reads: given one, `auto` runs AOFP
AOFP_ONLY = ("threshold", "trials_per_half", "max_trials", "estimator", "accept_by", "resume", "devices",
             "finetune_steps")
DESCENT_OPTIONS = ("memory_budget", "damage_at", "damage_norm")  # the search options the descent reads


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
    if criterion not in ("aofp", "auto") and flops_target is None and latency_target is None:
        raise InputError(f"--criterion {criterion} needs --flops-target or --latency-target (the share to keep)")


def resolve_auto(pruner, flops_target: float | None, latency_target: float | None, given: list[str],
                 batch_size: int = 32, memory_budget: int | None = None, damage_at: str = "auto") -> dict:
    """`--criterion auto`: {"criterion": aofp or descent, "why": the reason, [ranking_forwards, limit]}; `given`
    names the options set (AOFP_ONLY ones decide for AOFP)."""
    if flops_target is None and latency_target is None:
        return {"criterion": "aofp", "why": "no target: AOFP's threshold sets each layer's width"}
    only = [name for name in AOFP_ONLY if name in given]
    if only:
        return {"criterion": "aofp", "why": f"{', '.join(only)}: read by AOFP's search only"}
    from .descent import ranking_forwards

    forwards = ranking_forwards(pruner, batch_size, memory_budget, damage_at)
    chosen = "descent" if forwards <= RANKING_LIMIT else "aofp"
    why = f"the descent's ranking costs ~{forwards:.0f} forwards of the model " + \
        ("(at most" if chosen == "descent" else "(more than") + f" {RANKING_LIMIT})"
    return {"criterion": chosen, "why": why, "ranking_forwards": round(forwards, 1), "limit": RANKING_LIMIT}


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
