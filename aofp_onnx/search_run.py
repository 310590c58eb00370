"""Running a criterion's search on a pruner's calibration data: the options resolved and refused, the batches
(a batch the file pins: its own size per run, rounds averaging the pinned batches that make up one
--batch-size), the trial engine, the output check, checkpoints, and the report's `search` section. The
state machine itself is `search.aofp`; the exact oracle `oracle.oracle`."""
from __future__ import annotations

import os
import time

import numpy as np

from . import damage_point, estimate
from .errors import InputError
from .check import CHECK_SAMPLES, DownstreamParts
from .oracle import ablation_stack, oracle
from .progress import SearchProgress
from .search import (ACCEPT_BY, DEFAULT_ACCEPT_BY, DEFAULT_DAMAGE_AT, DEFAULT_ESTIMATOR, aofp, default_threshold,
                     macs_ratio_of)
from .statefile import STATE_FORMAT, data_digest, load_state, save_state
from .trial import DAMAGE_AT, DAMAGE_NORMS, DEFAULT_DAMAGE_NORM, DEFAULT_MEMORY_BUDGET, TrialEngine

# the most cuts `--round-by output` runs (CutErrors): 17-348 on the digits nets and the PP-OCR classifier, where
# PP-LCNet (224², 17 groups) asked 1437 at 0.8 of the MACs: 66 s, most of its prune
FIT_FORWARDS = 512


def memory_budget_of(given: int | None = None) -> int:
    """The bytes of activations a stacked run (trials, an output check's boundary tensors) may hold: `given`,
    else the environment's AOFP_ONNX_MEMORY_BUDGET, else DEFAULT_MEMORY_BUDGET."""
    if given is not None:
        return given
    value = os.environ.get("AOFP_ONNX_MEMORY_BUDGET", "")
    if not value:
        return DEFAULT_MEMORY_BUDGET
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"AOFP_ONNX_MEMORY_BUDGET must be a positive number of bytes, got {value!r}")
    return int(value)


def check_batches(batches: list[dict[str, np.ndarray]], limit: int = CHECK_SAMPLES) -> list[dict[str, np.ndarray]]:
    """The leading batches holding at most `limit` samples (at least one batch): what every output check of a
    search runs on, the same samples each time. Checked on the round's batch instead, the cut's error was
    measured on whichever batch the round drew, and a budget met on a short batch let that batch alone drive
    the cut: PP-LCNet (orientation) on 21 pages in batches of 16 and 5, at 0.6 of the MACs, kept 48.4 / 46.7 %
    of held-out pages (seeds 0 / 1) where checked on all 21 it kept 88.9 / 99.6 % (README: on 64 pages)."""
    out, total = [], 0
    for feeds in batches:
        n = len(next(iter(feeds.values())))
        if out and total + n > limit:
            break
        out.append(feeds)
        total += n
    return out


def calibration_batches(pruner, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The pruner's calibration data in batches of `batch_size`; for a batch the file pins, of that size (a
    short last batch, which would be padded to it, left out)."""
    pinned = bool(getattr(pruner, "pinned", None))
    batches = list(pruner.data.batches(pruner.batch_size(batch_size) if pinned else batch_size))
    if pinned and len(batches) > 1:
        batches = [b for b in batches if len(next(iter(b.values()))) == len(next(iter(batches[0].values())))]
    return batches


def pinned_note(batches: list[dict[str, np.ndarray]]) -> str:
    """The report's `search.batch` where the file pins the batch."""
    return f"pinned in the model to {len(next(iter(batches[0].values())))} sample(s) per run"


