"""Convolutions, pools and normalizations on NC(spatial…) tensors.

Padding: `pads` = [begin of each spatial axis…, end of each…]; auto_pad SAME_* pads so that
out = ⌈in/stride⌉, total = (out − 1)·stride + (k − 1)·dilation + 1 − in, the odd element at the end
(SAME_UPPER) or the beginning (SAME_LOWER). Asymmetric pads are applied with F.pad before the torch
op. Pools: out = ⌊(in + pads − (k − 1)·d − 1)/s⌋ + 1 (⌈⌉ with ceil_mode, dropping a last window that
would start in the end padding); the input is padded explicitly up to the last window (−∞ for max,
0 for average/Lp), so torch always runs unpadded in floor mode.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import axis_of, op

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def torch_pads(begin: list[int], end: list[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads as F.pad's tuple (last axis first)."""
    return [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)]


def geometry(n, x, kernel):
    """(strides, dilations, pad_begin, pad_end) per spatial axis, auto_pad resolved."""
    rank = x.dim() - 2
    strides = n.attr("strides") or [1] * rank
    dilations = n.attr("dilations") or [1] * rank
    auto = n.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
            total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
            begin.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
            end.append(total - begin[-1])
    else:
        begin, end = explicit_pads(n, auto, rank)
    return list(strides), list(dilations), begin, end


def explicit_pads(n, auto: str, rank: int) -> tuple[list[int], list[int]]:
    """(pad_begin, pad_end) for auto_pad VALID (none) or NOTSET (the `pads` attribute)."""
    if auto == "VALID":
        return [0] * rank, [0] * rank
    pads = n.attr("pads") or [0] * (2 * rank)
    return list(pads[:rank]), list(pads[rank:])


@op("Conv")
def conv(n, x, w, b=None):
    strides, dilations, begin, end = geometry(n, x, w.shape[2:])
    if begin != end:
        x, begin = F.pad(x, torch_pads(begin, end)), [0] * len(begin)
    return CONV[x.dim() - 2](x, w, b, strides, begin, dilations, n.attr("group", 1))


