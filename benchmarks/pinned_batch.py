"""AOFP trial throughput with the batch pinned in the file vs dynamic, on the same network.

    python benchmarks/pinned_batch.py [--model models/resnet20w_digits.onnx] [--batch 32] [--stack 8] [--repeats 5]

The model is taken twice: as it is (batch dynamic) and as torch.onnx.export writes it at batch 1
without dynamic_axes (inputs and outputs [1, ..], the head's Flatten a Reshape to [1, -1]). Three
trial engines score the same trial masks on the same `--batch` calibration samples:

  dynamic   the dynamic file, all samples in one run per round of `--stack` trials
  unpinned  the pinned file's working copy (`batch.working_graph`, what `prune` uses), likewise
  pinned    the pinned file as it is, one sample per run (the fallback when unpinning is not proven)

Printed: the median milliseconds per trial·sample of each, measured interleaved over `--repeats`
rounds, their ratios, and the largest difference between the dynamic and unpinned damages.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
from onnx import helper, numpy_helper

from aofp_onnx.batch import working_graph
from aofp_onnx.graph import Graph
from aofp_onnx.groups import analyze
from aofp_onnx.trial import TrialEngine


def pinned_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` as the TorchScript exporter writes it at batch 1 without dynamic_axes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in [*out.graph.input, *out.graph.output]:
        dim = vi.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = 1
    for k, node in enumerate(out.graph.node):
        if node.op_type == "Flatten":
            name = f"pinned_target_{k}"
            out.graph.initializer.append(numpy_helper.from_array(np.array([1, -1], np.int64), name))
            reshape = helper.make_node("Reshape", [node.input[0], name], list(node.output), name=node.name)
            out.graph.node[k].CopyFrom(reshape)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/resnet20w_digits.onnx")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--stack", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    dynamic = onnx.load(a.model)
    name = dynamic.graph.input[0].name
    shape = [d.dim_value for d in dynamic.graph.input[0].type.tensor_type.shape.dim][1:]
    x = np.random.default_rng(0).standard_normal((a.batch, *shape)).astype(np.float32)
    pinned_graph = Graph.from_model(pinned_copy(dynamic))
    unpinned_graph, record = working_graph(pinned_graph, {name: x})
    assert record is not None and record.targets, "the pinned copy should unpin"
    engines = {"dynamic": TrialEngine(analyze(Graph.from_model(onnx.load(a.model))), "cpu"),
               "unpinned": TrialEngine(analyze(unpinned_graph), "cpu"),
               "pinned": TrialEngine(analyze(pinned_graph), "cpu")}
    cmap = engines["dynamic"].cmap
    rng = np.random.default_rng(1)
    rows = np.ones((a.stack, cmap.n_slots + 1), np.float32)
    for g in cmap.prunable:
        for row in rows:
            row[rng.choice(g.slots, size=g.width // 2, replace=False)] = 0.0
    keep = cmap.full_keep()

    def score(kind):
        if kind == "pinned":
            return sum(engines[kind].damage(keep, rows, {name: x[k:k + 1]}) for k in range(a.batch)) / a.batch
        return engines[kind].damage(keep, rows, {name: x})

    times = {k: [] for k in engines}
    damages = {k: score(k) for k in engines}  # warm-up, and the values compared below
    for _ in range(a.repeats):
        for kind in engines:
            start = time.perf_counter()
            score(kind)
            times[kind].append((time.perf_counter() - start) * 1e3 / (a.stack * a.batch))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.model}: {len(cmap.prunable)} groups, batch {a.batch}, {a.stack} trials per run, "
          f"{a.repeats} interleaved rounds; ms per trial·sample (median)")
    for kind in engines:
        print(f"  {kind:<9} {med[kind]:8.4f}   x{med['pinned'] / med[kind]:.2f} vs one sample per run")
    print(f"  unpinned / dynamic: x{med['unpinned'] / med['dynamic']:.2f}; max |damage difference| "
          f"{float(np.abs(damages['unpinned'] - damages['dynamic']).max()):.2e}")


if __name__ == "__main__":
    main()
