"""A model past protobuf's 2 GB limit, weights in a side file: inspect, prune, save (external data).

    python benchmarks/external_data.py [--gb 2.2]

Builds a plain conv chain (1024 channels, 3x3, 8x8 input) whose weights exceed `--gb` GB, saved
with external data; then, each in a fresh process, `inspect` and `prune --criterion l1
--flops-target 0.5` (cut + verification + write). Prints seconds and peak resident memory added per
step (against the weights' size), that the output kept its weights in `<out>.data`, and that the
written model loads and runs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STEP = r"""
import json, sys, time
from aofp_onnx import api

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
t = time.perf_counter()
if sys.argv[1] == "inspect":
    info = api.inspect(sys.argv[2])
    extra = {"groups": len(info["groups"])}
else:
    rep = api.prune(sys.argv[2], sys.argv[3], calib="random:2", criterion="l1", flops_target=0.5, latency=False,
                    batch_size=1)
    extra = {"macs_ratio": rep["macs_after"] / rep["macs_before"], "verified": rep["verification"]["passed"]}
print(json.dumps({"seconds": time.perf_counter() - t, "added_mb": status("VmHWM") - base, **extra}))
"""


def build(path: Path, gb: float, width: int = 1024) -> int:
    """A chain of 3x3 convs (ReLU between) with enough layers for `gb` GB of float32 weights."""
    per_layer = width * width * 9 * 4
    layers = int(np.ceil(gb * 1e9 / per_layer))
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "input"
    for k in range(layers):
        w = (rng.standard_normal((width, width, 3, 3), dtype=np.float32) * (2 / (9 * width)) ** 0.5)
        inits += [numpy_helper.from_array(w, f"w{k}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{k}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{k}", f"b{k}"], [f"c{k}"], pads=[1, 1, 1, 1], name=f"conv{k}"))
        nodes.append(helper.make_node("Relu", [f"c{k}"], [f"r{k}"], name=f"relu{k}"))
        prev = f"r{k}"
    graph = helper.make_graph(nodes, "big",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", width, 8, 8])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["n", width, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return layers


def run_step(*args) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", STEP, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "big.onnx"
        layers = build(model, args.gb)
        weights_mb = os.path.getsize(str(model) + ".data") / 2**20
        ins = run_step("inspect", model)
        out = Path(tmp) / "big_pruned.onnx"
        pru = run_step("prune", model, out)
        side = Path(str(out) + ".data")
        pruned = onnx.load(str(out))
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        y = session.run(None, {"input": np.ones((1, 1024, 8, 8), np.float32)})[0]
        print(f"conv chain: {layers} layers, weights {weights_mb:,.0f} MB in {model.name}.data "
              f"(model file {os.path.getsize(model) / 1024:.0f} KB)")
        print(f"{'step':<8} {'seconds':>8} {'peak added MB':>14} {'x weights':>10}")
        for name, r in (("inspect", ins), ("prune", pru)):
            print(f"{name:<8} {r['seconds']:>8.1f} {r['added_mb']:>14,.0f} {r['added_mb'] / weights_mb:>10.2f}")
        print(f"prune: MACs x{pru['macs_ratio']:.3f}, verified={pru['verified']}; output {out.name} "
              f"{os.path.getsize(out) / 1024:.0f} KB + {side.name} {side.stat().st_size / 2**20:,.0f} MB; "
              f"reloaded ({len(pruned.graph.node)} nodes) and ran: output {y.shape}, "
              f"finite={bool(np.isfinite(y).all())}")


if __name__ == "__main__":
    main()
