"""The core invariant, checked on data: the pruned model equals the masked original.

Compared: every graph output on every batch, and the output of every MAC-counted node (Conv,
ConvTranspose, Gemm, MatMul) restricted to its kept channels — so a cut is proven layer by layer even
where the model's outputs saturate (a sigmoid map that is ~0 on the data says little). With k batches,
batch i checks layers i, i+k, i+2k, …: every layer is checked, and only 1/k of them is held at once. For each compared tensor,
d = max|y_masked − y_pruned| and s = max|y_masked|; the cut passes when d ≤ tol · max(s, 1) for every
one (tol = 1e-4 by default; for a tensor of a coarser float type, e.g. float16, at least `ULPS` units in
the last place of that type: tol ≥ ULPS·eps), shapes agree and all values are finite. The pruned model must also pass
`onnx.checker` (full check) and build an onnxruntime
session.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .modeldata import ModelData, as_model_data
from .groups import ChannelMap
from .masking import KEEP_INPUT, keep_feed, masked_model
from .runtime import Runner

DEFAULT_TOL = 1e-4
ULPS = 10  # a float16 tensor passes at 10·eps16 ≈ 1e-2 (its own rounding, compounded over layers)


@dataclass
class Verification:
    max_abs_diff: float
    max_rel_diff: float
    passed: bool
    provider: str
    samples: int
    detail: str = ""

    def to_json(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff, "passed": self.passed,
                "provider": self.provider, "samples": self.samples, **({"detail": self.detail} if self.detail else {})}


def check_pruned(model: onnx.ModelProto | str) -> str:
    """'' when `model` (a proto or a file path) passes onnx.checker (full check), else the checker's first line."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        return str(exc).strip().splitlines()[0][:300]
    return ""


def verify(cmap: ChannelMap, keep: np.ndarray, pruned: onnx.ModelProto | ModelData,
           batches: list[dict[str, np.ndarray]], provider: str = "auto", tol: float = DEFAULT_TOL,
           checker: bool = True) -> Verification:
    """Compare the masked original and the pruned model on `batches` of feeds.

    `checker=False` leaves onnx.checker to the caller (`api.save_model` runs it on the written file)."""
    pruned = as_model_data(pruned)
    problem = check_pruned(pruned.materialize()) if checker else ""
    reference_model = masked_model(cmap)
    layers = _layer_outputs(cmap)
    outputs = [o.name for o in pruned.proto.graph.output]
    # unoptimized sessions without prepacking read our weight arrays in place (see Runner); no arena:
    # each run's activations are returned at once
    reference = Runner(_with_outputs(reference_model, layers), provider, optimization="disable", prepack=False,
                       arena=False)
    if problem:
        return Verification(float("inf"), float("inf"), False, reference.provider, 0, f"onnx.checker: {problem}")
    candidate = Runner(_with_outputs(pruned, layers), provider, optimization="disable", prepack=False,
                       arena=False)
    mask = keep_feed(keep)
    worst_abs = worst_rel = 0.0
    passed = True
    samples = 0
    detail = ""
    for k, feeds in enumerate(batches):
        names = outputs + layers[k::len(batches)]
        ref = reference.run({**feeds, KEEP_INPUT: mask}, names)
        got = candidate.run(feeds, names)
        samples += len(next(iter(feeds.values())))
        for name, a, b in zip(names, ref, got):
            if name in cmap.tensor_axis and name not in cmap.graph.outputs:
                a = np.take(a, cmap.kept_indices(name, keep), axis=cmap.tensor_axis[name])
            if a.shape != b.shape:
                return Verification(float("inf"), float("inf"), False, reference.provider, samples,
                                    f"output '{name}': shape {b.shape}, expected {a.shape}")
            if not np.all(np.isfinite(b)):
                return Verification(float("inf"), float("inf"), False, reference.provider, samples,
                                    f"output '{name}': non-finite values")
            diff = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
            rel = diff / max(float(np.max(np.abs(a.astype(np.float64)))) if a.size else 0.0, 1.0)
            if rel > worst_rel:
                detail = f"worst output '{name}'"
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
            passed = passed and rel <= tolerance(tol, b.dtype)
    return Verification(worst_abs, worst_rel, passed, reference.provider, samples, detail)


def tolerance(tol: float, dtype) -> float:
    """The relative tolerance for a tensor of numpy type `dtype`: `tol`, or ULPS·eps for a coarser float."""
    dtype = np.dtype(dtype)
    return max(tol, ULPS * float(np.finfo(dtype).eps)) if np.issubdtype(dtype, np.floating) else tol


def _layer_outputs(cmap: ChannelMap) -> list[str]:
    """Outputs of the MAC-counted nodes that carry channels (compared on their kept channels)."""
    outs = []
    for c in cmap.counted:
        name = cmap.graph.nodes[c.node_index].output[0]
        if name in cmap.tensor_axis and name not in cmap.graph.outputs:
            outs.append(name)
    return outs


def _with_outputs(model: ModelData, names: list[str]) -> ModelData:
    """`model` with tensors `names` also exposed as graph outputs (untyped: onnxruntime infers them)."""
    out = model.copy_proto()
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    return ModelData(out, model.weights)
