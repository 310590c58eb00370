"""The core invariant, checked on data: the pruned model equals the masked original.

For each output y: d = max|y_masked − y_pruned| and the output scale s = max|y_masked|; the cut
passes when d ≤ tol · max(s, 1) for every output (tol = 1e-4 by default), shapes agree and all values
are finite. The pruned model must also pass `onnx.checker` (full check) and build an onnxruntime
session.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .groups import ChannelMap
from .masking import KEEP_INPUT, keep_feed, masked_model
from .runtime import Runner

DEFAULT_TOL = 1e-4


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


def check_pruned(model: onnx.ModelProto) -> str:
    """'' when `model` passes onnx.checker (full check), else the checker's first line."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        return str(exc).strip().splitlines()[0][:300]
    return ""


def verify(cmap: ChannelMap, keep: np.ndarray, pruned: onnx.ModelProto, batches: list[dict[str, np.ndarray]],
           provider: str = "auto", tol: float = DEFAULT_TOL) -> Verification:
    """Compare the masked original and the pruned model on `batches` of feeds."""
    problem = check_pruned(pruned)
    reference = Runner(masked_model(cmap), provider)
    if problem:
        return Verification(float("inf"), float("inf"), False, reference.provider, 0, f"onnx.checker: {problem}")
    candidate = Runner(pruned, provider)
    mask = keep_feed(keep)
    worst_abs = worst_rel = 0.0
    samples = 0
    detail = ""
    for feeds in batches:
        ref = reference.run({**feeds, KEEP_INPUT: mask})
        got = candidate.run(feeds)
        samples += len(next(iter(feeds.values())))
        for name, a, b in zip(candidate.output_names, ref, got):
            if a.shape != b.shape:
                return Verification(float("inf"), float("inf"), False, reference.provider, samples,
                                    f"output '{name}': shape {b.shape}, expected {a.shape}")
            if not np.all(np.isfinite(b)):
                return Verification(float("inf"), float("inf"), False, reference.provider, samples,
                                    f"output '{name}': non-finite values")
            diff = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
            rel = diff / max(float(np.max(np.abs(a))) if a.size else 0.0, 1.0)
            if rel > worst_rel:
                detail = f"worst output '{name}'"
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
    return Verification(worst_abs, worst_rel, worst_rel <= tol, reference.provider, samples, detail)
