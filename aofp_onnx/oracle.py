"""The exact oracle: choosing channels by their damage at the model outputs, one channel at a time.

Each round removes every candidate channel c alone on top of the kept set K (the masked original
with K minus c) and measures the relative squared error of the model outputs over all calibration
batches, Σ_o Σ‖y_o − y_o,c‖² / Σ_o Σ‖y_o‖²; the `oracle_step` least damaging channels go and the
ranking is repeated until the MACs target holds. It is the reference AOFP approximates (it costs one
forward per channel per round) and the measure `benchmarks/` compares rankings with. Since the oracle is
greedy, the run to a target passes through the runs to every milder one: `passing` records the keep
vector (and the wall and CPU seconds) at which each milder target was first met, identical to a run to
that target. `check.OutputCheck` measures the same damage for a cut and a set of channels more, against the
original outputs (AOFP's `--accept-by output`).
"""
from __future__ import annotations

import time

import numpy as np

from .check import DownstreamParts
from .estimate import UNMEASURED
from .groups import ChannelMap
from .masking import KEEP_INPUT, keep_feed
from .runtime import Runner
from .search import SearchStats, macs_ratio_of
from .select import floor_for
from .trial import activation_bytes, stack_within

MAX_STACK = 64  # ablations per stacked run at most, whatever the memory budget allows


def ablation_stack(cmap: ChannelMap, memory: int, batch: int, pinned: bool = False) -> int:
    """Single ablations per stacked run on a `batch` of samples within `memory` bytes (1 where the file pins the
    batch)."""
    return 1 if pinned else min(MAX_STACK, stack_within(activation_bytes(cmap), memory, batch))


def _tile(feeds: dict[str, np.ndarray], times: int) -> dict[str, np.ndarray]:
    return {k: np.concatenate([v] * times, axis=0) if times > 1 else v for k, v in feeds.items()}



def oracle(cmap: ChannelMap, runner: Runner, batches: list[dict[str, np.ndarray]], *, flops_target: float,
           oracle_step: int | None = None, min_channels: int = 1, stack: int = 8,
           progress=None, cost=None, passing: dict | None = None,
           parts: DownstreamParts | None = None) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """Exact oracle pruning: rank single-channel ablations at the outputs over all `batches` of the
    calibration data, remove the least damaging, repeat; with `parts`, each group's ablations run on its
    downstream part (`squared_errors`). `passing` {target: None} (targets above `flops_target`) is filled with
    {target: (keep, wall seconds, CPU seconds)} as the run passes them."""
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
        dmg = output_damage(runner, batches, keep, removable, stack, parts)
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
                  stack: int, parts: DownstreamParts | None = None, progress=None) -> np.ndarray:
    """Σ‖y − y_c‖² / Σ‖y‖² over outputs and all batches, for removing each slot c alone on top of
    `keep`; `progress(ablations run)` after each stacked run."""
    num, den = squared_errors(runner, batches, keep, slots, stack, parts, progress)
    return num.sum(axis=1) / max(den.sum(), 1e-30)


def squared_errors(runner: Runner, batches: list[dict[str, np.ndarray]], keep: np.ndarray, slots: np.ndarray,
                   stack: int, parts: DownstreamParts | None = None, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Per runner output o: num[c, o] = Σ‖y_o − y_o,c‖² for removing slot c alone on top of `keep`, and
    den[o] = Σ‖y_o‖², summed over all batches. With `parts` (`check.DownstreamParts`, whose runner then runs
    the cut), each group's slots run on its downstream part, stacked, fed `keep`'s boundary tensors."""
    parts = parts if parts is not None and parts.parts else None
    runner = parts.runner if parts is not None else runner
    outputs = runner.outputs
    num, den = np.zeros((len(slots), len(outputs))), np.zeros(len(outputs))
    groups = [(None, np.arange(len(slots)))] if parts is None else _by_part(parts, slots)
    done = 0
    for feeds in batches:
        n = len(next(iter(feeds.values())))
        if parts is None:
            base = runner.run({**feeds, KEEP_INPUT: keep_feed(keep)})
        else:
            values = parts.forward(feeds, keep)
            base = [values[name] for name in outputs]
        den += [np.sum(np.square(y, dtype=np.float64)) for y in base]
        for part, index in groups:
            for start in range(0, len(index), stack):
                at = index[start:start + stack]
                rows = np.repeat(keep.astype(np.float32)[None], len(at), axis=0)
                rows[np.arange(len(at)), slots[at]] = 0.0
                rows = np.repeat(rows, n, axis=0)
                if part is None:
                    got = zip(outputs, runner.run({**_tile(feeds, len(at)), KEEP_INPUT: rows}))
                else:
                    got = zip(part.outputs, part.runner.run({**_tile(part.feeds(values), len(at)), KEEP_INPUT: rows}))
                for name, y in got:
                    o = outputs.index(name)
                    diff = y.reshape(len(at), n, -1) - base[o].reshape(1, n, -1)
                    num[at, o] += np.square(diff, dtype=np.float64).sum(axis=(1, 2))
                done += len(at)
                if progress:
                    progress(done)
    return num, den


def _by_part(parts: DownstreamParts, slots: np.ndarray) -> list[tuple]:
    """The positions of `slots` per group part (None: those off the parts), each in the given order."""
    groups = parts.slot_group[slots]
    return [(parts.parts.get(int(k)), np.flatnonzero(groups == k)) for k in dict.fromkeys(groups.tolist())
            if int(k) in parts.parts] + [(None, np.flatnonzero(~np.isin(groups, list(parts.parts))))]
