"""Time and peak memory of `inspect` + `apply` on a big export (issue: < 10 s, < 3x the model's size).

    python benchmarks/analyze_cut_scale.py [--depth 50|152]

Builds a ResNet-50 (or -152) export with random weights, a plan that halves every prunable group
(L1), then runs `inspect` and `apply` (cut + verification + write) in a fresh subprocess each, and
prints wall time and the peak resident memory the step added on top of the interpreter with its
imports loaded, next to the model's size.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent

STEP = r"""
import sys, time, json
import numpy as np, onnx, onnxruntime, aofp_onnx
from aofp_onnx import api

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024

with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark to the current RSS
    f.write("5")
base = status("VmRSS")
t = time.perf_counter()
if sys.argv[1] == "inspect":
    info = api.inspect(sys.argv[2])
    extra = {"groups": len(info["groups"]), "prunable_macs_fraction": info["prunable_macs_fraction"]}
else:
    rep = api.apply_plan(sys.argv[2], sys.argv[3], sys.argv[4])
    extra = {"macs_ratio": rep["macs_after"] / rep["macs_before"], "verified": rep["verification"]["passed"]}
seconds = time.perf_counter() - t
peak = status("VmHWM")
print(json.dumps({"seconds": seconds, "added_mb": peak - base, "peak_mb": peak, **extra}))
"""


def run_step(*args) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", STEP, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, choices=(50, 152), default=50)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from nets import export_resnet

    from aofp_onnx.api import Pruner
    from aofp_onnx.criteria import l1_scores
    from aofp_onnx.plan import plan_from_keep
    from aofp_onnx.select import select_by_score

    depths = {50: (3, 4, 6, 3), 152: (3, 8, 36, 3)}[args.depth]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / f"resnet{args.depth}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_resnet(depths, model)
        size_mb = os.path.getsize(model) / 2**20
        pruner = Pruner.load(model)
        keep = select_by_score(pruner.cmap, l1_scores(pruner.cmap), 0.5)
        plan = Path(tmp) / "plan.json"
        plan_from_keep(pruner.cmap, keep, "l1").save(plan)
        del pruner
        ins = run_step("inspect", str(model))
        app = run_step("apply", str(model), str(plan), str(Path(tmp) / "pruned.onnx"))
    print(f"ResNet-{args.depth} export: {size_mb:.1f} MB, {ins['groups']} groups, "
          f"prunable MACs {100 * ins['prunable_macs_fraction']:.1f}%")
    print(f"{'step':<8} {'seconds':>8} {'peak added MB':>14} {'x model size':>13}")
    for name, r in (("inspect", ins), ("apply", app)):
        print(f"{name:<8} {r['seconds']:>8.2f} {r['added_mb']:>14.1f} {r['added_mb'] / size_mb:>13.2f}")
    total_s = ins["seconds"] + app["seconds"]
    print(f"inspect+apply: {total_s:.2f} s; apply verified={app['verified']}, MACs x{app['macs_ratio']:.3f}")


if __name__ == "__main__":
    main()
