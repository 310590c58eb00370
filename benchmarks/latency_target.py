"""Faster where it runs (issue 13): MACs target vs latency target on third-party models, measured side by side.

    python benchmarks/latency_target.py [--models nudenet,ppocr_det,orinet] [--repeats 15] [--threads 1]
                                        [--provider cpu|cuda] [--batch 1]

Per model (YOLOv8n from nudenet==3.4.2, PP-OCRv4 det from rapidocr-onnxruntime==1.4.4, the VGG-style orientation
classifier from occular-deskew==0.5.0: the test corpus's, tests/realmodels.py, fetched with `pip download --no-deps`
once and checked against their SHA-256), all at 1x3x320x320, batch 1, onnxruntime CPU (`--provider cuda`: the CUDA
execution provider, inputs and outputs through IOBinding, each timed call including its copies; `--batch B`: latency
tables, targets and timings at batch B), `--criterion l1`:
  A  `--flops-target 0.6`, default options (`--round-to auto`);
  B  `--latency-target 0.6` (its latency table built from an empty cache: the table's time and share of
     the run are printed);
  C  `--flops-target F`, F found on the latency table so that C estimates B's latency (fidelity at equal
     latency);
  D  (with `--aofp`) `--flops-target 0.6` with `--criterion aofp` (its search takes minutes);
  E  (with `--aofp`) `--latency-target 0.6` with AOFP.
Then the original, A, B, C (and D, E) are timed in one interleaved run (wall: medians, p10-p90) and, with one
thread, in a second interleaved run by the calling thread's CPU clock (onnxruntime runs there with one
thread: the wall time an idle machine would show, which a machine shared with other work cannot give).
Fidelity: relative L2 error and cosine of all outputs against the original's on HELD = 32 held-out synthetic
images (shapes, text and gradients drawn with PIL: structured inputs, not labelled data).
Must show: A latency <= 1.10 x its MACs ratio; B latency <= 0.66; B's fidelity >= C's. D's latency/MACs is
printed beside the fidelity of A and D: a damage-driven criterion keeps the channels that cost little
time when they are the ones the output needs; E is how AOFP aims at time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's aofp_onnx; the corpus of real models

from aofp_onnx import api  # noqa: E402
from aofp_onnx.bench import bench_models  # noqa: E402
from aofp_onnx.runtime import Runner, latency_ms  # noqa: E402
from realmodels import BY_ID  # noqa: E402
from textlines import corpus_model  # noqa: E402

MODELS = {  # id: (the corpus's id, (mean, std) applied to [0, 1] pixels)
    "nudenet": ("nudenet_yolov8n_320", (0.0, 1.0)),
    "ppocr_det": ("ppocr_v4_det", (0.5, 0.5)),
    "orinet": ("occular_orinet", (0.45, 0.225)),
}
SIZE = 320
HELD = 32  # held-out images of the fidelity (8 could not separate cuts that differ in a few channels)


def images(n: int, seed: int, mean: float, std: float) -> np.ndarray:
    """n synthetic RGB images: a gradient, rectangles, ellipses and lines of text, normalized."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = np.linspace(rng.uniform(0, 255), rng.uniform(0, 255), SIZE)
        img = Image.fromarray(np.stack([np.add.outer(base, base[::-1]) / 2] * 3, -1).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, SIZE - 40, 2)
            box = [int(x0), int(y0), int(x0 + rng.integers(20, 160)), int(y0 + rng.integers(20, 120))]
            color = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=color)
        for _ in range(4):
            text = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "), 14))
            draw.text((int(rng.integers(0, SIZE - 120)), int(rng.integers(0, SIZE - 20))), text, fill=(0, 0, 0))
        out.append((np.asarray(img, np.float32) / 255 - mean) / std)
    return np.stack(out).transpose(0, 3, 1, 2).astype(np.float32)


def fidelity(original: Path, pruned: Path, name: str, x: np.ndarray) -> tuple[float, float]:
    a, b = Runner(str(original), "cpu", threads=1), Runner(str(pruned), "cpu", threads=1)
    ya = np.concatenate([np.concatenate([y.ravel() for y in a.run({name: x[k:k + 1]})]) for k in range(len(x))])
    yb = np.concatenate([np.concatenate([y.ravel() for y in b.run({name: x[k:k + 1]})]) for k in range(len(x))])
    rel = float(np.linalg.norm(yb - ya) / max(np.linalg.norm(ya), 1e-30))
    cos = float(ya @ yb / max(np.linalg.norm(ya) * np.linalg.norm(yb), 1e-30))
    return rel, cos


