"""Output fidelity: how close the pruned (and recovered) model's outputs stay to the original's.

Verification proves the cut is exact (pruned ≡ masked original); it says nothing about whether the
removed channels mattered. Fidelity measures that, on held-out samples (calibration samples that the
search and the reconstruction did not see), per graph output o over all samples:

- relative error  e_o = ‖y − y₀‖ / ‖y₀‖  (Frobenius norms over the whole output, y₀ the original's);
- cosine          c_o = mean over samples i of ⟨y_i, y₀_i⟩ / (‖y_i‖ ‖y₀_i‖) (1 when both are 0, 0 when
  only one is);
- top-1 agreement a_o = share of samples whose argmax over axis 1 is the same, for outputs that look like
  class scores: rank 2 (N, C), or (N, C, 1, ..., 1), with C ≥ 2.

A model has **collapsed** when any output has a non-finite value, e_o > 0.75, c_o < 0.5 or a_o < 0.5
(the plain L1 cut that takes the shipped MNIST CNN to chance scores a = 0.14; an L1 cut of PP-OCRv4 det
that wipes out the text map e = 1, c = 0). Without held-out samples (under 4 calibration samples) the
fidelity is measured on the calibration data and says so (`held_out: false`).
"""
from __future__ import annotations

import numpy as np

from .calib import Data
from .modeldata import ModelData
from .runtime import Runner

MAX_REL_ERROR = 0.75
MIN_COSINE = 0.5
MIN_TOP1 = 0.5
HELD_OUT = 64  # samples held out of the calibration data for fidelity (at most a quarter of them)


def held_out_count(n: int) -> int:
    """How many of `n` calibration samples to hold out: a quarter, at most `HELD_OUT`; none under 4."""
    return min(HELD_OUT, n // 4)


def split(data: Data, count: int) -> tuple[Data, Data | None]:
    """(the first len − count samples, the last count samples or None)."""
    if count < 1:
        return data, None
    n = len(data) - count

    def part(sl):
        labels = None if data.labels is None else data.labels[sl]
        return Data({k: v[sl] for k, v in data.inputs.items()}, labels, data.source, data.synthetic)

    return part(slice(0, n)), part(slice(n, None))


def is_class_scores(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and shape[1] >= 2 and all(d == 1 for d in shape[2:])


def fidelity(original: ModelData, candidate: ModelData, data: Data, provider: str = "auto",
             batch_size: int = 32, held_out: bool = True) -> dict:
    """The `fidelity` report entry: per output e, c, a (see the module docstring) and `collapsed`."""
    ref, cand = Runner(original, provider), Runner(candidate, provider)
    acc = {}
    for feeds in data.batches(batch_size):
        for name, y0, y in zip(cand.output_names, ref.run(feeds), cand.run(feeds)):
            a = acc.setdefault(name, {"num": 0.0, "den": 0.0, "cos": 0.0, "agree": 0, "n": 0, "finite": True,
                                      "scores": is_class_scores(y0.shape)})
            y0 = y0.reshape(len(y0), -1).astype(np.float64)
            y = y.reshape(len(y), -1).astype(np.float64)
            a["finite"] &= bool(np.all(np.isfinite(y)))
            a["num"] += float(np.square(y - y0).sum())
            a["den"] += float(np.square(y0).sum())
            a["cos"] += float(cosines(y, y0).sum())
            if a["scores"]:
                a["agree"] += int((y.argmax(axis=1) == y0.argmax(axis=1)).sum())
            a["n"] += len(y)
    outputs = []
    for name, a in acc.items():
        rel = float(np.sqrt(a["num"] / a["den"])) if a["den"] > 0 else (0.0 if a["num"] == 0 else float("inf"))
        entry = {"name": name, "rel_error": rel, "cosine": a["cos"] / a["n"],
                 "top1_agreement": a["agree"] / a["n"] if a["scores"] else None, "finite": a["finite"]}
        entry["collapsed"] = collapsed(entry)
        outputs.append(entry)
    return {"samples": len(data), "held_out": held_out, "source": data.source, "outputs": outputs,
            "collapsed": any(o["collapsed"] for o in outputs)}


def cosines(y: np.ndarray, y0: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two [N, D] arrays (1 when both rows are 0, 0 when one is)."""
    dot = (y * y0).sum(axis=1)
    norms = np.linalg.norm(y, axis=1) * np.linalg.norm(y0, axis=1)
    both_zero = (np.abs(y).sum(axis=1) == 0) & (np.abs(y0).sum(axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, c)


def collapsed(entry: dict) -> bool:
    top1 = entry["top1_agreement"]
    return (not entry["finite"] or not entry["rel_error"] <= MAX_REL_ERROR or not entry["cosine"] >= MIN_COSINE
            or (top1 is not None and top1 < MIN_TOP1))


def lines(fid: dict, model: str = "pruned") -> list[str]:
    """Human-readable fidelity lines for the terminal."""
    where = "held-out samples" if fid["held_out"] else "samples (none held out: the search saw them)"
    out = [f"fidelity {model} vs original on {fid['samples']} {where} of {fid['source']}:"]
    for o in fid["outputs"]:
        top1 = f", top-1 agreement {100 * o['top1_agreement']:.1f}%" if o["top1_agreement"] is not None else ""
        flag = "  <- COLLAPSED" if o["collapsed"] else ""
        out.append(f"  output '{o['name']}': rel. error {o['rel_error']:.3g}, cosine {o['cosine']:.4f}{top1}{flag}")
    return out


def warning(fid: dict, hints: tuple[str, ...]) -> str:
    """The loud warning for a collapsed model (`hints`: what to try, in order)."""
    bad = ", ".join(f"'{o['name']}'" for o in fid["outputs"] if o["collapsed"])
    bar = "!" * 78
    tries = ["Try: " + hints[0]] + ["  or " + h for h in hints[1:]] if hints else []
    return "\n".join([bar, f"WARNING: the output collapsed ({bad}): the written model no longer computes what the "
                      "original does", "(the verification only proves the cut equals the masked original).",
                      *tries, bar])
