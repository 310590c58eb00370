"""The descent criterion: channels ranked by one ablation each, widths found by the output error.

Ranking: every prunable channel c is removed alone from the full model and its damage d_c read where AOFP reads a
trial's (`--damage-at auto`: the outputs on the digits nets, the next layers on the PP-OCR classifier), on the
output checks' samples (`search_run.check_batches`). At the next layers (or a block), through the trial graph
(`trial.TrialEngine`): row i of a stacked run removes channel i of every group at once, so the whole ranking is W
trial rows for the widest group's W channels (a cost that grows with W: 458 s on open_nsfw's ResNet-50, W 1024,
a row per run within the memory budget at 24 images, 224², where AOFP's whole prune took 51 s). At the outputs, through
the oracle's single ablations on each group's downstream part. Widths: from the full model (`lower`), for every
group the cut that removes the lowest-ranked share STRIDE of its kept channels (a multiple of the rounding step,
at least one); the one whose output error (`search_run.CutErrors`, Σ_o ‖y_o − y_o,K‖² / Σ_o ‖y_o‖²) grows least
per unit of cost saved is taken (its value reused between full valuations, see `lower`), until the cost (MACs, or
a latency table's estimate) meets the target; steps that lower the error then come back while it holds
(`select.fit_to_target`). Where the output error is not read (`--round-by scores`, `auto` on a detector) the steps
are valued by the ranking's damages instead (ddddocr's YOLOX captcha detector at 0.9 of the MACs: 83.3 / 99.8 %
recall / precision against the original's boxes, AOFP's cut 72.2 / 87.0 %; README, Measured).

Why not AOFP's random halves: a half's damage is far from the sum of its channels' (within-group Spearman of
AOFP's estimates against single ablations at the outputs 0.19-0.41 on the PP-OCR classifier, README,
Measured), and a next-layer threshold puts the layers on scales that do not compare at the outputs. One
ablation per channel at the next layers ranks within groups at Spearman 0.71 against the outputs' for W runs,
and the output error compares the layers. Both halves matter: on the PP-OCR classifier at 0.5 of the MACs
(48 search lines, 512 test lines, 97.7 % before, no recovery, steps of 8 without stride) the descent kept
88.5 % ranked so, 58.2 % ranked by L1, 54.7 % by AOFP's scores, 88.1 % by the oracle's removal order; the
oracle's widths with AOFP's channels 54.1 %, AOFP's widths with the oracle's 62.3 % (the oracle 81.3 % before
its landing). Through `prune` (README, `--criterion`): 87.3 % at 0.5 (the oracle 89.1 %, AOFP 66.2 %).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np

from . import damage_point
from .check import DownstreamParts
from .groups import ChannelMap
from .oracle import ablation_stack, output_damage
from .progress import SearchProgress
from .search_run import calibration_batches, check_batches, memory_budget_of, pinned_note
from .select import allowed_widths, fit_to_target, macs_cost, step_from
from .trial import DEFAULT_MEMORY_BUDGET, TrialEngine, activation_bytes, stack_within

# share of its width a group gives up per step down: 1/4 took 40 % fewer forwards on the PP-OCR classifier
# (97.1 / 91.6 % at 0.7 / 0.5) but, ranked at the next layers, kept 12.2 % of the digits at 0.5 against
# 22.1 % (the oracle 14.9 %; ranked at the outputs by the trial graph, 33.0 % either way)
STRIDE = 1 / 8
DESCENT_FORWARDS = 2048  # the most cuts the descent runs; past them the ranking's damages value the steps
# every REFRESH-th step down values every group's step afresh; between, only the taken group's new step, the
# RECHECK steps that were cheapest, and the cheapest again until it stays so (`lower`)
REFRESH = 3
RECHECK = 3


def ablations(cmap: ChannelMap, engine: TrialEngine, keep: np.ndarray, batches: list[dict[str, np.ndarray]],
              stack: int, progress=None) -> tuple[np.ndarray, int]:
    """(d [slots], trial rows run): each prunable channel's damage when removed alone on top of `keep`, as
    `engine` reads it, averaged over `batches`; row i removes channel i of every group wide enough.
    `progress(single ablations run: channels times batches, share of the work done)` after each stacked run.
    The work, in MACs (`next_layer_work`): each stacked run's base forward (the model's) and, for each ablation, its group's
    consumers (the copies the row runs). On open_nsfw (one row per run within the memory budget) that put 32 / 56 /
    78 % of the work at rows 256 / 512 / 771 of 1024, where 34 / 57 / 80 % of the 458 s had passed (by rows
    alone 25 / 50 / 75 %, by ablations alone 82 / 91 / 96 %)."""
    widest = max(len(g.slots) for g in cmap.prunable)
    damage = np.zeros(cmap.n_slots)
    work = damage_point.sink_macs(cmap)
    total = next_layer_work(cmap, stack)
    done = worked = 0
    for start in range(0, widest, stack):
        index = np.arange(start, min(widest, start + stack))
        within = [index[index < len(g.slots)] for g in cmap.prunable]  # the indices each group is wide enough for
        rows = np.ones((len(index), cmap.n_slots + 1), dtype=np.float32)
        for g, at in zip(cmap.prunable, within):
            rows[at - start, g.slots[at]] = 0.0
        got = sum(engine.damage(keep, rows, feeds) for feeds in batches) / len(batches)
        for k, (g, at) in enumerate(zip(cmap.prunable, within)):
            damage[g.slots[at]] = got[at - start, k]
        done += sum(map(len, within)) * len(batches)
        worked += cmap.total_macs + sum(w * len(at) for w, at in zip(work, within))
        if progress:
            progress(done, worked / max(total, 1))
    return damage, widest * len(batches)


def next_layer_work(cmap: ChannelMap, stack: int) -> float:
    """The MACs per sample of `ablations` at `stack` rows per run: ⌈W / stack⌉ base forwards of the model, and
    every channel's consumer copies, Σ_g w_g M(g's sinks)."""
    widths = [len(g.slots) for g in cmap.prunable]
    return -(-max(widths) // stack) * cmap.total_macs + float(np.dot(widths, damage_point.sink_macs(cmap)))


def lower(cmap: ChannelMap, keep: np.ndarray, scores: np.ndarray, target: float, step: int, min_channels: int = 1,
          cost=None, errors=None, progress=None) -> np.ndarray:
    """`keep` narrowed until cost(keep) ≤ target, one step at a time: each step removes the lowest-ranked share
    STRIDE of one group's kept channels, from the group whose step adds the least output error
    (`errors(keeps)`, e_K' − e_K) per unit of cost saved, or, where `errors` is None or its budget spent, the
    least score. A step's value changes as other groups narrow, but slowly: between full valuations (every
    REFRESH-th step) the others' are reused, except the RECHECK cheapest, valued again, and the cheapest again
    until it stays so. Through `prune` on the PP-OCR classifier (48 search lines, 512 test lines) that took
    404 / 547 forwards to 0.7 / 0.5 of the MACs against 787 / 1094 valuing every step every time, 11.0 / 14.4 s
    of search against 22-34 s, for 98.0 / 87.3 % of the test lines against 97.1 / 88.1 %; side by side with
    the oracle (`benchmarks/estimators.py`) 96.7 / 89.5 % against 97.1 / 89.5 %; on the digits ResNet-20 (64
    samples) 91.7 / 34.8 % against 91.7 / 39.8 % (the oracle 55.1 / 14.9 %) for 83 / 135 forwards against
    134 / 225. In a first trial without RECHECK, refreshed every 3rd step: 97.5 / 86.7 % on the classifier;
    every 2nd 97.1 / 85.7 %; never 76.6-81.1 % (steps of a quarter). `progress(forwards (steps where no error
    is read), cost, groups that can still narrow, groups)` after each step."""
    cost = cost or macs_cost(cmap)
    allowed = {g.id: allowed_widths(g.width, step, min_channels) for g in cmap.prunable}
    value: dict[int, float] = {}  # per group: its step's error (or score) per unit of cost, at some earlier keep
    counted = errors  # `errors` becomes None once its budget is spent; the status still counts its forwards
    for taken in range(cmap.n_slots):
        now = cost(keep)
        if now <= target:
            break
        found = {k: t for k, g in enumerate(cmap.prunable)
                 if (t := step_from(keep, g, scores, allowed[g.id], -1, step, STRIDE)) is not None}
        if not found:
            break
        if taken % REFRESH == 0:
            value.clear()
        stale = sorted((k for k in found if k in value), key=value.get)
        fresh = [k for k in found if k not in value] + stale[:RECHECK]
        valued: set[int] = set()
        while fresh:
            got = errors([keep] + [found[k] for k in fresh]) if errors is not None else None
            if got is None and errors is not None:  # its budget spent: the ranking values the rest
                errors, fresh = None, list(found)
                value.clear()
                continue
            for i, k in enumerate(fresh):
                slots = cmap.prunable[k].slots
                added = got[i + 1] - got[0] if got is not None else \
                    float(np.abs(scores[slots][found[k][slots] != keep[slots]]).sum())
                saved = now - cost(found[k])
                value[k] = added / saved if saved > 0 else np.inf
            valued.update(fresh)
            best = min(found, key=lambda k: (value[k], cmap.prunable[k].offset))
            fresh = [] if best in valued else [best]
        keep = found[best]
        del value[best]
        if progress:
            progress(counted.checks if counted is not None else taken + 1, cost(keep), len(found), len(cmap.prunable))
    return keep


def descend(cmap: ChannelMap, rank, batches: list[dict[str, np.ndarray]], *, target: float, step: int,
            min_channels: int = 1, cost=None, errors=None, progress: bool = False,
            ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(keep, scores, the report's search section): `rank(batches, progress) -> (d, trial rows)`, then the
    descent to `target` in steps of `step` channels, valued by `errors` (`search_run.CutErrors`, its budget
    raised to DESCENT_FORWARDS) or, without, by the scores. With `progress`, a status line for each (on
    open_nsfw's ResNet-50 the ranking alone ran 458 s)."""
    start = time.perf_counter()
    total = sum(len(g.slots) for g in cmap.prunable) * len(batches)
    with _status(progress, f"of {total} single ablations", total) as show:
        scores, trials = rank(batches, show and (lambda done, share=None: show(done, None, 0, 0, share=share)))
    ranked = time.perf_counter() - start
    if errors is not None:
        errors.allow(DESCENT_FORWARDS)
    name = "MACs" if cost is None else "latency"
    with _status(progress, "forwards" if errors is not None else "steps", None, {name: target}) as show:
        keep = lower(cmap, cmap.full_keep(), scores, target, step, min_channels, cost, errors,
                     show and (lambda count, ratio, active, total: show(count, None, active, total,
                                                                        **{name.lower(): ratio})))
    keep = fit_to_target(cmap, keep, scores, target, step, min_channels, cost, errors)  # the fill back up
    info = {"trials": trials, "seconds": time.perf_counter() - start, "ranking_seconds": ranked, "stride": STRIDE,
            "refresh": REFRESH, "recheck": RECHECK}
    if errors is not None:
        info.update(forwards=errors.checks, **({"budget_spent": True} if errors.spent else {}))
    return keep, scores, info


