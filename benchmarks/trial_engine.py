"""Batched multi-path trials vs a naive loop (issue: ≥ 5× more trials per second).

    python benchmarks/trial_engine.py [--model models/resnet20w_digits.onnx] [--batch 16] [--stack 8]

A *trial evaluation* is one group's damage for one random half. The naive loop does what a direct
implementation of AOFP would: one session run per trial per group, each session the K-masked model
plus that one group's consumer copies (the same one-layer-deep damage). The trial engine scores all
groups of `--stack` trials in one run of the multi-path trial graph. Both use the same onnxruntime
provider, the same calibration batch and the same trial masks, interleaved over `--repeats` rounds;
the medians are printed with their ratio, and the two damage matrices are checked to agree.

The default is the wide ResNet-20 that aofp_vs_oracle.py searches (x11 on the 2-core CPU). On the narrow
ResNet-20 (`--model models/resnet20_digits.onnx`, 16-64 channels at 28x28) it is about x3: each copy's
conv is so small that the elementwise work around it (masking the stacked input, the difference, its
reduction, layout reorders) costs as much, while each naive run computes only the base path up to its
group's consumers.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from aofp_onnx.api import Pruner
from aofp_onnx.masking import KEEP_INPUT, keep_feed
from aofp_onnx.runtime import Runner
from aofp_onnx.trial import DAMAGE_OUTPUT, TRIAL_INPUT, TrialEngine, build_trial_model


class NaiveLoop:
    """One session run per (trial, group): a session per group, each scoring only that group."""

    def __init__(self, cmap, provider):
        self.cmap = cmap
        self.runners = [Runner(build_trial_model(cmap, [g.id]), provider) for g in cmap.prunable]

    def damage(self, keep, rows, feeds):
        out = np.zeros((len(rows), len(self.cmap.prunable)))
        for t, row in enumerate(rows):
            for k, runner in enumerate(self.runners):
                (damage,) = runner.run({**feeds, KEEP_INPUT: keep_feed(keep), TRIAL_INPUT: row[None]},
                                       [DAMAGE_OUTPUT])
                out[t, k] = float(damage[0, 0])
        return out


def random_rows(cmap, keep, stack, rng):
    rows = np.ones((stack, cmap.n_slots + 1), np.float32)
    for row in rows:
        for g in cmap.prunable:
            live = g.slots[keep[g.slots]]
            row[rng.choice(live, len(live) // 2, replace=False)] = 0.0
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/resnet20w_digits.onnx")
    parser.add_argument("--calib", default="models/mnist_calib.npz")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--stack", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--provider", default="cpu")
    args = parser.parse_args()

    pruner = Pruner.load(args.model, data=args.calib, limit=args.batch)
    cmap = pruner.cmap
    feeds = next(pruner.data.batches(args.batch))
    engine, naive = TrialEngine(cmap, args.provider), NaiveLoop(cmap, args.provider)
    rng = np.random.default_rng(0)
    keep = cmap.full_keep()
    groups = len(cmap.prunable)
    batched_rates, naive_rates, agree = [], [], []
    for _ in range(args.repeats):
        rows = random_rows(cmap, keep, args.stack, rng)
        start = time.perf_counter()
        fast = engine.damage(keep, rows, feeds)
        batched_rates.append(args.stack * groups / (time.perf_counter() - start))
        start = time.perf_counter()
        slow = naive.damage(keep, rows, feeds)
        naive_rates.append(args.stack * groups / (time.perf_counter() - start))
        agree.append(float(np.max(np.abs(fast - slow) / np.maximum(slow, 1e-12))))
    b, n = statistics.median(batched_rates), statistics.median(naive_rates)
    print(f"model {args.model}: {groups} prunable groups, calibration batch {args.batch}, {args.stack} trials "
          f"per run, provider {engine.provider}, {args.repeats} interleaved rounds")
    print(f"{'engine':<34} {'trial evaluations/s (median)':>30}")
    print(f"{'naive: 1 run per trial per group':<34} {n:>30.1f}")
    print(f"{'batched multi-path trial graph':<34} {b:>30.1f}")
    print(f"speed-up x{b / n:.1f}; damages agree to {max(agree):.1e} (max relative difference)")


if __name__ == "__main__":
    main()