@op("ConvTranspose")
def conv_transpose(n, x, w, b=None):
    """Full transposed convolution (no padding), then cropped by the pads at each end and extended by
    output_padding at the end: out = s·(in − 1) + op + (k − 1)·d + 1 − pad_begin − pad_end.

    With output_shape (or auto_pad SAME_*, output_shape = in·s) the pads are derived: total =
    s·(in − 1) + op + (k − 1)·d + 1 − out; pad_begin = ⌊t/2⌋ for SAME_UPPER, t − ⌊t/2⌋ otherwise,
    t = max(total, 0), and pad_end = total − pad_begin (negative: zeros appended, as onnxruntime does)."""
    rank = x.dim() - 2
    kernel = w.shape[2:]
    strides = n.attr("strides") or [1] * rank
    dilations = n.attr("dilations") or [1] * rank
    extra = n.attr("output_padding") or [0] * rank
    auto = n.attr("auto_pad", "NOTSET")
    target = n.attr("output_shape")
    if target or auto in ("SAME_UPPER", "SAME_LOWER"):
        target = list(target)[-rank:] if target else [size * s for size, s in zip(x.shape[2:], strides)]
        begin, end = [], []
        for size, k, s, d, op_, out in zip(x.shape[2:], kernel, strides, dilations, extra, target):
            total = s * (size - 1) + op_ + (k - 1) * d + 1 - out
            t = max(total, 0)
            begin.append(t // 2 if auto == "SAME_UPPER" else t - t // 2)
            end.append(total - begin[-1])
    else:
        begin, end = explicit_pads(n, auto, rank)
    y = CONV_T[rank](x, w, None, strides, 0, 0, n.attr("group", 1), dilations)
    crop = torch_pads([-p for p in begin], [op_ - p for op_, p in zip(extra, end)])
    if any(crop):
        y = F.pad(y, crop)
    return y if b is None else y + b.reshape(-1, *[1] * rank)


def pool_geometry(n, x, kernel):
    """(strides, dilations, pad_begin, pad_end, fill_end): fill_end extends the end so that unpadded floor
    pooling yields the ONNX output size (ceil_mode)."""
    strides, dilations, begin, end = geometry(n, x, kernel)
    fill = []
    for size, k, s, d, b, e in zip(x.shape[2:], kernel, strides, dilations, begin, end):
        span = (k - 1) * d + 1
        steps = size + b + e - span
        out = (-(-steps // s) if n.attr("ceil_mode", 0) else steps // s) + 1
        if (out - 1) * s >= size + b:
            out -= 1
        fill.append(max(0, (out - 1) * s + span - (size + b + e)))
    return strides, dilations, begin, end, fill


@op("MaxPool")
def max_pool(n, x):
    kernel = n.attr("kernel_shape")
    strides, dilations, begin, end, fill = pool_geometry(n, x, kernel)
    if any(begin) or any(end) or any(fill):
        x = F.pad(x, torch_pads(begin, [e + f for e, f in zip(end, fill)]), value=-math.inf)
    return MAX_POOL[x.dim() - 2](x, kernel, strides, 0, dilations)


def _window_means(n, x, kernel):
    """Window means of x zero-padded to the pool geometry, and that geometry (strides, begin, end, fill)."""
    if any(d != 1 for d in (n.attr("dilations") or [])):
        raise NotImplementedError(f"{n.op_type} with dilations is not supported")
    strides, _, begin, end, fill = pool_geometry(n, x, kernel)
    padded = F.pad(x, torch_pads(begin, [e + f for e, f in zip(end, fill)]))
    return AVG_POOL[x.dim() - 2](padded, kernel, strides), (strides, begin, end, fill)


@op("AveragePool")
def average_pool(n, x):
    """Σ window / count, count = input positions in the window (+ explicit pads with count_include_pad)."""
    kernel = n.attr("kernel_shape")
    means, (strides, begin, end, fill) = _window_means(n, x, kernel)
    counted = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if n.attr("count_include_pad", 0):
        counted = F.pad(counted, torch_pads(begin, end), value=1.0)
        begin, end = [0] * len(begin), [0] * len(end)
    counted = F.pad(counted, torch_pads(begin, [e + f for e, f in zip(end, fill)]))
    return means / AVG_POOL[x.dim() - 2](counted, kernel, strides)


@op("LpPool")
def lp_pool(n, x):
    """(Σ window |x|ᵖ)^(1/p), pads counting as 0."""
    kernel, p = n.attr("kernel_shape"), n.attr("p", 2)
    means, _ = _window_means(n, x.abs().pow(p), kernel)
    return (means * math.prod(kernel)).pow(1.0 / p)


@op("GlobalAveragePool")
def global_average_pool(n, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(n, x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalLpPool")
def global_lp_pool(n, x):
    p = n.attr("p", 2)
    return x.abs().pow(p).sum(dim=tuple(range(2, x.dim())), keepdim=True).pow(1.0 / p)


@op("BatchNormalization")
def batch_norm(n, x, scale, bias, mean, var):
    """y = (x − μ)/√(σ² + ε)·scale + bias with the running μ, σ² (bn="frozen", or eval()); with
    bn="update" in train(), the batch's μ, σ² (population variance), and then
    running = running·momentum + batch·(1 − momentum)."""
    eps = n.attr("epsilon", 1e-5)
    if n.owner.bn == "update" and n.owner.training:
        dims = [d for d in range(x.dim()) if d != 1]
        momentum = n.attr("momentum", 0.9)
        with torch.no_grad():
            batch_var, batch_mean = torch.var_mean(x, dims, correction=0)
            mean.mul_(momentum).add_(batch_mean.to(mean.dtype), alpha=1.0 - momentum)
            var.mul_(momentum).add_(batch_var.to(var.dtype), alpha=1.0 - momentum)
        return F.batch_norm(x, None, None, scale, bias, True, 0.0, eps)
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)


@op("InstanceNormalization")
def instance_norm(n, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=n.attr("epsilon", 1e-5))


@op("LayerNormalization")
def layer_norm(n, x, scale, bias=None):
    """Normalize over axes [axis, rank), then · scale + bias (broadcast to those axes)."""
    axis = axis_of(n.attr("axis", -1), x.dim())
    shape = x.shape[axis:]
    eps = n.attr("epsilon", 1e-5)
    if scale.shape == shape and (bias is None or bias.shape == shape):
        return F.layer_norm(x, shape, scale, bias, eps)
    y = F.layer_norm(x, shape, eps=eps) * scale
    return y if bias is None else y + bias


@op("LRN")
def lrn(n, x):
    """y = x / (bias + alpha/size · Σ x²)^beta, Σ over channels c − ⌊(size−1)/2⌋ … c + ⌈(size−1)/2⌉
    (written out: torch's local_response_norm centres even windows differently)."""
    size = n.attr("size")
    alpha, beta, bias = n.attr("alpha", 1e-4), n.attr("beta", 0.75), n.attr("bias", 1.0)
    before = (size - 1) // 2
    padded = F.pad(x * x, [0, 0] * (x.dim() - 2) + [before, size - 1 - before])
    channels = x.shape[1]
    total = sum(padded[:, k:k + channels] for k in range(size))
    return x / (bias + alpha / size * total).pow(beta)


@op("LpNormalization")
def lp_normalization(n, x):
    """x / ‖x‖ₚ along `axis` (p = 1 or 2)."""
    axis = axis_of(n.attr("axis", -1), x.dim())
    return x / x.norm(p=n.attr("p", 2), dim=axis, keepdim=True)