class CutErrors:
    """`errors(keeps) -> [len(keeps)]`: each cut's relative output error against the original
    (`check.OutputCheck`, the masked model without the removed channels) on the samples an output check of the
    search runs on (`check_batches`); a keep that differs from the first of its call within one group runs that
    group's downstream part (`check.DownstreamParts`; a fit's steps do); each distinct keep is run once (`checks`
    counts them), at most `budget` of them: past it, None (the caller values its steps otherwise); `seconds` sums
    the time its runs took; the parts' boundary tensors held within `memory` bytes (`memory_budget_of`), as
    the search's are. What `select.fit_to_target` values the rounding's steps by with `--round-by output`."""

    def __init__(self, cmap, batches: list[dict[str, np.ndarray]], provider: str = "auto",
                 budget: int = FIT_FORWARDS, memory: int | None = None):
        self.cmap, self.provider, self.memory = cmap, provider, memory_budget_of(memory)
        self.batches = check_batches(batches)
        self.measure = None  # the masked model's session, built at the first cut to run (a fit may run none)
        self.budget = budget
        self.spent = False  # a call was refused for the budget
        self.seen: dict[bytes, float] = {}
        self.seconds = 0.0

    @property
    def checks(self) -> int:
        return len(self.seen)

    def allow(self, more: int) -> None:
        """`more` forwards from now on (a latency target's refit after the landing spent its own)."""
        self.budget = self.checks + more

    def __call__(self, keeps: list[np.ndarray]) -> np.ndarray | None:
        new = {keep.tobytes() for keep in keeps} - set(self.seen)
        if len(self.seen) + len(new) > self.budget:
            self.spent = True
            return None
        start = time.perf_counter()
        if new and self.measure is None:
            self.measure = DownstreamParts(self.cmap, self.provider, self.memory).check()
        for keep in keeps:
            if keep.tobytes() not in self.seen:
                self.seen[keep.tobytes()] = self.measure.error(self.batches, keeps[0], keep)
        self.seconds += time.perf_counter() - start
        return np.array([self.seen[keep.tobytes()] for keep in keeps])


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
    budget = memory_budget_of(memory_budget)
    # a batch the file pins in a way the working copy could not prove away: its size per run, no stacking
    pinned = bool(getattr(pruner, "pinned", None))
    damage_at, auto = damage_point.resolve(cmap, damage_at, pinned)
    damage_norm = damage_point.resolve_norm(cmap, damage_norm)
    accept_by = damage_point.resolve_accept(cmap, damage_at, accept_by, refit)
    threshold = default_threshold(accept_by) if threshold is None else threshold
    batches = calibration_batches(pruner, batch_size)
    show = SearchProgress(criterion, {"MACs": flops_target} if flops_target is not None else None,
                          max_trials) if progress else None
    if criterion == "oracle":
        if flops_target is None:
            raise InputError("--criterion oracle needs --flops-target")
        parts = DownstreamParts(cmap, provider, budget)
        runner = parts.runner
        stack = ablation_stack(cmap, budget, len(next(iter(batches[0].values()))), pinned)
        keep, scores, stats = oracle(cmap, runner, batches, flops_target=flops_target, oracle_step=oracle_step,
                                     min_channels=min_channels, stack=stack, progress=show, cost=cost, parts=parts)
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

        def output_check():  # --accept-by output; built again after fine-tuning changed the weights
            return DownstreamParts(cmap, provider, budget).check()

        measure = output_check() if accept_by == "output" else None

        def damage(keep, rows):
            chosen = rounds[next(counter) % len(rounds)]
            return sum(engine.damage(keep, rows, feeds) for feeds in chosen) / len(chosen)

        checked_on = check_batches(batches)

        def check(keep, slots):  # --accept-by output
            return measure(checked_on, keep, slots)

        def adapt(keep):
            nonlocal engine, measure
            tuner(keep)
            # the sessions hold their weights
            engine = TrialEngine(cmap, provider, budget, devices, damage_at, damage_norm)
            measure = measure and output_check()

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
        info["batch"] = pinned_note(batches)
    if tuner is not None:
        info["finetune"] = tuner.to_json()
    if flops_target is not None and (cost or macs_ratio_of(cmap))(keep) > flops_target:
        info["target_reached"] = False
    return keep, scores, info