@contextmanager
def _status(enabled: bool, counted: str, total: int | None, targets: dict | None = None):
    """`show(count, MACs ratio, active, total, share=None, **ratios)`: a `progress.SearchProgress` status line,
    its ETA from the ranking's `share` of its work (else the share of `total` counted) or from the `targets`'
    ratios (the steps); None when disabled."""
    if not enabled:
        yield None
        return
    line = SearchProgress("descent", targets, max_trials=total, counted=counted,
                          active="" if total else "groups narrowing")
    calls, tenths = iter(range(1, 1 << 40)), set()

    def show(count, *args, share=None, **ratios):
        # in a log, a line every 10 steps (or 30 s) as AOFP's, and for the ranking (a stacked run of one row
        # where the memory budget holds a run to one row: 1024 runs on open_nsfw) at each tenth of its ablations
        tenth = 10 * count // total if total else None
        first = tenth not in tenths
        tenths.add(tenth)
        line(SimpleNamespace(trials=count, rounds=int(first) if total else next(calls), share=share), *args,
             **ratios)

    try:
        yield show
    finally:
        line.close()


def ranking(cmap: ChannelMap, point: str, norm: str, provider: str = "auto", memory: int = DEFAULT_MEMORY_BUDGET,
            pinned: bool = False):
    """(`rank(batches, progress=None) -> (d, trial rows)`, the provider it runs on; `progress(single ablations
    run)` after each stacked run): at the outputs the oracle's single
    ablations (`oracle.output_damage`, each group's on its downstream part, stacked: 4.8 s against 12.3 s
    through the output trial graph on the digits ResNet-20, 64 samples), elsewhere `ablations` through the
    trial graph."""
    full = cmap.full_keep()
    if point == "output":
        parts = DownstreamParts(cmap, provider, memory)
        slots = np.concatenate([g.slots for g in cmap.prunable])

        def rank(batches, progress=None):
            stack = ablation_stack(cmap, memory, len(next(iter(batches[0].values()))), pinned)
            damage = np.zeros(cmap.n_slots)
            damage[slots] = output_damage(parts.runner, batches, full, slots, stack, parts, progress)
            return damage, len(slots) * len(batches)

        return rank, parts.runner.provider
    engine = TrialEngine(cmap, provider, memory, None, point, norm)

    def rank(batches, progress=None):
        # the trial graph stacks its copies past the base, which alone runs the pinned batch (AOFP's trials too)
        stack = engine.max_stack(len(next(iter(batches[0].values()))))
        return ablations(cmap, engine, full, batches, stack, progress)

    return rank, engine.provider


