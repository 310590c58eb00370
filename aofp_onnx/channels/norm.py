"""Normalizations and softmax: per-channel ones pass channels through, ones across channels block them.

BatchNormalization and InstanceNormalization hold per-channel scale/bias (and BN's mean/var): they are
sliced with the channels. LayerNormalization, LpNormalization, Softmax & co. pass channels through
only when the channel axis is not among the axes they normalize over; LRN always mixes channels.
"""
from __future__ import annotations

from . import Handler, register
from .attrs import attr, norm_axis


@register("BatchNormalization", "InstanceNormalization")
class PerChannelNorm(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        if ch is None:
            return
        where = ctx.describe(node)
        if ch.axis != 1:
            return ctx.block(ch.ids, f"{where}: channels are not on axis 1")
        if len([o for o in node.output if o]) > 1:
            return ctx.block(ch.ids, f"{where}: training-mode outputs (running statistics) are used")
        for k in range(1, len(node.input)):
            if ctx.init(node.input[k]) is None:
                return ctx.block(ch.ids, f"{where}: parameter '{node.input[k]}' is not a constant initializer")
        for k in range(1, len(node.input)):
            ctx.bind(node, k, 0, node.output[0])
        ctx.set(node.output[0], ch)


def _normalizes_channels(ctx, node, ch, default_axis, coerce_2d=False):
    rank = len(ctx.shape(node.input[0]) or ())
    axis = norm_axis(attr(node, "axis", default_axis), rank)
    if coerce_2d or node.op_type == "LayerNormalization":
        return ch.axis >= axis  # flattened/normalized over axes [axis, rank)
    return ch.axis == axis


@register("Softmax", "LogSoftmax", "Hardmax", "LpNormalization", "LayerNormalization")
class AxisNorm(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        if ch is None:
            return
        legacy = node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and ctx.graph.opset < 13
        default = -1 if node.op_type in ("LayerNormalization", "LpNormalization") or not legacy else 1
        if _normalizes_channels(ctx, node, ch, default, coerce_2d=legacy):
            return ctx.block(ch.ids, f"{ctx.describe(node)}: normalizes across channels")
        ctx.set(node.output[0], ch)


@register("LRN")
class Lrn(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        if ch is not None:
            ctx.block(ch.ids, f"{ctx.describe(node)}: mixes neighbouring channels")
