"""AOFP and the exact oracle: choosing which channels to remove from data.

AOFP (Ding et al. 2019), per prunable group g with kept set K_g and search space S_g (= K_g at start):
each trial removes a random half R_g ⊂ S_g (|R_g| = ⌊|S_g|/2⌋) on top of K and adds its damage t_g
(the next layers' relative squared errors, see `trial`) to every channel of R_g. After `trials_per_half`
trials, S_g is ranked by mean damage; with granu = ⌊|S_g|/2⌋, if the granu-th smallest mean is below
the threshold those granu channels are pruned and the search restarts on K_g; else, if granu > 1,
S_g shrinks to its granu best (binary search); else g is saturated. All groups search at once; the
run stops at the target (the last prune is trimmed to land on it), when every group is saturated
(with a target, the threshold then doubles and the search goes on), or at `max_trials`. The target counts
MACs, or whatever `cost(keep)` (the remaining fraction) counts: a latency table's estimate.

The oracle zeroes one channel at a time, measures the relative squared error of the model outputs
Σ‖y − y_c‖² / Σ‖y‖² over the calibration data, removes the `oracle_step` least damaging channels and
ranks again until the target holds.

The AOFP state machine takes a `damage(keep, rows) -> [T, G]` function, so it runs against
onnxruntime (`TrialEngine`) or against a fake in tests.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .groups import ChannelMap
from .masking import KEEP_INPUT, keep_feed, masked_model
from .progress import SearchProgress
from .runtime import CUDA, Runner
from .select import floor_for
from .trial import DAMAGE_OUTPUT, TRIAL_INPUT, build_trial_model

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of activations one stacked run may use
UNMEASURED = 1e9  # score of a channel no trial has measured yet (ranks as important)


def _tile(feeds: dict[str, np.ndarray], times: int) -> dict[str, np.ndarray]:
    return {k: np.concatenate([v] * times, axis=0) if times > 1 else v for k, v in feeds.items()}


def _activation_bytes(cmap: ChannelMap) -> int:
    """Bytes of all node outputs for one sample (shapes of the analysis view, per sample)."""
    total = 0
    for node in cmap.graph.nodes:
        for out in node.output:
            shape = cmap.graph.shape(out)
            if shape:
                total += 4 * int(np.prod(shape)) // max(cmap.graph.batch, 1)
    return max(total, 1)


class TrialEngine:
    """The trial graph's session; scores stacked trials for every group in one run.

    A group whose channels no row removes scores exactly 0 and is left out of the run: once a quarter of
    the session's groups have saturated, the session is rebuilt for the groups still searching
    (`build_trial_model(cmap, ids)`), so the others' consumer copies, which would cost as much as ever,
    stop running (at most log₄⁄₃ G rebuilds per restart of the search). One session at a time holds the
    weights. With `devices` (`pool.parse_devices`), one session per device shares the rows of each run."""

    def __init__(self, cmap: ChannelMap, provider: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 devices: list | None = None):
        self.cmap = cmap
        self.devices = devices
        self._session = tuple(range(len(cmap.prunable))), self._runner(build_trial_model(cmap), provider)
        self.provider = self._session[1].provider
        # per stacked trial and sample, the copies hold about one activation set at a time (each copy's
        # stacked input, output and difference are freed once its damage is reduced); measured peaks
        # stay well under this bound (benchmarks/aofp_vs_oracle.py prints the search's peak memory)
        self.sample_bytes = _activation_bytes(cmap)
        self.memory_budget = memory_budget

    def max_stack(self, batch: int) -> int:
        return max(1, int(self.memory_budget // (self.sample_bytes * batch)))

    def _session_for(self, active: tuple[int, ...]) -> tuple[tuple[int, ...], Runner]:
        covered = self._session[0]
        if not set(active) <= set(covered) or 4 * len(active) <= 3 * len(covered):
            ids = [self.cmap.prunable[k].id for k in active]
            self._session = None  # the old session's memory goes before the new one is built
            provider = "cuda" if self.provider == CUDA else "cpu"
            self._session = active, self._runner(build_trial_model(self.cmap, ids), provider)
        return self._session

    def _runner(self, model, provider: str):
        if self.devices:
            from .pool import RunnerPool

            return RunnerPool(model, self.devices, split=TRIAL_INPUT)
        return Runner(model, provider)

    def damage(self, keep: np.ndarray, rows: np.ndarray, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """[T, G] damage of T trial rows (each [S+1], 0 = removed by the trial) on one calibration batch."""
        out = np.zeros((len(rows), len(self.cmap.prunable)))
        active = tuple(k for k, g in enumerate(self.cmap.prunable) if not rows[:, g.slots].all())
        if active:
            covered, runner = self._session_for(active)
            (damage,) = runner.run({**feeds, KEEP_INPUT: keep_feed(keep), TRIAL_INPUT: rows.astype(np.float32)},
                                   [DAMAGE_OUTPUT])
            out[:, list(active)] = damage[:, [covered.index(k) for k in active]]
        return out


@dataclass
class _Group:
    slots: np.ndarray
    floor: int
    kept: np.ndarray = None
    space: np.ndarray = None
    total: np.ndarray = None
    count: np.ndarray = None
    score: np.ndarray = None
    trials: int = 0
    saturated: bool = False
    halvings: int = 0

    def __post_init__(self):
        w = len(self.slots)
        self.kept = np.ones(w, dtype=bool)
        self.score = np.full(w, UNMEASURED)
        self.restart()

    def restart(self):
        self.space = np.flatnonzero(self.kept)
        self.total = np.zeros(len(self.slots))
        self.count = np.zeros(len(self.slots), dtype=np.int64)
        self.trials = 0
        self.saturated = len(self.space) < 2 or int(self.kept.sum()) <= self.floor

    def means(self) -> np.ndarray:
        return np.where(self.count > 0, self.total / np.maximum(self.count, 1), UNMEASURED)


@dataclass
class SearchStats:
    trials: int = 0
    rounds: int = 0
    seconds: float = 0.0
    threshold: float = 0.0
    first_half_damage: np.ndarray | None = None
    history: list = field(default_factory=list)

    def to_json(self) -> dict:
        out = {"trials": self.trials, "rounds": self.rounds, "seconds": self.seconds}
        return {**out, "threshold": self.threshold} if self.threshold else out


def aofp(cmap: ChannelMap, damage, *, threshold: float = 0.01, trials_per_half: int = 8,
         flops_target: float | None = None, max_trials: int | None = None, min_channels: int = 1,
         seed: int = 0, stack: int = 8, progress=None, checkpoint=None,
         resume: dict | None = None, after_half=None, cost=None) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """The AOFP binary search over all prunable groups; `damage(keep, rows) -> [T, G]`.

    `checkpoint(state)` is called after every round with the whole search state (a dict of arrays
    and plain values); `resume=state` continues from one, giving what the uninterrupted run gives.
    `after_half(keep)` is called after every round in which some group ranked a half (training-time
    AOFP fine-tunes the base path there)."""
    rng = np.random.default_rng(seed)
    groups = [_Group(g.slots, floor_for(g.width, min_channels)) for g in cmap.prunable]
    keep = cmap.full_keep()
    cost = cost or _macs_ratio(cmap)
    goal = flops_target
    stats = SearchStats(threshold=threshold)
    if resume is not None:
        threshold = _restore(resume, groups, keep, rng, stats)
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
            threshold *= 2  # a target the threshold cannot reach: loosen it and search again
            stats.threshold = threshold  # the progress line says so
            for g in groups:
                g.restart()
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
            g = groups[k]
            for trial, local in enumerate(picks[k]):
                g.total[local] += dmg[trial, k]
                g.count[local] += 1
            g.trials += t
        decided = [k for k in active if groups[k].trials >= trials_per_half]
        if stats.first_half_damage is None and decided:
            stats.first_half_damage = np.full(cmap.n_slots, np.nan)
            for k in decided:
                stats.first_half_damage[groups[k].slots] = groups[k].means()
        # decide the most harmless prunes first, so a target is met by the cheapest ones
        decided.sort(key=lambda k: np.sort(groups[k].means()[groups[k].space])[len(groups[k].space) // 2 - 1])
        for k in decided:
            if goal is not None and cost(keep) <= goal:
                break
            _decide(groups[k], keep, cost, threshold, goal)
        stats.history.append((stats.trials, cmap.macs(keep) / max(cmap.total_macs, 1)))
        if after_half is not None and decided:
            after_half(keep)
        if checkpoint is not None:
            stats.seconds = time.perf_counter() - start
            checkpoint(_snapshot(groups, keep, rng, stats, threshold))
        if progress:
            progress(stats, cmap.macs(keep) / max(cmap.total_macs, 1), sum(not g.saturated for g in groups), len(groups))
    stats.seconds = time.perf_counter() - start
    stats.threshold = threshold
    scores = np.zeros(cmap.n_slots)
    for g in groups:
        scores[g.slots] = g.score
    return keep, scores, stats


_GROUP_FIELDS = ("kept", "space", "total", "count", "score")


def _snapshot(groups: list[_Group], keep: np.ndarray, rng, stats: SearchStats, threshold: float) -> dict:
    """The search state after a round: arrays per group plus the scalars, the RNG state and the counters."""
    state = {"keep": keep.copy(), "first_half_damage": stats.first_half_damage,
             "scalars": {"threshold": threshold, "trials": stats.trials, "rounds": stats.rounds,
                         "seconds": stats.seconds, "rng": rng.bit_generator.state,
                         "groups": [{"trials": g.trials, "saturated": g.saturated, "halvings": g.halvings}
                                    for g in groups]}}
    for k, g in enumerate(groups):
        for name in _GROUP_FIELDS:
            state[f"g{k}_{name}"] = getattr(g, name).copy()
    return state


def _restore(state: dict, groups: list[_Group], keep: np.ndarray, rng, stats: SearchStats) -> float:
    scalars = state["scalars"]
    if len(scalars["groups"]) != len(groups):
        raise InputError("the search state does not match this model's channel groups")
    for k, (g, extra) in enumerate(zip(groups, scalars["groups"])):
        for name in _GROUP_FIELDS:
            setattr(g, name, np.array(state[f"g{k}_{name}"]))
        g.trials, g.saturated, g.halvings = extra["trials"], extra["saturated"], extra["halvings"]
    keep[:] = state["keep"]
    rng.bit_generator.state = scalars["rng"]
    stats.trials, stats.rounds, stats.seconds = scalars["trials"], scalars["rounds"], scalars["seconds"]
    if state.get("first_half_damage") is not None:
        stats.first_half_damage = np.array(state["first_half_damage"])
    return scalars["threshold"]


def save_state(path, state: dict, options: dict) -> None:
    """Write a search state (and the options it belongs to) atomically as .npz."""
    import io
    import json

    from .io import write_atomic

    arrays = {k: v for k, v in state.items() if k != "scalars" and v is not None}
    meta = json.dumps({"scalars": state["scalars"], "options": options})
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(meta.encode(), dtype=np.uint8), **arrays)
    write_atomic(path, buf.getvalue())


def load_state(path, options: dict) -> dict:
    """A saved search state, checked to belong to the same model, data and options."""
    import json

    try:
        with np.load(path) as data:
            meta = json.loads(bytes(data["__meta__"]).decode())
            state = {k: data[k] for k in data.files if k != "__meta__"}
    except FileNotFoundError:
        raise InputError(f"{path}: no such search state") from None
    except Exception as exc:
        raise InputError(f"{path}: not an aofp-onnx search state ({type(exc).__name__})") from None
    saved = meta.get("options", {})
    differ = sorted(k for k in set(saved) | set(options) if saved.get(k) != options.get(k))
    if differ:
        raise InputError(f"{path}: saved for other settings ({', '.join(differ)} differ); resume with the same "
                         "model, data and options")
    state["scalars"] = meta["scalars"]
    return state


def _decide(g: _Group, keep: np.ndarray, cost, threshold: float, goal: float | None) -> None:
    means = g.means()
    g.score[g.space] = means[g.space]
    order = g.space[np.argsort(means[g.space], kind="stable")]
    granu = len(order) // 2
    cand = order[:granu]
    g.halvings += 1
    if granu >= 1 and means[cand[-1]] < threshold and int(g.kept.sum()) - granu >= g.floor:
        if goal is not None:
            cand = _trim_to_goal(cand, g, keep, cost, goal)
        g.kept[cand] = False
        keep[g.slots[cand]] = False
        g.restart()
    elif granu > 1:
        g.space = cand
        g.total[:] = 0
        g.count[:] = 0
        g.trials = 0
    else:
        g.saturated = True


def _macs_ratio(cmap: ChannelMap):
    return lambda keep: cmap.macs(keep) / max(cmap.total_macs, 1)


def _trim_to_goal(cand: np.ndarray, g: _Group, keep: np.ndarray, cost, goal: float) -> np.ndarray:
    """The shortest prefix of `cand` (lowest damage first) whose removal meets the goal, or all of it."""
    def macs_without(k):
        trial = keep.copy()
        trial[g.slots[cand[:k]]] = False
        return cost(trial)

    if macs_without(len(cand)) > goal:
        return cand
    lo, hi = 1, len(cand)
    while lo < hi:
        mid = (lo + hi) // 2
        if macs_without(mid) <= goal:
            hi = mid
        else:
            lo = mid + 1
    return cand[:lo]


def oracle(cmap: ChannelMap, runner: Runner, batches: list[dict[str, np.ndarray]], *, flops_target: float,
           oracle_step: int | None = None, min_channels: int = 1, stack: int = 8,
           progress=None, cost=None) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """Exact oracle pruning: rank single-channel ablations at the outputs over all `batches` of the
    calibration data, remove the least damaging, repeat."""
    cost = cost or _macs_ratio(cmap)
    goal = flops_target
    keep = cmap.full_keep()
    scores = np.full(cmap.n_slots, UNMEASURED)
    floors = [(g.slots, floor_for(g.width, min_channels)) for g in cmap.prunable]
    stats = SearchStats()
    start = time.perf_counter()
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
        if progress:
            progress(stats, cmap.macs(keep) / max(cmap.total_macs, 1), len(removable), cmap.n_slots)
    stats.seconds = time.perf_counter() - start
    return keep, scores, stats


def output_damage(runner: Runner, batches: list[dict[str, np.ndarray]], keep: np.ndarray, slots: np.ndarray,
                  stack: int) -> np.ndarray:
    """Σ‖y − y_c‖² / Σ‖y‖² over outputs and all batches, for removing each slot c alone on top of `keep`."""
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


def _data_digest(batches: list[dict]) -> str:
    import hashlib

    h = hashlib.sha256()
    for feeds in batches:
        for name in sorted(feeds):
            h.update(name.encode())
            h.update(np.ascontiguousarray(feeds[name]).tobytes())
    return h.hexdigest()[:16]


def run(pruner, criterion: str, *, flops_target: float | None, min_channels: int = 1, seed: int = 0,
        provider: str = "auto", batch_size: int = 32, threshold: float = 0.01, trials_per_half: int = 8,
        max_trials: int | None = None, oracle_step: int | None = None, progress: bool = False,
        memory_budget: int | None = None, checkpoint: str | None = None,
        resume: str | None = None, tuner=None, cost=None,
        devices: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Run `criterion` ('aofp' or 'oracle') on the pruner's calibration data.

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
    if trials_per_half < 1 or batch_size < 1 or threshold <= 0:
        raise InputError("--trials-per-half and --batch-size must be at least 1, --threshold positive")
    cmap = pruner.cmap
    if not cmap.prunable:
        return cmap.full_keep(), np.zeros(0), {"trials": 0, "seconds": 0.0, "provider": None}
    budget = memory_budget or int(os.environ.get("AOFP_ONNX_MEMORY_BUDGET", DEFAULT_MEMORY_BUDGET))
    batches = list(pruner.data.batches(batch_size))
    show = SearchProgress(criterion, {"MACs": flops_target} if flops_target is not None else None,
                          max_trials) if progress else None
    if criterion == "oracle":
        if flops_target is None:
            raise InputError("--criterion oracle needs --flops-target")
        runner = Runner(masked_model(cmap), provider)
        stack = max(1, int(budget // (_activation_bytes(cmap) * len(next(iter(batches[0].values()))))))
        keep, scores, stats = oracle(cmap, runner, batches, flops_target=flops_target, oracle_step=oracle_step,
                                     min_channels=min_channels, stack=min(stack, 64), progress=show, cost=cost)
        used = runner.provider
    else:
        if tuner is not None:
            if resume:
                raise InputError("--resume cannot continue a search that fine-tunes (--finetune-steps)")
            checkpoint = None
        engine = TrialEngine(cmap, provider, budget, devices)
        stack = min(trials_per_half, engine.max_stack(len(next(iter(batches[0].values())))))
        options = {"fingerprint": cmap.graph.fingerprint(), "data": _data_digest(batches), "threshold": threshold,
                   "trials_per_half": trials_per_half, "flops_target": flops_target, "max_trials": max_trials,
                   "min_channels": min_channels, "seed": seed, "stack": stack}
        state = load_state(resume, options) if resume else None
        counter = iter(range(state["scalars"]["rounds"] if state else 0, 1 << 62))  # one damage call per round

        def damage(keep, rows):
            return engine.damage(keep, rows, batches[next(counter) % len(batches)])

        def adapt(keep):
            nonlocal engine
            tuner(keep)
            engine = TrialEngine(cmap, provider, budget, devices)  # the session holds the weights it was built with

        save = (lambda st: save_state(checkpoint, st, options)) if checkpoint else None
        keep, scores, stats = aofp(cmap, damage, threshold=threshold, trials_per_half=trials_per_half,
                                   flops_target=flops_target, max_trials=max_trials, min_channels=min_channels,
                                   seed=seed, stack=stack, progress=show, checkpoint=save, resume=state,
                                   after_half=adapt if tuner is not None else None, cost=cost)
        used = engine.provider
        if checkpoint and os.path.exists(checkpoint):
            os.unlink(checkpoint)
    if show:
        show.close()
    info = stats.to_json()
    info["provider"] = used
    if devices:
        info["devices"] = [str(d) for d in devices]
    if tuner is not None:
        info["finetune"] = tuner.to_json()
    if flops_target is not None and (cost or _macs_ratio(cmap))(keep) > flops_target:
        info["target_reached"] = False
    return keep, scores, info