def ranking_forwards(pruner, batch_size: int = 32, memory_budget: int | None = None, damage_at: str = "auto") -> float:
    """The ranking's work before it runs, in forwards of the whole model on the same samples: at the next layers
    (or a block) `next_layer_work` / M at the stack the memory budget allows; at the outputs one base forward plus every channel's downstream part, Σ_g w_g
    M(downstream of g) / M. Through `prune` (batch 32): 62 on the PP-OCR classifier (48 search lines; a ranking of
    2-5 s), 79 on the MNIST CNN and 171 on the digits ResNet-20 (outputs), 161 on nudenet's YOLOv8n (12 images,
    batch pinned to 1); 276 on occular's orinet, 444 on the float16 PP-LCNet (24 pages, batch 16; ranked in 38 s),
    508 on PP-OCRv4 det (36 pages at 320²), 682 on open_nsfw (18 images; 415 s), 499 on ddddocr's YOLOX (48
    captchas; 754 s)."""
    cmap = pruner.cmap
    if not cmap.prunable:
        return 0.0
    point, _ = damage_point.resolve(cmap, damage_at, bool(getattr(pruner, "pinned", None)))
    if point == "output":
        widths = [len(g.slots) for g in cmap.prunable]
        return 1 + float(np.dot(widths, damage_point.downstream_macs(cmap))) / cmap.total_macs
    batch = len(next(iter(check_batches(calibration_batches(pruner, batch_size))[0].values())))
    return next_layer_work(cmap, stack_within(activation_bytes(cmap), memory_budget_of(memory_budget), batch)) / \
        cmap.total_macs