def macs_target_at_latency(path: Path, name: str, latency: float, step: int, args) -> float:
    """The --flops-target at which the criterion's widths (rounded to `step`) have the latency table's
    estimate `latency` (bisection; the table comes from the cache the latency-target run filled)."""
    from aofp_onnx.criteria import l1_scores, random_scores
    from aofp_onnx.latency import build_table
    from aofp_onnx.select import round_widths, select_by_score
    from aofp_onnx.targets import latency_weights

    pruner = api.Pruner.load(path, input_shapes={name: (1, 3, SIZE, SIZE)})
    table = build_table(pruner.cmap, pruner.feeds(args.batch, args.batch)[0], args.provider, threads=args.threads)
    scores = l1_scores(pruner.cmap) if args.criterion == "l1" else random_scores(pruner.cmap, 0)
    scores = scores / latency_weights(pruner.cmap, table)  # as a --flops-target run with --round-to auto weighs them
    lo, hi = 0.05, 1.0
    for _ in range(10):
        mid = (lo + hi) / 2
        keep = round_widths(pruner.cmap, select_by_score(pruner.cmap, scores, mid), scores, step, 1, mid)
        lo, hi = (mid, hi) if table.ratio(keep) < latency else (lo, mid)
    return (lo + hi) / 2


def run_model(model_id: str, path: Path, tmp: Path, args) -> dict:
    corpus_id, (mean, std) = MODELS[model_id]
    name = BY_ID[corpus_id].input_name
    np.savez(tmp / f"{model_id}_calib.npz", **{name: images(max(8, args.batch), 0, mean, std)})
    held = images(HELD, 1, mean, std)
    common = dict(calib=str(tmp / f"{model_id}_calib.npz"), input_shapes={name: (1, 3, SIZE, SIZE)},
                  batch_size=8, latency_batch=args.batch, threads=args.threads, latency=False, provider=args.provider)
    runs = "ABCDE" if args.aofp else "ABC"
    out = {k: tmp / f"{model_id}_{k}.onnx" for k in runs}
    rep_b = api.prune(path, out["B"], latency_target=0.6, criterion=args.criterion, **common)
    rep_a = api.prune(path, out["A"], flops_target=0.6, criterion=args.criterion, **common)
    f_c = macs_target_at_latency(path, name, rep_b["targets"]["latency"]["estimated"], rep_a["round_to"]["used"],
                                 args)
    reps = [rep_a, rep_b, api.prune(path, out["C"], flops_target=f_c, criterion=args.criterion, **common)]
    if args.aofp:
        reps.append(api.prune(path, out["D"], flops_target=0.6, criterion="aofp", **common))
        reps.append(api.prune(path, out["E"], latency_target=0.6, criterion="aofp", **common))
    paths = [str(path)] + [str(out[k]) for k in runs]
    rows = bench_models(paths, provider=args.provider, batch_size=args.batch, repeats=args.repeats, warmup=2,
                        threads=args.threads, input_shapes={name: (args.batch, 3, SIZE, SIZE)})
    cpu = None
    if args.threads == 1 and args.provider == "cpu":  # the same by the thread's CPU clock (immune to other load)
        feeds = {name: np.random.default_rng(0).standard_normal((args.batch, 3, SIZE, SIZE)).astype(np.float32)}
        runners = [Runner(p, "cpu", threads=1) for p in paths]
        cpu = latency_ms(runners, [feeds] * len(runners), warmup=2, repeats=args.repeats, cpu=True)
    result = {"model": model_id, "base_ms": rows[0]["median_ms"], "provider": rows[0]["provider"],
              "table_s": rep_b["latency_table"]["seconds"],
              "run_s": rep_b["seconds"], "table": rep_b["latency_table"]}
    for k, rep, row in zip(runs, reps, rows[1:]):
        rel, cos = fidelity(path, out[k], name, held)
        result[k] = {"macs": rep["targets"]["macs"]["reached"], "latency": row["ratio"],
                     "cpu": cpu[runs.index(k) + 1]["median"] / cpu[0]["median"] if cpu else float("nan"),
                     "spread": (row["p10_ms"] / rows[0]["median_ms"], row["p90_ms"] / rows[0]["median_ms"]),
                     "rel_err": rel, "cos": cos, "round_to": rep["round_to"]["used"],
                     "target": rep["targets"]["latency"]["target"] if k in "BE" else rep["targets"]["macs"]["target"]}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="nudenet,ppocr_det,orinet")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: stable on a shared machine)")
    parser.add_argument("--criterion", default="l1", choices=["l1", "random"], help="criterion of A, B and C")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=1, help="batch of the latency tables, targets and timings")
    parser.add_argument("--aofp", action="store_true", help="also D: AOFP at 0.6 of the MACs")
    args = parser.parse_args()
    paths = {m: corpus_model(MODELS[m][0]) for m in args.models.split(",")}
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AOFP_ONNX_CACHE"] = tmp  # latency tables built from scratch, so their cost shows
        for model_id, path in paths.items():
            results.append(run_model(model_id, path, Path(tmp), args))
    print(f"onnxruntime {results[0]['provider']}, batch {args.batch}, {args.batch}x3x{SIZE}x{SIZE}, "
          f"threads {args.threads}, --criterion {args.criterion}; "
          f"latency = pruned/original median of {args.repeats} interleaved runs (p10-p90 of the pruned runs / "
          f"original median)")
    print(f"{'model':<10} {'run':<22} {'MACs x':>7} {'latency x':>10} {'p10-p90':>12} {'lat/MACs':>9} "
          f"{'cpu x':>6} {'cpu/MACs':>8} {'round':>6} {'rel.err':>8} {'cosine':>7}")
    for r in results:
        for k, label in (("A", "flops-target 0.6"), ("B", "latency-target 0.6"), ("C", "flops-target (=B lat)"),
                         ("D", "aofp, flops-target 0.6"), ("E", "aofp, latency-target 0.6")):
            if k not in r:
                continue
            x = r[k]
            if k == "C":
                label = f"flops-target {x['target']:.3f}"
            print(f"{r['model']:<10} {label:<22} {x['macs']:>7.3f} {x['latency']:>10.3f} "
                  f"{x['spread'][0]:>5.2f}-{x['spread'][1]:<6.2f} {x['latency'] / x['macs']:>9.2f} "
                  f"{x['cpu']:>6.3f} {x['cpu'] / x['macs']:>8.2f} {x['round_to']:>6} "
                  f"{x['rel_err']:>8.4f} {x['cos']:>7.4f}")
        print(f"{'':<10} original {r['base_ms']:.1f} ms; latency table {r['table_s']:.1f} s of the "
              f"latency-target run's {r['run_s']:.1f} s ({100 * r['table_s'] / r['run_s']:.0f}%), "
              f"{r['table']['node_configs']} layer configurations, class penalties {r['table']['class_penalty']}")
    print("checks (wall / cpu): A latency <= 1.10 x MACs: " + ", ".join(
        f"{r['model']} {r['A']['latency'] / r['A']['macs']:.2f} / {r['A']['cpu'] / r['A']['macs']:.2f}"
        for r in results))
    if args.aofp:
        print("        D (aofp) latency / MACs: " + ", ".join(
            f"{r['model']} {r['D']['latency'] / r['D']['macs']:.2f} / {r['D']['cpu'] / r['D']['macs']:.2f}"
            for r in results))
        print("        E (aofp) latency <= 0.66: " + ", ".join(
            f"{r['model']} {r['E']['latency']:.3f} / {r['E']['cpu']:.3f}" for r in results))
        print("        fidelity (rel.err) A / D / B / E: " + ", ".join(
            f"{r['model']} {r['A']['rel_err']:.3f} / {r['D']['rel_err']:.3f} / {r['B']['rel_err']:.3f} / "
            f"{r['E']['rel_err']:.3f}" for r in results))
    print("        B latency <= 0.66: " + ", ".join(f"{r['model']} {r['B']['latency']:.3f} / {r['B']['cpu']:.3f}"
                                                  for r in results))
    print("        B fidelity >= C (rel.err B <= C): " + ", ".join(
        f"{r['model']} {r['B']['rel_err']:.4f} vs {r['C']['rel_err']:.4f}" for r in results))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
