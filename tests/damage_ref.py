"""AOFP's relative damage (`aofp_onnx.trial`) in numpy, for the tests' direct computations.

For read points p with base Z_p and trial difference D_p (batch axis first):
- `sample`: mean_n Σ_p ‖D_p[n]‖² / max(Σ_p ‖Z_p[n]‖², SAMPLE_FLOOR · mean_m Σ_p ‖Z_p[m]‖²);
- `batch` (the paper's): Σ_p ‖D_p‖² / Σ_p ‖Z_p‖².
"""
from __future__ import annotations

import numpy as np

from aofp_onnx.trial import SAMPLE_FLOOR, TINY


def per_sample(x: np.ndarray) -> np.ndarray:
    return np.square(np.asarray(x, np.float64)).reshape(len(x), -1).sum(axis=1)


def relative(pairs: list[tuple[np.ndarray, np.ndarray]], norm: str = "sample") -> float:
    """The damage of (difference, base) pairs pooled into one ratio."""
    num = sum(per_sample(d) for d, _ in pairs)
    den = sum(per_sample(z) for _, z in pairs)
    if norm == "batch":
        return float(num.sum() / max(den.sum(), TINY))
    den = np.maximum(np.maximum(den, SAMPLE_FLOOR * den.mean()), TINY)
    return float(np.mean(num / den))
