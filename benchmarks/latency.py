"""Does the latency fall with the MACs? (issue: pruned/original latency ≤ 1.15 × pruned/original MACs)

    python benchmarks/latency.py [--repeats 10] [--skip-resnet50]

Prunes two models to half their MACs with widths rounded to `--round-to` (16: onnxruntime's
CPU kernels work on channel blocks of 16 with AVX-512, 8 with AVX2) and times original and pruned side
by side with `aofp-onnx bench` (interleaved runs, medians) at batch 32 on the CPU provider:
the wide digits ResNet-20 shipped in models/ (AOFP on its calibration data) and an ImageNet-shaped
ResNet-50 export with random weights (L1; AOFP's data-driven choice does not change the widths'
cost). Prints latency ratio, MACs ratio and their quotient.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def cli(*args) -> str:
    out = subprocess.run([sys.executable, "-m", "aofp_onnx", *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return out.stdout


def measure(name, model, calib, criterion, tmp, repeats, input_batch, round_to):
    pruned, report = Path(tmp) / f"{name}_pruned.onnx", Path(tmp) / f"{name}.json"
    cli("prune", model, "-o", pruned, "--calib", calib, "--criterion", criterion, "--flops-target", 0.5,
        "--round-to", round_to, "--batch-size", input_batch, "--no-progress", "--report", report)
    rep = json.loads(report.read_text())
    timing = Path(tmp) / f"{name}_bench.json"
    cli("bench", model, pruned, "--batch-size", 32, "--repeats", repeats, "--warmup", 2, "--provider", "cpu",
        "--json", timing)
    rows = json.loads(timing.read_text())
    latency = rows[1]["median_ms"] / rows[0]["median_ms"]
    macs = rep["macs_after"] / rep["macs_before"]
    return name, criterion, rows[0]["median_ms"], rows[1]["median_ms"], latency, macs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-resnet50", action="store_true")
    parser.add_argument("--round-to", type=int, default=16, help="width multiple (16 = MLAS's AVX-512 NCHWc block)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(measure("resnet20w_digits (28x28)", ROOT / "models/resnet20w_digits.onnx",
                               ROOT / "models/mnist_calib.npz", "aofp", tmp, args.repeats, 16, args.round_to))
        if not args.skip_resnet50:
            sys.path.insert(0, str(HERE))
            from nets import export_resnet

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r50 = export_resnet((3, 4, 6, 3), Path(tmp) / "resnet50.onnx")
            results.append(measure("resnet50 (224x224)", r50, "random:8", "l1", tmp, args.repeats, 4, args.round_to))
    print(f"batch 32, CPUExecutionProvider, widths rounded to {args.round_to}, "
          f"median of {args.repeats} interleaved runs")
    print(f"{'model':<26} {'criterion':<9} {'orig ms':>9} {'pruned ms':>10} {'latency x':>10} {'MACs x':>7} "
          f"{'latency/MACs':>13}")
    for name, crit, before, after, lat, macs in results:
        print(f"{name:<26} {crit:<9} {before:>9.1f} {after:>10.1f} {lat:>10.3f} {macs:>7.3f} {lat / macs:>13.2f}")


if __name__ == "__main__":
    main()
