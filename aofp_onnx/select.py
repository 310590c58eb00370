"""From per-channel importance scores to a keep vector: a MACs target, a floor, and TensorRT-friendly widths.

`select_by_score` removes channels lowest score first, across groups, until the model's MACs are at most
`target · MACs₀`; each group keeps at least `min_channels` (its best ones). Scores must be comparable
across groups (criteria normalize them). The removal count is found by bisection on the sorted order,
since MACs only fall as more channels go.

`round_widths` then moves each group's width to the nearest multiple of `round_to` (adding back the
best removed channels or removing the worst kept ones); while the MACs target is exceeded, the
rounded-up group whose flooring gives up the fewest MACs is floored.
"""
from __future__ import annotations

import numpy as np

from .groups import ChannelMap


def floor_for(width: int, min_channels: int) -> int:
    return max(1, min(width, min_channels))


def select_by_score(cmap: ChannelMap, scores: np.ndarray, target: float, min_channels: int = 1) -> np.ndarray:
    """Keep vector after removing the lowest-scored channels until macs ≤ target · macs₀."""
    protected = np.zeros(cmap.n_slots, dtype=bool)
    for g in cmap.prunable:
        best = np.argsort(-scores[g.slots], kind="stable")[:floor_for(g.width, min_channels)]
        protected[g.slots[best]] = True
    order = np.argsort(np.where(protected, np.inf, scores), kind="stable")
    order = order[: int((~protected).sum())]
    goal = target * cmap.total_macs

    def keep_after(k: int) -> np.ndarray:
        keep = cmap.full_keep()
        keep[order[:k]] = False
        return keep

    lo, hi = 0, len(order)
    if cmap.macs(keep_after(hi)) > goal:
        return keep_after(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if cmap.macs(keep_after(mid)) <= goal:
            hi = mid
        else:
            lo = mid + 1
    return keep_after(lo)


def round_widths(cmap: ChannelMap, keep: np.ndarray, scores: np.ndarray, round_to: int, min_channels: int = 1,
                 target: float | None = None) -> np.ndarray:
    """Each group's kept width moved to a multiple of `round_to` (never above its original width)."""
    if round_to <= 1:
        return keep
    keep = keep.copy()
    floors = {}
    for g in cmap.prunable:
        width = int(keep[g.slots].sum())
        if width == g.width or g.width < round_to:
            continue
        lower = max(round_to, (width // round_to) * round_to)
        upper = min(g.width, lower + round_to) if width % round_to else width
        want = upper if (width - lower) * 2 >= round_to and upper % round_to == 0 else lower
        want = max(want, floor_for(g.width, min_channels))
        _set_width(keep, g.slots, scores[g.slots], want)
        floors[g.id] = lower
    if target is not None:  # over target: floor the rounded-up group that gives up the fewest MACs, repeat
        goal = target * cmap.total_macs
        while cmap.macs(keep) > goal:
            options = []
            for g in cmap.prunable:
                if g.id in floors and keep[g.slots].sum() > floors[g.id]:
                    trial = keep.copy()
                    _set_width(trial, g.slots, scores[g.slots], floors[g.id])
                    options.append((cmap.macs(keep) - cmap.macs(trial), g.id, trial))
            if not options:
                break
            keep = min(options, key=lambda o: (o[0], o[1]))[2]
    return keep


def _set_width(keep: np.ndarray, slots: np.ndarray, scores: np.ndarray, width: int) -> None:
    """Keep exactly the `width` channels of `slots` with the highest score (kept ones win ties)."""
    order = np.lexsort((~keep[slots], -scores))
    mask = np.zeros(len(slots), dtype=bool)
    mask[order[:width]] = True
    keep[slots] = mask
