"""What the width selection aims at: a share of the MACs or of the measured latency, landed on widths the
kernels reward, and checked against the measured model.

`--round-to auto` is the smallest multiple k ∈ {1, 8, 16, 32} whose widths the latency table measures as
fast as 32-aligned ones (`LatencyTable.rewarded_multiple`). A latency target R selects with the table's
estimate as the cost (the criterion's order; widths fitted where a step buys the most latency per unit
of damage, `select.fit_to_target`). The estimate is then checked on the cut model: while the measured
ratio r misses R by more than `TOLERANCE`, the internal target becomes R_int · R / r and the landed widths
move there, valued as the landing valued its steps, at most `ROUNDS` times; of the measured cuts, the slowest
that met R (within TOLERANCE) is kept, else the fastest.

With a latency table (a latency target, or `--round-to auto`) every target is hardware-aware
(`latency_weights`). The scores the selection and the rounding order channels by (l1, random; for AOFP
and the oracle, whose searches choose by damage alone, only the rounding) are divided, per group g, by

    (clip(e_g / ẽ, 1/4, 4))^α,   e_g = (ΔL_g / L) / (ΔM_g / M),

the latency the table says g buys per MAC when 1/8 of g goes (without alignment penalties), ẽ its
MACs-weighted median over the groups (the clip bounds noisy ratios of tiny groups), α = `LATENCY_WEIGHT`
= 2. A MACs budget then goes first where the kernels turn it into time; without it, on a CPU at batch 1,
even a uniform cut (random scores) to 0.6 of YOLOv8n's MACs measures x0.72 of its latency. Measured with
L1 at 0.6 of the MACs (batch 1, one thread), α = 0 / 1 / 2 gave latency/MACs 1.13 / 1.10 / 1.06 on
YOLOv8n, 1.19 / 1.02 / 0.87 on PP-OCRv4 det and 1.02 / 1.01 / 1.02 on a VGG-style classifier, with output
errors no worse at 2 (a one-off sweep; benchmarks/latency_target.py measures the default).
"""
from __future__ import annotations

import sys

import numpy as np

from .damage_point import resolve_norm
from .errors import InputError
from .latency import LatencyTable, measure_latency, weighted_median
from .runtime import CPU, resolve_provider
from .select import macs_cost, round_widths
from .surgery import cut

LATENCY_WEIGHT = 2  # the exponent α of e_g (see the module docstring)
TOLERANCE = 0.03
ROUND_BY = ("auto", "scores", "output")
ROUNDS = 2
REPEATS = 15  # interleaved runs per check
SLACK = 1.10  # a MACs cut measured slower than SLACK x its MACs ratio gets a note (`targets_reached`)
TIME_NOTE = ("the cut bought less time than MACs: the channels the criterion could spare sit in layers that cost "
             "little time; --latency-target aims at time itself (deeper in the layers that cost it)")
TENSORRT_MULTIPLES = {"fp16": 8, "int8": 32}  # the channel multiples TensorRT's tensor-core kernels run at
SLOWER = "the pruned model measures slower than the original"


def parse_round_to(value) -> int | str:
    if value in (None, "auto"):
        return "auto"
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise InputError(f"--round-to must be a positive integer or 'auto', got {value!r}") from None
    if k < 1:
        raise InputError("--round-to and --min-channels must be at least 1")
    return k


def check_targets(flops_target: float | None, latency_target: float | None) -> None:
    for name, value in (("--flops-target", flops_target), ("--latency-target", latency_target)):
        if value is not None and not 0 < value <= 1:
            raise InputError(f"{name} must be in (0, 1], got {value}")
    if flops_target is not None and latency_target is not None:
        raise InputError("give --flops-target or --latency-target, not both")


def resolve_round_to(round_to, table: LatencyTable | None) -> int:
    if round_to != "auto":
        return int(round_to)
    return table.rewarded_multiple() if table is not None else 1


def round_to_target(cmap, keep: np.ndarray, scores: np.ndarray, step: int, auto: bool, min_channels: int,
                    target: float | None, cost=None, damage=None,
                    weights: np.ndarray | None = None) -> tuple[np.ndarray, int, int | None]:
    """(keep, step used, multiple given up) with the widths rounded to `step` and fitted to `target`
    (`select.round_widths`; cost: MACs unless given; steps valued by `damage` when given). A multiple that
    `auto` chose and that cannot land within TOLERANCE of the target (groups only a few multiples wide) gives
    way to 1."""
    rounded = round_widths(cmap, keep, scores, step, min_channels, target, cost, damage, weights)
    if not auto or step <= 1 or target is None or (cost or macs_cost(cmap))(rounded) <= target * (1 + TOLERANCE):
        return rounded, step, None
    return round_widths(cmap, keep, scores, 1, min_channels, target, cost, damage, weights), 1, step


