"""Elementwise maths, activations, comparisons, reductions, softmax family and matrix products.

Binary ops broadcast as numpy (torch does the same). Integer Div truncates toward zero (ONNX), Pow
keeps the base's type. Softmax/LogSoftmax/Hardmax before opset 13 act on the input coerced to 2-D
at `axis` (default 1); from opset 13 along `axis` (default −1).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .registry import axis_of, ints, op

UNARY = {
    "Abs": torch.abs, "Ceil": torch.ceil, "Cos": torch.cos, "Erf": torch.erf, "Exp": torch.exp,
    "Floor": torch.floor, "Log": torch.log, "Neg": torch.neg, "Reciprocal": torch.reciprocal,
    "Relu": torch.relu, "Round": torch.round, "Sigmoid": torch.sigmoid, "Sign": torch.sign, "Sin": torch.sin,
    "Sqrt": torch.sqrt, "Tanh": torch.tanh, "Not": torch.logical_not, "Softplus": F.softplus,
    "Softsign": F.softsign, "Mish": F.mish,
}
BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Equal": torch.eq, "Less": torch.lt,
    "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor,
}


def _elementwise(fn, n, *xs):
    return fn(*xs)


for _name, _fn in {**UNARY, **BINARY}.items():
    op(_name)(functools.partial(_elementwise, _fn))


@op("Div")
def div(n, a, b):
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@op("Pow")
def pow_(n, a, b):
    return torch.pow(a, b).to(a.dtype)


@op("Max", "Min", "Sum", "Mean")
def variadic(n, *xs):
    fn = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[n.op_type]
    out = functools.reduce(fn, xs)
    return out / len(xs) if n.op_type == "Mean" else out


@op("Where")
def where(n, cond, a, b):
    return torch.where(cond, a, b)


@op("Mod")
def mod(n, a, b):
    """fmod=1: sign of the dividend (C fmod); fmod=0: sign of the divisor (Python %)."""
    return torch.fmod(a, b) if n.attr("fmod", 0) else torch.remainder(a, b)


# --- activations with attributes


@op("Elu")
def elu(n, x):
    return F.elu(x, alpha=n.attr("alpha", 1.0))


@op("Celu")
def celu(n, x):
    return F.celu(x, alpha=n.attr("alpha", 1.0))


@op("Selu")
def selu(n, x):
    """gamma·(alpha·(eˣ − 1) for x ≤ 0, x for x > 0) = gamma·elu(x, alpha)."""
    alpha, gamma = n.attr("alpha", 1.67326319217681884765625), n.attr("gamma", 1.05070102214813232421875)
    return gamma * F.elu(x, alpha)


@op("LeakyRelu")
def leaky_relu(n, x):
    return F.leaky_relu(x, n.attr("alpha", 0.01))


@op("PRelu")
def prelu(n, x, slope):
    return torch.where(x < 0, x * slope, x)


@op("ThresholdedRelu")
def thresholded_relu(n, x):
    return torch.where(x > n.attr("alpha", 1.0), x, torch.zeros_like(x))


@op("HardSigmoid")
def hard_sigmoid(n, x):
    """max(0, min(1, alpha·x + beta))."""
    return torch.clamp(x * n.attr("alpha", 0.2) + n.attr("beta", 0.5), 0.0, 1.0)


@op("HardSwish")
def hard_swish(n, x):
    """x · max(0, min(1, x/6 + 1/2))."""
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


@op("Swish")
def swish(n, x):
    """x · sigmoid(alpha·x)."""
    return x * torch.sigmoid(n.attr("alpha", 1.0) * x)


@op("Gelu")
def gelu(n, x):
    return F.gelu(x, approximate=n.attr("approximate", "none"))


@op("Shrink")
def shrink(n, x):
    """x + bias where x < −lambd, x − bias where x > lambd, 0 between."""
    lambd, bias = n.attr("lambd", 0.5), n.attr("bias", 0.0)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


@op("Clip")
def clip(n, x, lo=None, hi=None):
    """min/max are attributes before opset 11, optional scalar inputs from 11 (read as numbers)."""
    if n.opset < 11:
        lo, hi = n.attr("min"), n.attr("max")
    else:
        lo, hi = (None if t is None else t.item() for t in (lo, hi))
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


# --- softmax family


def _along_axis(n, x, fn):
    """Apply `fn(x, dim)` with the opset's axis semantics (2-D coercion before opset 13)."""
    if n.opset >= 13:
        return fn(x, axis_of(n.attr("axis", -1), x.dim()))
    axis = axis_of(n.attr("axis", 1), x.dim())
    flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    return fn(flat, 1).reshape(x.shape)


