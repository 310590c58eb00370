"""AOFP: choosing which channels to remove from data (the search's state machine).

AOFP (Ding et al. 2019), per prunable group g with kept set K_g and search space S_g (= K_g at start): each trial
removes a random half R_g ⊂ S_g (|R_g| = ⌊|S_g|/2⌋) on top of K and records its damage t_g (relative squared
errors downstream of g, read where `damage_at` says, see `trial`; `auto`: see `damage_point`) with R_g. After
`trials_per_half` trials, S_g is ranked by the estimated damage per channel (`estimate`: the paper's mean over the
trials that removed the channel, or a ridge fit of the damages to the trial masks); with granu = ⌊|S_g|/2⌋, if the
granu-th smallest estimate is below the threshold those granu channels are pruned and the search restarts on K_g;
else, if granu > 1, S_g shrinks to its granu best (binary search); else g is saturated. With `check`
(`--accept-by output`, what `auto` picks on a classifier whose trials read the next layers: see `damage_point`),
the half H_g of granu best channels passes when the cut with it, K ∖ H_g, stays under the threshold at the model
outputs (Σ_o ‖y_o − y_o,K∖H‖² / ‖y_o‖² against the original outputs on the same calibration samples every
time: `check.OutputCheck`, `search_run.check_batches`): the trials still rank the channels, but halves of
different layers are accepted on one scale, and the threshold is a budget for the whole cut that a target raises
only as far as it needs. All groups search at once; the run stops at the target (the last prune is trimmed to land
on it), when every group is saturated (with a target, the threshold then grows by `THRESHOLD_GROWTH`, and the
groups whose recorded trials (and checks) pass it search again, see `_Group.retrace`), or at `max_trials`. The
target counts MACs, or whatever `cost(keep)` (the remaining fraction) counts: a latency table's estimate. The exact
oracle is in `oracle`.

The state machine takes a `damage(keep, rows) -> [T, G]` function, so it runs against onnxruntime
(`trial.TrialEngine`) or against a fake in tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import estimate
from .cost import TensorWidths
from .estimate import UNMEASURED
from .groups import ChannelMap
from .select import floor_for, shortest_prefix
from .statefile import restore, snapshot

DEFAULT_ESTIMATOR = "mean"
DEFAULT_THRESHOLD = 0.01  # relative damage a half may do (the paper's ε; --threshold)
OUTPUT_THRESHOLD = 0.001  # the same with --accept-by output: at the outputs (README: figures)
ACCEPT_BY = ("auto", "estimate", "output")
DEFAULT_ACCEPT_BY = "estimate"  # `auto`: see damage_point (README: why not the default yet)
THRESHOLD_GROWTH = 1.25  # the raise when every group saturated before the target (README: figures)
DEFAULT_DAMAGE_AT = "auto"  # see damage_point


def default_threshold(accept_by: str) -> float:
    """--threshold's default for the resolved --accept-by ('estimate' or 'output')."""
    return OUTPUT_THRESHOLD if accept_by == "output" else DEFAULT_THRESHOLD