def step_errors(pruner, by: str, provider: str, batch_size: int, memory: int | None = None):
    """What values the rounding's steps when `by` (`resolve_round_by`) is `output`: the cut's output error on
    the search's check samples (`search_run.CutErrors`, shared by the landing and a latency target's refits,
    within the search's `memory` budget); None for the scores."""
    if by != "output" or not pruner.cmap.prunable:
        return None
    from .search_run import CutErrors, calibration_batches  # sessions only when the output error is read

    return CutErrors(pruner.cmap, calibration_batches(pruner, batch_size), provider, memory=memory)


def fit_fields(by: str, errors) -> dict:
    """The report's round_to fields of the fit: `by`, and `checks`, `seconds`, `budget_spent` where the output
    error valued the steps."""
    if errors is None:
        return {"by": by}
    return {"by": by, "checks": errors.checks, "seconds": errors.seconds,
            **({"budget_spent": True} if errors.spent else {})}


def check_round_by(round_by: str) -> None:
    if round_by not in ROUND_BY:
        raise InputError(f"--round-by must be one of {', '.join(ROUND_BY)}, got {round_by!r}")


def resolve_round_by(cmap, round_by: str) -> str:
    """`scores` or `output`: what values a rounding step (`select.fit_to_target`); `auto` gives `output` on a
    classifier (every output [N, C], as `damage_point.resolve_norm` tells one), where one forward per group and
    step is cheap, else `scores` (a detector's forward at full resolution, once per group and step, would cost
    more than the search)."""
    check_round_by(round_by)
    if round_by != "auto":
        return round_by
    return "output" if resolve_norm(cmap, "auto") == "sample" else "scores"


def meet_measured(pruner, keep: np.ndarray, scores: np.ndarray, table: LatencyTable, target: float, step: int,
                  min_channels: int, feeds: dict, provider: str, threads: int | None, damage=None,
                  weights: np.ndarray | None = None):
    """(keep, rounds of measurement): the landed cut's latency ratio r is measured; while it misses `target` R
    by more than TOLERANCE, the landed widths move to the corrected internal target R_int · R / r
    (`select.round_widths` on the table's estimate, each step valued as the landing valued it: by `damage`, the
    output error, with FIT_FORWARDS more forwards each time, or the scores), at most ROUNDS times. Each move
    starts from the landing, not from the previous move: moved down and back up, the widths would drift by
    the order of the steps. Of the measured cuts, `kept_round`'s is kept (its round says `kept`). With one
    CPU thread the check times the thread's CPU time, which other processes on the machine do not inflate."""
    from .search_run import FIT_FORWARDS

    landed, internal = keep, target
    history, cuts = [], []
    for k in range(ROUNDS + 1):
        pruned = cut(pruner.cmap, keep)
        measured = measure_latency(pruner.graph.data, pruned, feeds, provider, repeats=REPEATS, threads=threads,
                                   cpu=threads == 1 and provider_is_cpu(provider))["ratio"]
        history.append({"internal_target": internal, "estimated": table.ratio(keep), "measured": measured})
        cuts.append(keep)
        if within(measured, target) or k == ROUNDS:
            break
        internal = internal * target / max(measured, 1e-9)
        if damage is not None:
            damage.allow(FIT_FORWARDS)
        keep = round_widths(pruner.cmap, landed, scores, step, min_channels, internal, table.ratio, damage, weights)
        if any(np.array_equal(keep, c) for c in cuts):
            break
    best = kept_round(history, target)
    history[best]["kept"] = True
    return cuts[best], history


def within(measured: float, target: float) -> bool:
    """Whether a measured latency ratio met the target within TOLERANCE (either side)."""
    return abs(measured - target) <= TOLERANCE * target


def kept_round(rounds: list[dict], target: float) -> int:
    """The measured cut a latency target keeps: a target is a bound, so the slowest of those that met it
    (measured ≤ R · (1 + TOLERANCE)), else the fastest."""
    met = [k for k, r in enumerate(rounds) if r["measured"] <= target * (1 + TOLERANCE)]
    if met:
        return max(met, key=lambda k: rounds[k]["measured"])
    return min(range(len(rounds)), key=lambda k: rounds[k]["measured"])


