"""AOFP: choosing which channels to remove from data (the search's state machine).

AOFP (Ding et al. 2019), per prunable group g with kept set K_g and search space S_g (= K_g at start): each
trial removes a random half R_g ⊂ S_g (|R_g| = ⌊|S_g|/2⌋) on top of K and records its damage t_g (relative
squared errors downstream of g, read where `damage_at` says, see `trial`; `auto`: see `damage_point`) with
R_g. After `trials_per_half` trials, S_g is ranked by the estimated damage per channel (`estimate`: the
paper's mean over the trials that removed the channel, or a ridge fit of the damages to the trial masks); with
granu = ⌊|S_g|/2⌋, if the granu-th smallest estimate is below the threshold those granu channels are pruned
and the search restarts on K_g; else, if granu > 1, S_g shrinks to its granu best (binary search); else g is
saturated. With `check` (`--accept-by output`, what `auto` picks on a classifier whose trials read the next
layers: see `damage_point`), the half H_g of granu best channels passes when the cut with it, K ∖ H_g, stays
under the threshold at the model outputs (Σ_o ‖y_o − y_o,K∖H‖² / ‖y_o‖² against the original outputs on the
round's batch: `oracle.OutputCheck`): the trials still rank the channels, but halves of different layers are
accepted on one scale, and the threshold is a budget for the whole cut that a target raises only as far as it
needs. All groups search at once; the run stops at the target (the last prune is trimmed to land on it), when
every group is saturated (with a target, the threshold then grows by `THRESHOLD_GROWTH`, and the groups whose
recorded trials (and checks) pass it search again, see `_Group.retrace`), or at `max_trials`. The target
counts MACs, or whatever `cost(keep)` (the remaining fraction) counts: a latency table's estimate. The exact
oracle is in `oracle`.

The state machine takes a `damage(keep, rows) -> [T, G]` function, so it runs against onnxruntime
(`trial.TrialEngine`) or against a fake in tests.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import damage_point, estimate
from .cost import TensorWidths
from .errors import InputError
from .estimate import UNMEASURED
from .groups import ChannelMap
from .masking import masked_model
from .progress import SearchProgress
from .runtime import Runner
from .select import floor_for, shortest_prefix
from .statefile import STATE_FORMAT, data_digest, load_state, restore, save_state, snapshot
from .trial import (DAMAGE_AT, DAMAGE_NORMS, DEFAULT_DAMAGE_NORM, DEFAULT_MEMORY_BUDGET, TrialEngine,
                    activation_bytes)

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
    `estimator` ('mean' or 'ridge'); with `check(keep, sets) -> [len(sets)]`, a half passes by its output
    damage (`--accept-by output`), checked in turn on top of the prunes decided before it.

    `checkpoint(state)` is called after every round with the whole search state (a dict of arrays
    and plain values); `resume=state` continues from one, giving what the uninterrupted run gives.
    `after_half(keep)` is called after every round in which some group ranked a half (training-time
    AOFP fine-tunes the base path there)."""
    rng = np.random.default_rng(seed)
    groups = [_Group(g.slots, floor_for(g.width, min_channels), estimator, check is not None) for g in cmap.prunable]
    keep = cmap.full_keep()
    macs_ratio = _macs_ratio(cmap)
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


def _macs_ratio(cmap: ChannelMap):
    """keep -> MACs(keep) / MACs(full), vectorized (`cost.TensorWidths`): the search asks it every round."""
    return TensorWidths(cmap).macs_ratio


