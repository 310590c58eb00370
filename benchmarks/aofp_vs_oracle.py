"""AOFP against the exact oracle, L1 and random on a ResNet trained here on real digits.

    python benchmarks/aofp_vs_oracle.py [--model models/resnet20w_digits.onnx] [--target 0.5]

Printed, all measured in this one run on the same calibration batches and provider:
1. wall time for the oracle and for AOFP to reach the same MACs target, and their ratio;
2. Spearman rank correlation between AOFP's per-channel mean damage (random-half trials at full
   width, at each of `--spearman-trials`) and the oracle's per-channel damage (single-channel
   ablation at the outputs), pooled over all prunable channels and averaged within groups; beside
   it, what bounds that figure: the oracle against itself on disjoint calibration samples (how
   stable the reference ranking is) and the exact single-channel damage at the next layer (where
   AOFP measures): the ceiling of any next-layer estimator;
3. test accuracy at the target with no recovery: AOFP and random over `--seeds`, L1, the oracle, with
   the width each kept per group;
4. peak resident memory added by the AOFP search.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np

from aofp_onnx.api import Pruner, accuracy
from aofp_onnx.calib import input_specs, load_data
from aofp_onnx.check import DownstreamParts
from aofp_onnx.criteria import l1_scores, random_scores
from aofp_onnx.masking import masked_model
from aofp_onnx.runtime import Runner
from aofp_onnx.oracle import oracle, output_damage
from aofp_onnx.search import DEFAULT_THRESHOLD, aofp
from aofp_onnx.trial import TrialEngine
from aofp_onnx.select import select_by_score
from aofp_onnx.surgery import cut


def rss_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split(key + ":")[1].split()[0]) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for value in np.unique(x):  # average ranks of ties
        tie = x == value
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def next_layer_single(engine: TrialEngine, cmap, batches) -> np.ndarray:
    """Exact next-layer damage of removing each channel alone (row k removes channel k of every group:
    each group's damage copy reads only its own removal)."""
    keep, out = cmap.full_keep(), np.zeros(cmap.n_slots)
    for k in range(max(g.width for g in cmap.prunable)):
        row = np.ones((1, cmap.n_slots + 1), np.float32)
        for g in cmap.prunable:
            if k < g.width:
                row[0, g.slots[k]] = 0.0
        dmg = sum(engine.damage(keep, row, b) for b in batches)[0]
        for j, g in enumerate(cmap.prunable):
            if k < g.width:
                out[g.slots[k]] = dmg[j]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/resnet20w_digits.onnx")
    parser.add_argument("--calib", default="models/mnist_calib.npz")
    parser.add_argument("--test", default="models/mnist_test.npz")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=16, help="calibration samples per trial / oracle run")
    parser.add_argument("--samples", type=int, default=64,
                        help="calibration samples both methods use (the oracle evaluates every channel on all of them)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--trials-per-half", type=int, default=8)
    parser.add_argument("--spearman-trials", type=int, nargs="+", default=[64, 1024],
                        help="random-half trials per group for the mean damage (one estimate per value)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--provider", default="cpu")
    args = parser.parse_args()

    pruner = Pruner.load(args.model, data=args.calib, limit=args.samples)
    cmap = pruner.cmap
    test = load_data(args.test, input_specs(pruner.graph.model), labels=True)
    batches = list(pruner.data.batches(args.batch))
    engine = TrialEngine(cmap, args.provider)
    stack = min(args.trials_per_half, engine.max_stack(args.batch))

    def run_aofp(seed, target, trials_per_half=args.trials_per_half, max_trials=None):
        counter = iter(range(1 << 40))
        return aofp(cmap, lambda keep, rows: engine.damage(keep, rows, batches[next(counter) % len(batches)]),
                    threshold=args.threshold, trials_per_half=trials_per_half, flops_target=target,
                    max_trials=max_trials, seed=seed, stack=min(stack, trials_per_half))

    print(f"model {args.model}: {cmap.total_macs:,} MACs, {len(cmap.prunable)} prunable groups, "
          f"{cmap.n_slots} prunable channels; {len(pruner.data)} calibration samples in batches of {args.batch}; "
          f"provider {engine.provider}")

    # 1. oracle vs AOFP to the same target
    masked = Runner(masked_model(cmap), args.provider)
    start = time.perf_counter()
    keep_o, _, stats_o = oracle(cmap, masked, batches, flops_target=args.target, stack=8,
                                parts=DownstreamParts(cmap, args.provider))  # built in its time, as prune's
    oracle_s = time.perf_counter() - start
    target = cmap.macs(keep_o) / cmap.total_macs
    times, results = [], {}
    for seed in args.seeds:
        reset_peak()
        base = rss_mb("VmRSS")
        start = time.perf_counter()
        keep, _, stats = run_aofp(seed, target)
        times.append(time.perf_counter() - start)
        peak = rss_mb("VmHWM") - base
        results[seed] = (keep, stats, peak)
    aofp_s = statistics.median(times)
    print("\n1. time to the oracle's MACs target "
          f"(x{target:.3f}; oracle step = 1/16 of the channels left, AOFP threshold {args.threshold}, "
          f"{args.trials_per_half} trials per half)")
    print(f"   oracle  {oracle_s:8.1f} s   {stats_o.trials:6d} single-channel evaluations, "
          f"{stats_o.rounds} re-rankings")
    print(f"   AOFP    {aofp_s:8.1f} s   median of {len(times)} seeds "
          f"({', '.join(f'{t:.1f}' for t in times)} s); {results[args.seeds[0]][1].trials} trials, "
          f"{results[args.seeds[0]][1].rounds} runs")
    print(f"   speed-up x{oracle_s / aofp_s:.1f}")

    # 2. Spearman: AOFP per-channel mean damage vs oracle single-channel damage, both at full width
    oracle_damage = stats_o.first_half_damage
    rows = []
    for trials in args.spearman_trials:
        _, _, est = run_aofp(args.seeds[0], None, trials_per_half=trials, max_trials=trials)
        rows.append((f"AOFP mean damage, {trials} random-half trials", est.first_half_damage))
    rows.append(("exact single-channel next-layer damage", next_layer_single(engine, cmap, batches)))
    other = load_data(args.calib, input_specs(pruner.graph.model)).take(2 * args.samples)
    other = replace(other, inputs={k: v[args.samples:] for k, v in other.inputs.items()})
    if len(other):
        rows.append((f"oracle on {len(other)} other samples", output_damage(
            masked, list(other.batches(args.batch)), cmap.full_keep(), np.arange(cmap.n_slots), 8)))
    print(f"\n2. Spearman rank correlation with the oracle's damage (single-channel, at the outputs), "
          f"{cmap.n_slots} channels")
    for name, est in rows:
        within = [spearman(est[g.slots], oracle_damage[g.slots]) for g in cmap.prunable if g.width > 2]
        print(f"   {name:<44} pooled {spearman(est, oracle_damage):.3f}; mean within groups {np.mean(within):.3f} "
              f"(min {np.min(within):.3f}, max {np.max(within):.3f})")

    # 3. accuracy with no recovery at the target
    def row(name, seed, keep):
        widths = " ".join(str(int(keep[g.slots].sum())) for g in cmap.prunable)
        return name, seed, cmap.macs(keep) / cmap.total_macs, accuracy(cut(cmap, keep), test, args.provider), widths

    rows = [("original", "-", 1.0, accuracy(pruner.graph.data, test, args.provider),
             " ".join(str(g.width) for g in cmap.prunable))]
    rows.append(row("oracle", "-", keep_o))
    for seed in args.seeds:
        rows.append(row("aofp", seed, run_aofp(seed, args.target)[0]))
    rows.append(row("l1", "-", select_by_score(cmap, l1_scores(cmap), args.target)))
    for seed in args.seeds:
        rows.append(row("random", seed, select_by_score(cmap, random_scores(cmap, seed), args.target)))
    print(f"\n3. test accuracy on {len(test)} held-out digits at MACs target {args.target}, no recovery")
    print(f"   {'criterion':<10} {'seed':>4} {'MACs':>7} {'accuracy':>9}   widths per group")
    for name, seed, ratio, a, widths in rows:
        print(f"   {name:<10} {seed!s:>4} {ratio:>7.3f} {100 * a:>8.2f}%   {widths}")
    for name in ("aofp", "random"):
        vals = [r[3] for r in rows if r[0] == name]
        print(f"   {name} mean over seeds: {100 * np.mean(vals):.2f}% (min {100 * np.min(vals):.2f}%)")

    # 4. memory
    print(f"\n4. peak resident memory added by the AOFP search: "
          f"{max(r[2] for r in results.values()):.0f} MB (max over seeds)")


if __name__ == "__main__":
    main()