def missed_note(rounds: list[dict], target: float, threads: int | None, provider: str) -> str | None:
    """The report's note when no measured cut came within TOLERANCE of the target: what each measured, and on a
    CPU timed by the wall clock with several threads, `--threads 1` (one thread's CPU time, which other work on
    the machine moves far less: on 2 cores, cuts estimated at x0.52 measured x0.41-x0.66 by the wall clock)."""
    if any(within(r["measured"], target) for r in rounds):
        return None
    note = (f"no measured cut came within {TOLERANCE:.0%} of the latency target x{target:.3f} (measured "
            + ", ".join(f"x{r['measured']:.3f}" for r in rounds) + f"); written: the one measured "
            f"x{rounds[kept_round(rounds, target)]['measured']:.3f}")
    if threads != 1 and provider_is_cpu(provider):
        note += "; wall-clock medians move with other work on the machine: --threads 1 times one thread's CPU time"
    return note


def latency_weights(cmap, table: LatencyTable) -> np.ndarray:
    """Per channel slot, the divisor of its score: clip(e_g / median e, 1/4, 4) ** LATENCY_WEIGHT for the
    slots of group g (see the module docstring), 1 elsewhere."""
    full = cmap.full_keep()
    macs = macs_cost(cmap)
    base = table.aligned_ratio(full)
    eff, weight = np.ones(len(cmap.prunable)), np.zeros(len(cmap.prunable))
    for k, g in enumerate(cmap.prunable):
        keep = full.copy()
        keep[g.slots[:max(1, g.width // 8)]] = False
        saved_macs = 1.0 - macs(keep)
        eff[k] = (base - table.aligned_ratio(keep)) / base / saved_macs if saved_macs > 0 else np.inf
        weight[k] = max(saved_macs, 0.0)
    out = np.ones(cmap.n_slots)
    finite = np.isfinite(eff)
    median = weighted_median(eff[finite], weight[finite], default=0.0)
    if base <= 0 or median <= 0:
        return out
    for k, g in enumerate(cmap.prunable):
        out[g.slots] = float(np.clip(eff[k] / median, 0.25, 4.0)) ** LATENCY_WEIGHT
    return out


def slower_hint(round_to) -> str:
    """The advice of the SLOWER warning: aligned widths when the cut had none, else latency itself."""
    if round_to == "auto":
        return (f"{SLOWER}: its widths are already on the multiple --round-to auto measured as fastest, so the "
                "layers it narrowed cost about what they did; --latency-target aims at latency itself (it times the "
                "cut), or try a milder target")
    return (f"{SLOWER}: its widths are off the multiples the kernels reward; try --round-to auto (or 8/16), or "
            "--latency-target to aim at latency itself")


def tensorrt_widths(cmap, keep: np.ndarray) -> dict:
    """Per TensorRT precision p with channel multiple k_p (FP16 8, INT8 32): of the groups the cut narrowed
    (and at least k_p wide before it), those whose kept width w has w mod k_p ≠ 0. Off-multiple widths
    make TensorRT pad the channels or fall back from its tensor-core kernels."""
    widths = [(g, int(keep[g.slots].sum())) for g in cmap.prunable]
    narrowed = [(g, w) for g, w in widths if w != g.width]
    out = {}
    for precision, k in TENSORRT_MULTIPLES.items():
        judged = [(g, w) for g, w in narrowed if g.width >= k]
        out[precision] = {"multiple": k, "narrowed": len(judged), "off": [g.id for g, w in judged if w % k]}
    return out


def provider_is_cpu(provider: str) -> bool:
    return resolve_provider(provider) == CPU


def stderr_line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def targets_reached(pruner, keep: np.ndarray, flops_target, latency_target, table, lat: dict | None) -> dict:
    """Each target beside what was reached (MACs counted; latency estimated and measured). A MACs target
    with a measured latency also gives latency/MACs, from the medians and from the p10s (the runs least
    slowed by other work), and TIME_NOTE when both exceed SLACK: a shared machine's noise moves the
    medians of a short model by a third between runs."""
    reached = pruner.cmap.macs(keep) / max(pruner.cmap.total_macs, 1)
    out = {"macs": {"target": flops_target, "reached": reached}}
    if flops_target is not None and lat:
        macs = out["macs"]
        macs["latency_per_macs"] = lat["ratio"] / max(reached, 1e-9)
        macs["latency_per_macs_p10"] = lat["after_p10"] / max(lat["before_p10"], 1e-9) / max(reached, 1e-9)
        if min(macs["latency_per_macs"], macs["latency_per_macs_p10"]) > SLACK:
            macs["note"] = TIME_NOTE
    if latency_target is not None:
        out["latency"] = {"target": latency_target, "estimated": table.ratio(keep),
                          "measured": lat["ratio"] if lat else None}
    return out
