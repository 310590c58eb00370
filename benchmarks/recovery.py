"""Recovery after the cut: test accuracy of the plain cut vs the cut + least-squares reconstruction.

    python benchmarks/recovery.py [--models models/resnet20w_digits.onnx models/mnist_cnn.onnx]
                                  [--targets 0.5 0.7] [--criteria aofp l1] [--provider cpu]

For each model, criterion (AOFP with the CLI's defaults, L1) and MACs target: choose the channels on the
calibration digits (models/mnist_calib.npz, 256), cut, and measure top-1 accuracy on the 1,000 held-out
digits (models/mnist_test.npz) after the cut and after `reconstruct` (same calibration data, defaults:
≤64 sampled positions per sample, ridge 1e-3). Printed, all measured in this one run:
one table (original / cut / reconstructed accuracy, the share of the cut's accuracy drop that
reconstruction recovers = (rec − cut) / (original − cut), the relative output error of the logits vs the
original on the calibration data, and the reconstruction's wall time), then the mean share recovered.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from aofp_onnx.api import Pruner, accuracy, choose_keep
from aofp_onnx.calib import input_specs, load_data
from aofp_onnx.reconstruct import reconstruct
from aofp_onnx.select import round_widths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["models/resnet20w_digits.onnx", "models/mnist_cnn.onnx"])
    parser.add_argument("--calib", default="models/mnist_calib.npz")
    parser.add_argument("--test", default="models/mnist_test.npz")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--criteria", nargs="+", default=["aofp", "l1"])
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = []
    for path in args.models:
        pruner = Pruner.load(path, data=args.calib)
        cmap = pruner.cmap
        test = load_data(args.test, input_specs(pruner.graph.model), labels=True)
        base = accuracy(pruner.graph.data, test, args.provider)
        for criterion in args.criteria:
            for target in args.targets:
                start = time.perf_counter()
                keep, scores, _ = choose_keep(pruner, criterion, flops_target=target, seed=args.seed,
                                              provider=args.provider)
                keep = round_widths(cmap, keep, scores, 1, 1, target)
                search_s = time.perf_counter() - start
                pruned, check = pruner.cut_and_verify(keep, args.provider)
                assert check.passed, check
                acc_cut = accuracy(pruned, test, args.provider)
                rebuilt, rec = reconstruct(cmap, keep, pruned, pruner.data, provider=args.provider, seed=args.seed)
                acc_rec = accuracy(rebuilt, test, args.provider)
                drop = base - acc_cut
                recovered = (acc_rec - acc_cut) / drop if drop > 0 else float("nan")
                fitted = sum("skipped" not in c for c in rec.consumers)
                rows.append(dict(model=path.split("/")[-1].removesuffix(".onnx"), criterion=criterion, target=target,
                                 macs=cmap.macs(keep) / cmap.total_macs, base=base, cut=acc_cut, rec=acc_rec,
                                 recovered=recovered, err_cut=rec.output_error["cut"],
                                 err_rec=rec.output_error["reconstructed"], layers=fitted, search_s=search_s,
                                 rec_s=rec.seconds))
                print(f"  done {rows[-1]['model']} {criterion} {target}: cut {100 * acc_cut:.1f}% -> "
                      f"reconstructed {100 * acc_rec:.1f}% ({rec.seconds:.1f} s)", flush=True)

    print(f"\ntest accuracy on {len(test)} held-out digits; reconstruction on {rec.samples} calibration digits "
          f"(provider {args.provider})")
    head = (f"{'model':<18} {'criterion':<9} {'target':>6} {'MACs':>6} {'original':>9} {'cut':>7} {'recon':>7} "
            f"{'recovered':>9} {'logit err cut':>13} {'-> recon':>9} {'layers':>6} {'recon s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<18} {r['criterion']:<9} {r['target']:>6.2f} {r['macs']:>6.3f} {100 * r['base']:>8.1f}% "
              f"{100 * r['cut']:>6.1f}% {100 * r['rec']:>6.1f}% {100 * r['recovered']:>8.1f}% "
              f"{r['err_cut']:>13.3g} {r['err_rec']:>9.3g} {r['layers']:>6d} {r['rec_s']:>7.1f}")
    shares = [r["recovered"] for r in rows if np.isfinite(r["recovered"])]
    if shares:
        print(f"\nreconstruction recovers {100 * np.mean(shares):.1f}% of the cut's accuracy drop on average "
              f"(min {100 * np.min(shares):.1f}%, over the {len(shares)} rows where the cut lost accuracy)")


if __name__ == "__main__":
    main()