def run(pruner, *, target: float, step: int, min_channels: int = 1, cost=None, errors=None, provider: str = "auto",
        batch_size: int = 32, memory_budget: int | None = None, damage_at: str = "auto", damage_norm: str = "auto",
        progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """`descend` on the pruner's output-check samples (`search_run.check_batches`), its damage read where
    `damage_at` and `damage_norm` resolve as AOFP's do (`damage_point`)."""
    cmap = pruner.cmap
    if not cmap.prunable:
        return cmap.full_keep(), np.zeros(cmap.n_slots), {"trials": 0, "seconds": 0.0, "provider": None}
    pinned = bool(getattr(pruner, "pinned", None))
    point, auto = damage_point.resolve(cmap, damage_at, pinned)
    norm = damage_point.resolve_norm(cmap, damage_norm)
    rank, used = ranking(cmap, point, norm, provider, memory_budget_of(memory_budget), pinned)
    batches = check_batches(calibration_batches(pruner, batch_size))
    keep, scores, info = descend(cmap, rank, batches, target=target, step=step, min_channels=min_channels, cost=cost,
                                 errors=errors, progress=progress)
    return keep, scores, {**info, "provider": used, "damage_at": point, "damage_norm": norm,
                          **({"damage_at_auto": auto} if auto else {}),
                          **({"batch": pinned_note(batches)} if pinned else {})}