@op("Softmax")
def softmax(n, x):
    return _along_axis(n, x, lambda t, d: torch.softmax(t, d))


@op("LogSoftmax")
def log_softmax(n, x):
    return _along_axis(n, x, lambda t, d: torch.log_softmax(t, d))


@op("Hardmax")
def hardmax(n, x):
    """1 at the first maximum along the axis, 0 elsewhere."""
    def fn(t, d):
        return F.one_hot(t.argmax(d), t.shape[d]).movedim(-1, d).to(t.dtype)
    return _along_axis(n, x, fn)


# --- reductions


def _reduce_axes(n, x, axes_input):
    """Axes to reduce: attribute before the op's input-axes opset, else the optional input.

    None means all axes; () means none (noop_with_empty_axes=1 with no axes)."""
    since = 13 if n.op_type == "ReduceSum" else 18
    axes = n.attr("axes") if n.opset < since else ints(axes_input)
    if not axes:
        return () if n.attr("noop_with_empty_axes", 0) and n.opset >= since else None
    return sorted(axis_of(a, x.dim()) for a in axes)


def _reduce(pre, reducer, post, n, x, axes_input=None):
    """post(reducer(pre(x), axes)): e.g. ReduceL2 = sqrt(Σ x²)."""
    axes = _reduce_axes(n, x, axes_input)
    if axes == ():
        return x
    x = x if pre is None else pre(x)
    x = reducer(x, list(range(x.dim())) if axes is None else axes, keepdim=bool(n.attr("keepdims", 1)))
    return x if post is None else post(x)


def _prod(x, dims, keepdim):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keepdim)
    return x


REDUCERS = {  # op: (pre, reducer, post)
    "ReduceSum": (None, torch.sum, None),
    "ReduceMean": (None, torch.mean, None),
    "ReduceMax": (None, torch.amax, None),
    "ReduceMin": (None, torch.amin, None),
    "ReduceProd": (None, _prod, None),
    "ReduceL1": (torch.abs, torch.sum, None),
    "ReduceL2": (torch.square, torch.sum, torch.sqrt),
    "ReduceSumSquare": (torch.square, torch.sum, None),
    "ReduceLogSum": (None, torch.sum, torch.log),
    "ReduceLogSumExp": (None, torch.logsumexp, None),
}
for _name, _parts in REDUCERS.items():
    op(_name)(functools.partial(_reduce, *_parts))


@op("ArgMax", "ArgMin")
def arg_extreme(n, x):
    """Index of the first (or, with select_last_index, the last) extreme along `axis`."""
    axis = axis_of(n.attr("axis", 0), x.dim())
    keep = bool(n.attr("keepdims", 1))
    fn = torch.argmax if n.op_type == "ArgMax" else torch.argmin
    if n.attr("select_last_index", 0):
        return x.shape[axis] - 1 - fn(x.flip(axis), axis, keepdim=keep)
    return fn(x, axis, keepdim=keep)


# --- matrix products


@op("MatMul")
def matmul(n, a, b):
    return torch.matmul(a, b)


@op("Gemm")
def gemm(n, a, b, c=None):
    """alpha · A′B′ + beta · C, with A′ = Aᵀ if transA, B′ = Bᵀ if transB."""
    a = a.t() if n.attr("transA", 0) else a
    b = b.t() if n.attr("transB", 0) else b
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None and beta != 0.0:
        y = y + (c if beta == 1.0 else beta * c)
    return y

