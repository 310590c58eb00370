"""The exact oracle: choosing channels by their damage at the model outputs, one channel at a time.

Each round removes every candidate channel c alone on top of the kept set K (the masked original
with K minus c) and measures the relative squared error of the model outputs over all calibration
batches, Σ_o Σ‖y_o − y_o,c‖² / Σ_o Σ‖y_o‖²; the `oracle_step` least damaging channels go and the
ranking is repeated until the MACs target holds. It is the reference AOFP approximates (it costs one
forward per channel per round) and the measure `benchmarks/` compares rankings with. Since the oracle is
greedy, the run to a target passes through the runs to every milder one: `passing` records the keep
vector (and the wall and CPU seconds) at which each milder target was first met, identical to a run to
that target. `OutputCheck` measures the same damage for a cut and a set of channels more, against the
original outputs (AOFP's `--accept-by output`).
"""
from __future__ import annotations

import time

import numpy as np

from .estimate import UNMEASURED
from .groups import ChannelMap
from .masking import KEEP_INPUT, keep_feed
from .runtime import Runner
from .search import SearchStats, macs_ratio_of
from .select import floor_for


def _tile(feeds: dict[str, np.ndarray], times: int) -> dict[str, np.ndarray]:
    return {k: np.concatenate([v] * times, axis=0) if times > 1 else v for k, v in feeds.items()}



def oracle(cmap: ChannelMap, runner: Runner, batches: list[dict[str, np.ndarray]], *, flops_target: float,
           oracle_step: int | None = None, min_channels: int = 1, stack: int = 8,
           progress=None, cost=None, passing: dict | None = None) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """Exact oracle pruning: rank single-channel ablations at the outputs over all `batches` of the
    calibration data, remove the least damaging, repeat. `passing` {target: None} (targets above
    `flops_target`) is filled with {target: (keep, wall seconds, CPU seconds)} as the run passes them."""
    cost = cost or macs_ratio_of(cmap)
    goal = flops_target
    keep = cmap.full_keep()
    scores = np.full(cmap.n_slots, UNMEASURED)
    floors = [(g.slots, floor_for(g.width, min_channels)) for g in cmap.prunable]
    stats = SearchStats()
    start, cpu = time.perf_counter(), time.process_time()
    while cost(keep) > goal:
        removable = np.concatenate([slots[keep[slots]] for slots, floor in floors if keep[slots].sum() > floor] or
                                   [np.zeros(0, np.int64)])
        if len(removable) == 0:
            break
        dmg = output_damage(runner, batches, keep, removable, stack)
        stats.trials += len(removable)
        stats.rounds += 1
        scores[removable] = dmg
        if stats.first_half_damage is None:
            stats.first_half_damage = scores.copy()
        step = oracle_step or max(1, len(removable) // 16)
        order = removable[np.argsort(dmg, kind="stable")]
        removed = 0
        for slot in order:
            if removed >= step or cost(keep) <= goal:
                break
            slots, floor = next(f for f in floors if f[0][0] <= slot <= f[0][-1])
            if keep[slots].sum() > floor:
                keep[slot] = False
                removed += 1
                if passing:
                    _record_passing(passing, cost(keep), keep, time.perf_counter() - start,
                                    time.process_time() - cpu)
        if progress:
            progress(stats, cmap.macs(keep) / max(cmap.total_macs, 1), len(removable), cmap.n_slots)
    stats.seconds = time.perf_counter() - start
    return keep, scores, stats


def _record_passing(passing: dict, now: float, keep: np.ndarray, seconds: float, cpu: float) -> None:
    for target, seen in passing.items():
        if seen is None and now <= target:
            passing[target] = (keep.copy(), seconds, cpu)


def output_damage(runner: Runner, batches: list[dict[str, np.ndarray]], keep: np.ndarray, slots: np.ndarray,
                  stack: int) -> np.ndarray:
    """Σ‖y − y_c‖² / Σ‖y‖² over outputs and all batches, for removing each slot c alone on top of
    `keep`."""
    num, den = squared_errors(runner, batches, keep, slots, stack)
    return num.sum(axis=1) / max(den.sum(), 1e-30)


def squared_errors(runner: Runner, batches: list[dict[str, np.ndarray]], keep: np.ndarray, slots: np.ndarray,
                   stack: int) -> tuple[np.ndarray, np.ndarray]:
    """Per runner output o: num[c, o] = Σ‖y_o − y_o,c‖² for removing slot c alone on top of `keep`, and
    den[o] = Σ‖y_o‖², summed over all batches."""
    num, den = np.zeros((len(slots), len(runner.outputs))), np.zeros(len(runner.outputs))
    for feeds in batches:
        n = len(next(iter(feeds.values())))
        base = runner.run({**feeds, KEEP_INPUT: keep_feed(keep)})
        den += [np.sum(np.square(y, dtype=np.float64)) for y in base]
        for start in range(0, len(slots), stack):
            chunk = slots[start:start + stack]
            rows = np.repeat(keep.astype(np.float32)[None], len(chunk), axis=0)
            rows[np.arange(len(chunk)), chunk] = 0.0
            ys = runner.run({**_tile(feeds, len(chunk)), KEEP_INPUT: np.repeat(rows, n, axis=0)})
            for o, (y, y0) in enumerate(zip(ys, base)):
                diff = y.reshape(len(chunk), n, -1) - y0.reshape(1, n, -1)
                num[start:start + len(chunk), o] += np.square(diff, dtype=np.float64).sum(axis=(1, 2))
    return num, den


class OutputCheck:
    """`check(batches, keep, slots)`: Σ_o Σ‖y_o − y_o,K∖R‖² / Σ‖y_o‖² over `batches`, the relative
    error of the model cut to `keep` without R = `slots` against the original outputs y (AOFP's `--accept-by
    output`: a half passes while the whole cut with it stays under the threshold). One forward of the masked
    model per batch; the original outputs are kept per batch. Measured against the cut so far instead, each
    accepted half adds its error to the others': on RapidOCR's PP-LCNet orientation classifier at 0.5 of the
    MACs the cut kept 49.6 % accuracy (chance: 25 %) where against the original it kept 81.5 % (one seed).
    Each output's relative error counts on its own, as each consumer's does in the trials (`trial`): pooled,
    a large output would drown a small one (a detector's scores and boxes, MTCNN's landmarks)."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self._base = {}  # id of a batch (the caller's batches live as long as the search) -> (y, Σ‖y_o‖²)

    def __call__(self, batches: list[dict[str, np.ndarray]], keep: np.ndarray, slots: np.ndarray) -> float:
        removed = keep.copy()
        removed[slots] = False
        num, den = np.zeros(len(self.runner.outputs)), np.zeros(len(self.runner.outputs))
        for feeds in batches:
            if id(feeds) not in self._base:
                base = self.runner.run({**feeds, KEEP_INPUT: keep_feed(np.ones_like(keep))})
                self._base[id(feeds)] = base, [np.square(y0, dtype=np.float64).sum() for y0 in base]
            base, energy = self._base[id(feeds)]
            ys = self.runner.run({**feeds, KEEP_INPUT: keep_feed(removed)})
            num += [np.square(y - y0, dtype=np.float64).sum() for y, y0 in zip(ys, base)]
            den += energy
        return float((num / np.maximum(den, 1e-30)).sum())