@dataclass
class _Group:
    """One group's search: kept set and search space (local indices), and the trials since its last prune
    (`masks` [T, width], True where trial t removed the channel; `damage` [T]; `levels` [T], the depth of
    the binary search each was made at; `level`, the current depth; `checked` [depth], each depth's
    half's output damage with `--accept-by output`, NaN where none was measured)."""
    slots: np.ndarray
    floor: int
    estimator: str = DEFAULT_ESTIMATOR
    by_output: bool = False
    kept: np.ndarray = None
    space: np.ndarray = None
    masks: np.ndarray = None
    damage: np.ndarray = None
    levels: np.ndarray = None
    level: int = 0
    score: np.ndarray = None
    checked: np.ndarray = None
    saturated: bool = False

    def __post_init__(self):
        w = len(self.slots)
        self.kept = np.ones(w, dtype=bool)
        self.score = np.full(w, UNMEASURED)
        self.restart()

    def restart(self):
        """Search the whole kept set afresh (at the start and after a prune)."""
        self.masks = np.zeros((0, len(self.slots)), dtype=bool)
        self.damage = np.zeros(0)
        self.levels = np.zeros(0, dtype=np.int64)
        self.checked = np.full(len(self.slots).bit_length() + 1, np.nan)
        self._top()

    def _top(self):
        self.space = np.flatnonzero(self.kept)
        self.level = 0
        self.saturated = len(self.space) < 2 or int(self.kept.sum()) <= self.floor

    @property
    def trials(self) -> int:
        """Trials made at the current depth."""
        return int((self.levels == self.level).sum())

    def record(self, removed: np.ndarray, damage: np.ndarray):
        """Add trials: `removed` [T, h] local indices each trial removed, `damage` [T]."""
        masks = np.zeros((len(removed), len(self.slots)), dtype=bool)
        np.put_along_axis(masks, removed, True, axis=1)
        self.masks = np.concatenate([self.masks, masks])
        self.damage = np.concatenate([self.damage, damage])
        self.levels = np.concatenate([self.levels, np.full(len(removed), self.level)])

    def estimates(self) -> np.ndarray:
        """Per local channel, the estimated damage (`estimate`) over the space; UNMEASURED elsewhere."""
        out = np.full(len(self.slots), UNMEASURED)
        at = self.levels == self.level
        out[self.space] = estimate.scores(self.estimator, self.masks[at][:, self.space], self.damage[at])
        return out

    def half(self, means: np.ndarray, threshold: float) -> tuple[np.ndarray, bool]:
        """The better half of the space by `means` (⌊|S|/2⌋ channels, lowest first), and whether it passes:
        its damage under the threshold (its worst estimate; with `by_output`, its checked output damage, NaN
        where none was measured, which fails) and the floor kept without it."""
        cand = self.best(means)
        damage = self.checked[self.level] if self.by_output else self.worst(means, cand)
        return cand, self.may_prune(cand) and damage < threshold

    def best(self, means: np.ndarray) -> np.ndarray:
        return self.space[np.argsort(means[self.space], kind="stable")][:len(self.space) // 2]

    def may_prune(self, cand: np.ndarray) -> bool:
        return len(cand) >= 1 and int(self.kept.sum()) - len(cand) >= self.floor

    @staticmethod
    def worst(means: np.ndarray, cand: np.ndarray) -> float:
        return float(means[cand[-1]]) if len(cand) else np.inf

    def worst_estimate(self) -> float:
        """The worst estimate of the half a decision would take now (the order decisions are made in)."""
        means = self.estimates()
        return self.worst(means, self.best(means))

    def descend(self, cand: np.ndarray):
        self.space = cand
        self.level += 1

    def retrace(self, threshold: float):
        """After the threshold rose: follow the search since the last prune again on its recorded trials. If
        a depth's half now passes, the group searches again from its whole kept set on fresh trials (other
        groups' widths changed since); else it stays saturated at no cost (restarting every group made
        each raise cost a search of every group, most of them repeating what was recorded; with `by_output`,
        checking the recorded half afresh without new trials raised the threshold further for less accuracy:
        77.1 against 87.5 % on the PP-OCR classifier at 0.5 of the MACs, one seed)."""
        self._top()
        while not self.saturated and self.trials:
            cand, passes = self.half(self.estimates(), threshold)
            if passes:
                self.restart()
                return
            if len(cand) > 1:
                self.descend(cand)
            else:
                self.saturated = True


@dataclass
class SearchStats:
    trials: int = 0
    rounds: int = 0
    checks: int = 0
    seconds: float = 0.0
    threshold: float = 0.0
    first_half_damage: np.ndarray | None = None
    history: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"trials": self.trials, "rounds": self.rounds, **({"checks": self.checks} if self.checks else {}),
               "seconds": self.seconds, **self.settings}
        return {**out, "threshold": self.threshold} if self.threshold else out


