"""Resize and Upsample as separable resampling: each resized axis is an index_select per tap, weighted.

For output index i of an axis with input length L, output length O and scale s (given, or O/L for
`sizes`; O = ⌊L·s⌋ for `scales`), the source coordinate x is (float32, as onnxruntime computes it):
  half_pixel: (i + ½)/s − ½           pytorch_half_pixel: same, 0 when O = 1
  asymmetric: i/s                     align_corners: i·(L − 1)/(O − 1), 0 when O = 1
  tf_half_pixel_for_nn: (i + ½)/s     half_pixel_symmetric: c·(1 − O/(s·L)) + (i + ½)/s − ½, c = L/2
  tf_crop_and_resize: r₀·(L − 1) + i·(r₁ − r₀)·(L − 1)/(O − 1)  (roi r; outside [0, L − 1] →
                      extrapolation_value)
nearest: x rounded by nearest_mode (round_prefer_floor/ceil, floor, ceil; before opset 11
truncation when upsampling, ceil when downsampling), clamped to [0, L − 1].
linear: x clamped to [0, L − 1], y = (1 − w)·X[⌊x⌋] + w·X[min(⌊x⌋ + 1, L − 1)], w = x − ⌊x⌋.
cubic: 4 taps ⌊x⌋ − 1 … ⌊x⌋ + 2 with Keys weights (cubic_coeff_a), indices clamped, or with
exclude_outside the taps outside dropped and the weights renormalized.
Opset 10 Resize and Upsample use asymmetric coordinates.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .registry import axis_of, floats, ints, op


@op("Resize")
def resize(n, x, roi=None, scales=None, sizes=None):
    if n.opset < 11:  # Resize-10: (X, scales)
        return _resample(n, x, floats(roi), None, None, "asymmetric", "simple")
    scales, sizes = floats(scales), ints(sizes)
    return _resample(n, x, scales or None, sizes or None, floats(roi),
                     n.attr("coordinate_transformation_mode", "half_pixel"),
                     n.attr("nearest_mode", "round_prefer_floor"))


@op("Upsample")
def upsample(n, x, scales=None):
    """Upsample-7 (scales attribute) and -9 (scales input): asymmetric coordinates."""
    return _resample(n, x, n.attr("scales") if n.opset < 9 else floats(scales), None, None, "asymmetric", "simple")


def _resample(n, x, scales, sizes, roi, coord, nearest):
    mode = n.attr("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear", "cubic"):
        raise NotImplementedError(f"mode {mode!r}")
    axes = [axis_of(a, x.dim()) for a in (n.attr("axes") or range(x.dim()))]
    lengths = [x.shape[a] for a in axes]
    if sizes is not None:
        outs, scales = _sizes(n, sizes, lengths)
    else:
        scales = [float(np.float32(s)) for s in scales]
        outs = [int(np.float32(s) * np.float32(length)) for s, length in zip(scales, lengths)]
    if n.attr("antialias", 0) and mode != "nearest" and any(s < 1 for s in scales):
        raise NotImplementedError("antialias when downsampling")
    roi = roi or [0.0] * len(axes) + [1.0] * len(axes)
    if len(roi) == 2 * x.dim() and len(axes) < x.dim():
        roi = [roi[a] for a in axes] + [roi[x.dim() + a] for a in axes]
    for k, (axis, length, out, scale) in enumerate(zip(axes, lengths, outs, scales)):
        if out == length and scale == 1.0 and coord != "tf_crop_and_resize":
            continue
        coords = _source(coord, torch.arange(out, dtype=torch.float32, device=x.device), scale, length, out,
                         roi[k], roi[k + len(axes)])
        taps = _taps(n, mode, nearest, coords, scale, length)
        shape = [1] * x.dim()
        shape[axis] = out
        y = sum(x.index_select(axis, idx) * w.to(x.dtype).reshape(shape) if w is not None else
                x.index_select(axis, idx) for idx, w in taps)
        if coord == "tf_crop_and_resize":
            outside = ((coords < 0) | (coords > length - 1)).reshape(shape)
            y = torch.where(outside, torch.full_like(y, n.attr("extrapolation_value", 0.0)), y)
        x = y
    return x


def _sizes(n, sizes, lengths):
    """Output lengths and scales (O/L in float32) for a `sizes` input, keep_aspect_ratio_policy applied."""
    policy = n.attr("keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        ratios = [o / length for o, length in zip(sizes, lengths)]
        ratio = min(ratios) if policy == "not_larger" else max(ratios)
        sizes = [int(math.floor(ratio * length + 0.5)) for length in lengths]
    scales = [float(np.float32(o) / np.float32(length)) if length else 1.0 for o, length in zip(sizes, lengths)]
    return list(sizes), scales


def _source(coord, i, scale, length, out, r0, r1):
    """Source coordinate of each output index `i` (float32) for one axis."""
    if coord == "asymmetric":
        return i / scale
    if coord == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if coord == "pytorch_half_pixel":
        return (i + 0.5) / scale - 0.5 if out > 1 else torch.zeros_like(i)
    if coord == "align_corners":
        return i * (length - 1) / (out - 1) if out > 1 else torch.zeros_like(i)
    if coord == "tf_half_pixel_for_nn":
        return (i + 0.5) / scale
    if coord == "half_pixel_symmetric":
        adjustment = out / (scale * length)
        return length / 2 * (1 - adjustment) + (i + 0.5) / scale - 0.5
    if coord == "tf_crop_and_resize":
        if out > 1:
            return r0 * (length - 1) + i * (r1 - r0) * (length - 1) / (out - 1)
        return torch.full_like(i, 0.5 * (r0 + r1) * (length - 1))
    raise NotImplementedError(f"coordinate_transformation_mode {coord!r}")


def _taps(n, mode, nearest, x, scale, length):
    """[(source indices, weights or None)] for one axis."""
    last = length - 1
    if mode == "nearest":
        if nearest == "simple":
            idx = torch.ceil(x) if scale < 1 else torch.trunc(x)
        else:
            idx = {"round_prefer_floor": lambda: torch.ceil(x - 0.5), "round_prefer_ceil": lambda: torch.floor(x + 0.5),
                   "floor": lambda: torch.floor(x), "ceil": lambda: torch.ceil(x)}[nearest]()
        return [(idx.clamp(0, last).long(), None)]
    if mode in ("linear", "bilinear"):
        x = x.clamp(0, last)
        low = x.floor()
        w = x - low
        low = low.long()
        return [(low, 1 - w), ((low + 1).clamp(max=last), w)]
    a = n.attr("cubic_coeff_a", -0.75)
    base = x.floor()
    t = x - base
    dists = [t + 1, t, 1 - t, 2 - t]
    weights = [torch.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)
               for d in dists]
    indices = [base.long() + k for k in (-1, 0, 1, 2)]
    if n.attr("exclude_outside", 0):
        weights = [torch.where((i < 0) | (i > last), torch.zeros_like(w), w) for i, w in zip(indices, weights)]
        total = sum(weights)
        weights = [w / total for w in weights]
    return [(i.clamp(0, last), w) for i, w in zip(indices, weights)]