def run(pruner, criterion: str, *, flops_target: float | None, min_channels: int = 1, seed: int = 0,
        provider: str = "auto", batch_size: int = 32, threshold: float | None = None, trials_per_half: int = 8,
        max_trials: int | None = None, oracle_step: int | None = None, progress: bool = False,
        memory_budget: int | None = None, checkpoint: str | None = None, resume: str | None = None,
        tuner=None, cost=None, devices: str | None = None, estimator: str = DEFAULT_ESTIMATOR,
        damage_at: str = DEFAULT_DAMAGE_AT, damage_norm: str = DEFAULT_DAMAGE_NORM,
        accept_by: str = DEFAULT_ACCEPT_BY, refit: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """Run `criterion` ('aofp' or 'oracle') on the pruner's calibration data.

    AOFP ranks halves by `estimator` ('mean', 'ridge') of the damage read at `damage_at` ('next',
    'block', 'output'), relative per sample or over the batch (`damage_norm`; see `trial`); a half passes by
    its estimate or by the output error of the cut with it (`accept_by`; `auto` depends on the damage point
    and on `refit`, whether the cut is refitted: see `damage_point`; `threshold` defaults to
    DEFAULT_THRESHOLD or OUTPUT_THRESHOLD).
    AOFP: with `checkpoint`, the search state is saved there after every round (and removed once the
    search ends); `resume` continues a saved state (same model, data and options, else InputError).
    With `tuner` (a `finetune.BasePathTuner`), the base path is fine-tuned after every half and the
    trial session rebuilt on the new weights (no checkpoints then: the state would lack the weights).
    `devices` (AOFP, e.g. "cuda:0,cuda:1" or "cpu,cpu"): one trial session per device, sharing each round."""
    if pruner.data is None:
        raise InputError(f"--criterion {criterion} needs calibration data (--calib)")
    if devices is not None:
        from .pool import parse_devices

        devices = parse_devices(devices)
    for flag, value, allowed in (("--estimator", estimator, estimate.ESTIMATORS),
                                 ("--damage-at", damage_at, (*DAMAGE_AT, "auto")),
                                 ("--damage-norm", damage_norm, DAMAGE_NORMS), ("--accept-by", accept_by, ACCEPT_BY)):
        if value not in allowed:
            raise InputError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    if trials_per_half < 1 or batch_size < 1 or (threshold is not None and threshold <= 0):
        raise InputError("--trials-per-half and --batch-size must be at least 1, --threshold positive")
    cmap = pruner.cmap
    if not cmap.prunable:
        return cmap.full_keep(), np.zeros(0), {"trials": 0, "seconds": 0.0, "provider": None}
    budget = memory_budget or int(os.environ.get("AOFP_ONNX_MEMORY_BUDGET", DEFAULT_MEMORY_BUDGET))
    # a batch the file pins in a way the working copy could not prove away: its size per run, no stacking
    pinned = bool(getattr(pruner, "pinned", None))
    damage_at, auto = damage_point.resolve(cmap, damage_at, pinned)
    damage_norm = damage_point.resolve_norm(cmap, damage_norm)
    accept_by = damage_point.resolve_accept(cmap, damage_at, accept_by, refit)
    threshold = default_threshold(accept_by) if threshold is None else threshold
    batches = list(pruner.data.batches(pruner.batch_size(batch_size) if pinned else batch_size))
    if pinned and len(batches) > 1:  # a short last batch would be padded to the pinned size: leave it out
        batches = [b for b in batches if len(next(iter(b.values()))) == len(next(iter(batches[0].values())))]
    show = SearchProgress(criterion, {"MACs": flops_target} if flops_target is not None else None,
                          max_trials) if progress else None
    from .oracle import OutputCheck, oracle  # the oracle module builds on SearchStats

    if criterion == "oracle":
        if flops_target is None:
            raise InputError("--criterion oracle needs --flops-target")
        runner = Runner(masked_model(cmap), provider)
        stack = 1 if pinned else max(1, int(budget // (activation_bytes(cmap) * len(next(iter(batches[0].values()))))))
        keep, scores, stats = oracle(cmap, runner, batches, flops_target=flops_target, oracle_step=oracle_step,
                                     min_channels=min_channels, stack=min(stack, 64), progress=show, cost=cost)
        used = runner.provider
    else:
        if tuner is not None:
            if resume:
                raise InputError("--resume cannot continue a search that fine-tunes (--finetune-steps)")
            checkpoint = None
        engine = TrialEngine(cmap, provider, budget, devices, damage_at, damage_norm)
        stack = min(trials_per_half, engine.max_stack(len(next(iter(batches[0].values())))))
        options = {"state_format": STATE_FORMAT, "fingerprint": cmap.graph.fingerprint(),
                   "data": data_digest(batches), "threshold": threshold,
                   "trials_per_half": trials_per_half, "flops_target": flops_target, "max_trials": max_trials,
                   "min_channels": min_channels, "seed": seed, "stack": stack, "estimator": estimator,
                   "damage_at": damage_at, "damage_norm": damage_norm, "accept_by": accept_by}
        state = load_state(resume, options) if resume else None
        counter = iter(range(state["scalars"]["rounds"] if state else 0, 1 << 62))  # one damage call per round

        # pinned: each round averages the damages of the pinned batches that make up one --batch-size
        per_round = max(1, batch_size // len(next(iter(batches[0].values())))) if pinned else 1
        rounds = [batches[k:k + per_round] for k in range(0, len(batches), per_round)]

        chosen, measure = rounds[0], None

        def damage(keep, rows):
            nonlocal chosen
            chosen = rounds[next(counter) % len(rounds)]
            return sum(engine.damage(keep, rows, feeds) for feeds in chosen) / len(chosen)

        def check(keep, slots):  # --accept-by output, on the batch the round's trials ran on
            return measure(chosen, keep, slots)

        def adapt(keep):
            nonlocal engine, measure
            tuner(keep)
            # the sessions hold their weights
            engine = TrialEngine(cmap, provider, budget, devices, damage_at, damage_norm)
            measure = measure and OutputCheck(Runner(masked_model(cmap), provider))

        if accept_by == "output":
            measure = OutputCheck(Runner(masked_model(cmap), provider))

        save = (lambda st: save_state(checkpoint, st, options)) if checkpoint else None
        keep, scores, stats = aofp(cmap, damage, threshold=threshold, trials_per_half=trials_per_half,
                                   flops_target=flops_target, max_trials=max_trials, min_channels=min_channels,
                                   seed=seed, stack=stack, estimator=estimator, progress=show, checkpoint=save,
                                   resume=state, after_half=adapt if tuner is not None else None, cost=cost,
                                   check=check if measure else None)
        used = engine.provider
        stats.settings = {"estimator": estimator, "damage_at": damage_at, "damage_norm": damage_norm,
                          "accept_by": accept_by,
                          **({"damage_at_auto": auto} if auto else {})}
        if checkpoint and os.path.exists(checkpoint):
            os.unlink(checkpoint)
    if show:
        show.close()
    info = stats.to_json()
    info["provider"] = used
    if devices:
        info["devices"] = [str(d) for d in devices]
    if pinned:
        info["batch"] = f"pinned in the model to {len(next(iter(batches[0].values())))} sample(s) per run"
    if tuner is not None:
        info["finetune"] = tuner.to_json()
    if flops_target is not None and (cost or _macs_ratio(cmap))(keep) > flops_target:
        info["target_reached"] = False
    return keep, scores, info