def aofp(cmap: ChannelMap, damage, *, threshold: float = DEFAULT_THRESHOLD, trials_per_half: int = 8,
         flops_target: float | None = None, max_trials: int | None = None, min_channels: int = 1,
         seed: int = 0, stack: int = 8, estimator: str = DEFAULT_ESTIMATOR, progress=None, checkpoint=None,
         resume: dict | None = None, after_half=None, cost=None,
         check=None) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """The AOFP binary search over all prunable groups; `damage(keep, rows) -> [T, G]`; halves ranked by
    `estimator` ('mean' or 'ridge'); with `check(keep, slots) -> float`, a half passes by the output error of
    the cut without it (`--accept-by output`), checked in turn on top of the prunes decided before it.

    `checkpoint(state)` is called after every round with the whole search state (a dict of arrays
    and plain values); `resume=state` continues from one, giving what the uninterrupted run gives.
    `after_half(keep)` is called after every round in which some group ranked a half (training-time
    AOFP fine-tunes the base path there)."""
    rng = np.random.default_rng(seed)
    groups = [_Group(g.slots, floor_for(g.width, min_channels), estimator, check is not None) for g in cmap.prunable]
    keep = cmap.full_keep()
    macs_ratio = macs_ratio_of(cmap)
    cost = cost or macs_ratio
    goal = flops_target
    stats = SearchStats(threshold=threshold)
    if resume is not None:
        threshold = restore(resume, groups, keep, rng, stats)
    start = time.perf_counter() - stats.seconds
    while True:
        if goal is not None and cost(keep) <= goal:
            break
        if max_trials is not None and stats.trials >= max_trials:
            break
        active = [k for k, g in enumerate(groups) if not g.saturated]
        if not active:
            if goal is None or threshold > 1e6:
                break
            threshold *= THRESHOLD_GROWTH  # a target the threshold cannot reach
            stats.threshold = threshold  # the progress line says so
            for g in groups:
                g.retrace(threshold)
            continue
        t = min(stack, min(trials_per_half - groups[k].trials for k in active))
        if max_trials is not None:
            t = max(1, min(t, max_trials - stats.trials))
        rows = np.ones((t, cmap.n_slots + 1), dtype=np.float32)
        picks = {}
        for k in active:
            g = groups[k]
            half = len(g.space) // 2
            chosen = np.stack([rng.choice(g.space, size=half, replace=False) for _ in range(t)])
            picks[k] = chosen
            for row, local in zip(rows, chosen):
                row[g.slots[local]] = 0.0
        dmg = damage(keep, rows)
        stats.trials += t
        stats.rounds += 1
        for k in active:
            groups[k].record(picks[k], dmg[:, k])
        decided = [k for k in active if groups[k].trials >= trials_per_half]
        if stats.first_half_damage is None and decided:
            stats.first_half_damage = np.full(cmap.n_slots, np.nan)
            for k in decided:
                stats.first_half_damage[groups[k].slots] = groups[k].estimates()
        # decide the most harmless prunes first, so a target is met by the cheapest ones
        decided.sort(key=lambda k: groups[k].worst_estimate())
        for k in decided:
            if goal is not None and cost(keep) <= goal:
                break
            stats.checks += _decide(groups[k], keep, cost, threshold, goal, check)
        stats.history.append((stats.trials, macs_ratio(keep)))
        if after_half is not None and decided:
            after_half(keep)
        if checkpoint is not None:
            stats.seconds = time.perf_counter() - start
            checkpoint(snapshot(groups, keep, rng, stats, threshold))
        if progress:
            progress(stats, macs_ratio(keep), sum(not g.saturated for g in groups), len(groups))
    stats.seconds = time.perf_counter() - start
    stats.threshold = threshold
    scores = np.zeros(cmap.n_slots)
    for g in groups:
        scores[g.slots] = g.score
    return keep, scores, stats


def _decide(g: _Group, keep: np.ndarray, cost, threshold: float, goal: float | None, check=None) -> int:
    """Prune the group's half, descend or saturate; the number of output checks made (0 or 1)."""
    means = g.estimates()
    g.score[g.space] = means[g.space]
    best = g.best(means)
    checked = check is not None and g.may_prune(best)
    if checked:
        g.checked[g.level] = check(keep, g.slots[best])
    cand, passes = g.half(means, threshold)
    if passes:
        if goal is not None:
            cand = cand[:shortest_prefix(keep, g.slots[cand], cost, goal)]  # the last prune lands on it
        g.kept[cand] = False
        keep[g.slots[cand]] = False
        g.restart()
    elif len(cand) > 1:
        g.descend(cand)
    else:
        g.saturated = True
    return int(checked)


def macs_ratio_of(cmap: ChannelMap):
    """keep -> MACs(keep) / MACs(full), vectorized (`cost.TensorWidths`): the search asks it every round."""
    return TensorWidths(cmap).macs_ratio
