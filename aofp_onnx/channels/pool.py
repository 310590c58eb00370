"""Pooling, reductions, resizing and padding: channel-preserving unless they act on the channel axis.

Pools act on spatial axes only. ReduceX and ArgMax/ArgMin keep channels unless their axes include the
channel axis (with keepdims=0 the channel axis moves left by the number of reduced axes before it).
Resize/Upsample must scale the channel axis by 1; a `sizes` input holding the channel count is
rewritten at cut time. Pad must not pad the channel axis (pads computed at run time, as Keras' "same"
padding is, are read at the analysis shape: the verification of the cut runs at that shape too).
"""
from __future__ import annotations

import numpy as np

from . import Channels, Handler, register
from .attrs import attr, const_input, has_input, norm_axis, write_width


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
class Pool(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        if ch is None:
            return
        if ch.axis != 1:
            return ctx.block(ch.ids, f"{ctx.describe(node)}: channels are not on axis 1")
        for out in node.output:
            if out:
                ctx.set(out, ch)


REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


def _reduce_axes(node, ctx, rank):
    """Axes a Reduce op reduces (None when they are computed at run time)."""
    axes = attr(node, "axes")
    if axes is None and has_input(node, 1):
        value = const_input(ctx, node, 1)
        if value is None:
            return None
        axes = value.tolist()
    if not axes:
        return [] if attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(norm_axis(a, rank) for a in axes)


@register(*REDUCE)
class Reduce(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        shape = ctx.shape(node.input[0])
        if ch is None or shape is None:
            return
        axes = _reduce_axes(node, ctx, len(shape))
        where = ctx.describe(node)
        if axes is None:
            return ctx.block(ch.ids, f"{where}: reduction axes are computed at run time")
        if ch.axis in axes:
            return ctx.block(ch.ids, f"{where}: reduces across channels")
        keep = int(attr(node, "keepdims", 1))
        axis = ch.axis if keep else ch.axis - sum(a < ch.axis for a in axes)
        ctx.set(node.output[0], Channels(axis, ch.ids))


@register("ArgMax", "ArgMin")
class ArgReduce(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        shape = ctx.shape(node.input[0])
        if ch is None or shape is None:
            return
        axis = norm_axis(attr(node, "axis", 0), len(shape))
        if axis == ch.axis:
            return ctx.block(ch.ids, f"{ctx.describe(node)}: reduces across channels")
        keep = int(attr(node, "keepdims", 1))
        ctx.set(node.output[0], Channels(ch.axis if keep or axis > ch.axis else ch.axis - 1, ch.ids))


@register("Resize", "Upsample")
class Resize(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        if ch is None:
            return
        in_shape, out_shape = ctx.shape(node.input[0]), ctx.shape(node.output[0])
        where = ctx.describe(node)
        if in_shape is None or out_shape is None or in_shape[ch.axis] != out_shape[ch.axis]:
            return ctx.block(ch.ids, f"{where}: resizes the channel axis")
        sizes_index = 3 if node.op_type == "Resize" else None
        if sizes_index is not None and has_input(node, sizes_index):
            sizes = const_input(ctx, node, sizes_index)
            if sizes is None:
                return ctx.block(ch.ids, f"{where}: output sizes are computed at run time")
            axes = attr(node, "axes")
            pos = ch.axis if axes is None else (list(axes).index(ch.axis) if ch.axis in axes else None)
            if pos is not None:
                ctx.rewrite(node, write_width(node.output[0], 3, pos))
        ctx.set(node.output[0], ch)


@register("Pad")
class Pad(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        shape = ctx.shape(node.input[0])
        if ch is None or shape is None:
            return
        where = ctx.describe(node)
        pads = attr(node, "pads")
        if pads is None:  # computed pads (Keras "same" padding from Shape): their values at the analysis shape
            value = const_input(ctx, node, 1)
            value = ctx.graph.value(node.input[1]) if value is None else value
            if value is None:
                return ctx.block(ch.ids, f"{where}: pads are computed at run time")
            pads = value.tolist()
        axes = attr(node, "axes")
        if has_input(node, 3):
            value = const_input(ctx, node, 3)
            if value is None:
                return ctx.block(ch.ids, f"{where}: pad axes are computed at run time")
            axes = value.tolist()
        rank = len(shape)
        axes = list(range(rank)) if axes is None else [norm_axis(a, rank) for a in axes]
        pads = np.asarray(pads).reshape(2, -1)
        if ch.axis in axes and pads[:, axes.index(ch.axis)].any():
            return ctx.block(ch.ids, f"{where}: pads the channel axis")
        ctx.set(node.output[0], ch)
