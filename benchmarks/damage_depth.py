"""Where must a channel's damage be read for its ranking to match the oracle's?

    python benchmarks/damage_depth.py [--model models/resnet20_digits.onnx] [--samples 64]

For every prunable channel c, its single-channel ablation (the masked original with c zeroed at its
consumers) is compared with the unablated run at every node output downstream:
d_T(c) = Σ‖T − T_c‖² / Σ‖T‖². Per group, the Spearman rank correlation (within the group) between
d_T and the oracle's damage at the model outputs is printed for the first changed tensor, the
tensors in graph order where it first reaches 0.8 and 0.9, and the model's last hidden tensor.
AOFP reads its damage right after the consumers (DESIGN.md), so the first columns bound what any
next-layer estimate can reach.
"""
from __future__ import annotations

import argparse

import numpy as np
import onnx

from aofp_onnx.api import Pruner
from aofp_onnx.modeldata import ModelData
from aofp_onnx.masking import masked_model
from aofp_onnx.runtime import Runner
from aofp_onnx.oracle import squared_errors
from aofp_vs_oracle import spearman


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/resnet20_digits.onnx")
    parser.add_argument("--calib", default="models/mnist_calib.npz")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--stack", type=int, default=8, help="ablations per run")
    args = parser.parse_args()

    pruner = Pruner.load(args.model, data=args.calib, limit=args.samples)
    cmap = pruner.cmap
    masked = masked_model(cmap)
    proto = masked.copy_proto()
    finals = [o.name for o in proto.graph.output]
    op_of = {n.output[0]: n.op_type for n in pruner.graph.data.proto.graph.node}
    hidden = [t for t in op_of if t not in finals]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in hidden)
    runner = Runner(ModelData(proto, masked.weights), "cpu")
    names = runner.output_names
    num, den = squared_errors(runner, list(pruner.data.batches(args.batch)), cmap.full_keep(),
                              np.arange(cmap.n_slots), args.stack)
    damage = num / np.maximum(den, 1e-30)
    finals_at = [names.index(t) for t in finals]
    oracle = num[:, finals_at].sum(axis=1) / max(den[finals_at].sum(), 1e-30)  # = oracle.output_damage
    order = [names.index(t) for t in hidden]  # graph order

    print(f"model {args.model}: {len(cmap.prunable)} prunable groups, {cmap.n_slots} channels, {args.samples} samples")
    print(f"{'group':>5} {'width':>5} {'first changed':>18} {'first >= 0.8':>26} {'first >= 0.9':>26} "
          f"{'last hidden':>12}")
    for k, g in enumerate(cmap.prunable):
        if g.width <= 2:
            continue
        path = [(j, spearman(damage[g.slots, j], oracle[g.slots])) for j in order if damage[g.slots, j].max() > 0]
        if not path:
            continue

        def first(level):
            hit = next(((i, j, r) for i, (j, r) in enumerate(path) if r >= level), None)
            return f"{op_of[names[hit[1]]]} +{hit[0]} tensors on: {hit[2]:.2f}" if hit else "never"

        j0, r0 = path[0]
        print(f"{k:5d} {g.width:5d} {op_of[names[j0]] + f': {r0:.2f}':>18} {first(0.8):>26} {first(0.9):>26} "
              f"{path[-1][1]:12.2f}")


if __name__ == "__main__":
    main()
