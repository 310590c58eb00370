"""From per-channel importance scores to a keep vector: a target, a floor, and widths the kernels reward.

A *cost* is a function keep → fraction of the original that remains: MACs by default (`macs_cost`), or a
latency table's estimate (`latency.LatencyTable.ratio`). `select_by_score` removes channels lowest score
first across groups until cost(keep) ≤ target; each group keeps at least `min_channels` (its best ones).
Scores must be comparable across groups (criteria normalize them). The removal count is found by
bisection on the sorted order, since the cost only falls as more channels go.

`round_widths` then moves each group's width to the nearest multiple of `round_to` (adding back the best
removed channels or removing the worst kept ones, never swapping: `_set_width`), and `fit_to_target` lands
on the target in steps of `round_to`: while the cost exceeds the target it removes a step from the group
where that gives up the least score per unit of cost saved; then, while a step back fits under the target,
it adds back the step that brings the most score per unit of cost (so the result ends within one step of
the target, below it; by the output error, it adds back no step that adds error, and may end lower).
With `damage` (keeps → the cut's relative output error, `search_run.CutErrors`), a step's value is the
output error it adds (or removes) instead of its score: scores of different groups need not compare (AOFP's
trials read each group's next layers on its own scale), the output error does. Measured through `prune` on
the PP-OCR text-orientation classifier (`--round-to auto`: 8, 48 search samples, 3 seeds, accuracy on 512
held-out text lines, 97.7 % before), before steps moved groups from their kept channels: at 0.7 of the MACs
95.4 % (the default search) and 97.0 % (`--accept-by auto`: output) against 82.8 and 84.8 % by scores, at
0.5 67.5 and 78.4 % against 61.7 and 65.0 %, for 85-348 forwards (2-12 s) on 48 samples; since, by the
output error, 96.6 / 95.6 % at 0.7 and 66.2 / 79.4 % at 0.5 (README, `--round-by`).
With a latency cost these moves spend the budget where a step buys the most latency per unit of damage.
(Ordering the channels themselves by score / latency bought was tried: on YOLOv8n it measured the same
latency as the score order at 1.5x the output error; benchmarks/latency_target.py compares the two orders
at equal latency.)
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .cost import TensorWidths
from .groups import ChannelMap

Cost = Callable[[np.ndarray], float]


def floor_for(width: int, min_channels: int) -> int:
    return max(1, min(width, min_channels))


def macs_cost(cmap: ChannelMap) -> Cost:
    return TensorWidths(cmap).macs_ratio


def select_by_score(cmap: ChannelMap, scores: np.ndarray, target: float, min_channels: int = 1,
                    cost: Cost | None = None) -> np.ndarray:
    """Keep vector after removing the lowest-scored channels until cost(keep) ≤ target (MACs by default)."""
    cost = cost or macs_cost(cmap)
    protected = np.zeros(cmap.n_slots, dtype=bool)
    for g in cmap.prunable:
        best = np.argsort(-scores[g.slots], kind="stable")[:floor_for(g.width, min_channels)]
        protected[g.slots[best]] = True
    order = np.argsort(np.where(protected, np.inf, scores), kind="stable")
    order = order[: int((~protected).sum())]
    keep = cmap.full_keep()
    keep[order[:shortest_prefix(keep, order, cost, target)]] = False
    return keep


def shortest_prefix(keep: np.ndarray, order: np.ndarray, cost: Cost, target: float) -> int:
    """The fewest slots of `order`, removed first to last on top of `keep`, that bring cost(keep) ≤ target
    (all of them when even that does not), by bisection: the cost only falls as more go. AOFP trims its
    last prune with it, `select_by_score` cuts with it."""
    def cost_after(k: int) -> float:
        trial = keep.copy()
        trial[order[:k]] = False
        return cost(trial)

    lo, hi = 0, len(order)
    if cost_after(hi) > target:
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if cost_after(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def round_widths(cmap: ChannelMap, keep: np.ndarray, scores: np.ndarray, round_to: int, min_channels: int = 1,
                 target: float | None = None, cost: Cost | None = None, damage=None,
                 weights: np.ndarray | None = None) -> np.ndarray:
    """Each narrowed group's width moved to the nearest multiple of `round_to` (never above its original
    width); with a target, then fitted to it (`fit_to_target`, by `damage` when given)."""
    keep = keep.copy()
    if round_to > 1:
        for g in cmap.prunable:
            width = int(keep[g.slots].sum())
            if width == g.width or g.width < round_to:
                continue
            lower = max(round_to, (width // round_to) * round_to)
            upper = min(g.width, lower + round_to) if width % round_to else width
            want = upper if (width - lower) * 2 >= round_to and upper % round_to == 0 else lower
            _set_width(keep, g.slots, scores[g.slots], max(want, floor_for(g.width, min_channels)))
    if target is not None:
        keep = fit_to_target(cmap, keep, scores, target, round_to, min_channels, cost, damage, weights)
    return keep


def allowed_widths(width: int, step: int, min_channels: int) -> list[int]:
    """The widths a group of `width` channels may take: multiples of `step` from the floor up, and `width`."""
    floor = floor_for(width, min_channels)
    if width < step or step <= 1:
        return list(range(floor, width + 1))
    first = max(step, -(-floor // step) * step)
    return sorted({width} | set(range(first, width + 1, step)))


def fit_to_target(cmap: ChannelMap, keep: np.ndarray, scores: np.ndarray, target: float, step: int = 1,
                  min_channels: int = 1, cost: Cost | None = None, damage=None,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """Widths moved along `allowed_widths` until cost ≤ target, then filled back up to within a step of it.
    A step's value: the score it removes or adds back, or with `damage(keeps) -> errors` the output error it
    adds or removes, divided by its group's `weights` (per slot, those that divided the scores); where `damage`
    gives None (its budget spent), the score. The fill takes no step that adds output error (channels given
    back to a cut can: on the PP-OCR classifier at 0.5 of the MACs, squeeze-excite channels given back left
    the oracle's landed cut at 0.247 instead of 0.214, 82.6 % of the test lines instead of 89.1 %)."""
    cost = cost or macs_cost(cmap)
    keep = keep.copy()
    allowed = {g.id: allowed_widths(g.width, step, min_channels) for g in cmap.prunable}

    def moves(direction: int):
        found = list(steps(direction))
        if damage is None or not found:
            return found
        errors = damage([keep] + [trial for _, trial, *_ in found])
        if errors is None:  # its budget spent: the scores value the remaining steps
            return found
        gained = (errors[1:] - errors[0]) * (-1 if direction > 0 else 1)  # error added (down) or removed (up)
        return [(g, trial, gained[k] / (weights[g.slots[0]] if weights is not None else 1.0), dc, after)
                for k, (g, trial, _, dc, after) in enumerate(found)]

    def steps(direction: int):
        now = cost(keep)
        for g in cmap.prunable:
            trial = step_from(keep, g, scores, allowed[g.id], direction, step)
            if trial is None:
                continue
            changed = trial[g.slots] != keep[g.slots]
            delta_score = float(np.abs(scores[g.slots][changed]).sum())
            after = cost(trial)
            yield g, trial, delta_score, now - after, after

    while cost(keep) > target:
        options = [(ds / dc if dc > 0 else np.inf, g.offset, trial) for g, trial, ds, dc, _ in moves(-1)]
        if not options:
            break
        keep = min(options, key=lambda o: (o[0], o[1]))[2]
    while True:
        options = [(ds / max(-dc, 1e-12), -g.offset, trial) for g, trial, ds, dc, after in moves(+1)
                   if after <= target and ds >= 0]
        if not options:
            return keep
        keep = max(options, key=lambda o: (o[0], o[1]))[2]


def step_from(keep: np.ndarray, g, scores: np.ndarray, allowed: list[int], direction: int, step: int,
              stride: float = 0.0) -> np.ndarray | None:
    """`keep` with group g one allowed width narrower (direction < 0; with `stride` > 0, that share of its
    width, a multiple of `step`, at least one) or wider (> 0), or None where it has no such width."""
    width = int(keep[g.slots].sum())
    nxt = [w for w in allowed if w < width][-1:] if direction < 0 else [w for w in allowed if w > width][:1]
    if direction < 0 and stride > 0:
        want = width - max(step, int(round(width * stride / step)) * step)
        nxt = [w for w in allowed if w <= want][-1:] or nxt
    if not nxt:
        return None
    trial = keep.copy()
    _set_width(trial, g.slots, scores[g.slots], nxt[0])
    return trial


def _set_width(keep: np.ndarray, slots: np.ndarray, scores: np.ndarray, width: int) -> None:
    """Move the group to `width` channels from the ones it keeps: its lowest-scored kept channels go, or its
    highest-scored removed ones come back; a kept channel is never swapped for a removed one. (Kept by score
    alone, a rounding that left a width as it was swapped channels wherever the criterion's cut is not the top
    of its scores, as AOFP's is not: its scores are estimates from different depths and cuts. On the PP-OCR
    classifier at 0.5 of the MACs an AOFP cut (output error 0.086) landed on multiples of 8 at 0.350, 63.1 % of
    the test lines; moved from its kept channels (and filled as `fit_to_target` says), at 0.219, 84.6 %.)"""
    order = np.lexsort((-scores, ~keep[slots]))
    mask = np.zeros(len(slots), dtype=bool)
    mask[order[:width]] = True
    keep[slots] = mask
