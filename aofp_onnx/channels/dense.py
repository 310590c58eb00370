"""Gemm and MatMul with a constant weight: dense layers (a flattened feature map is their input).

Gemm Y = A·B (+C), B: [K, N] (transB=0) or [N, K]; MatMul Y = A·B, B: [K, N] contracts A's last axis.
The contracted axis consumes channels (rows of B go with them); the N outputs are new channels
(columns of B, entries of C). A MatMul whose channels sit on any other axis of A passes them through.
MACs per sample: ∏(output dims)·K / batch.
"""
from __future__ import annotations

import numpy as np

from . import Channels, Handler, register
from .attrs import attr


def _out_blocked(node, ctx, axis, reason):
    shape = ctx.shape(node.output[0])
    if shape is not None and len(shape) > axis:
        ids = ctx.fresh(shape[axis])
        ctx.block(ids, reason)
        ctx.set(node.output[0], Channels(axis, ids))


@register("Gemm")
class Gemm(Handler):
    def analyze(self, node, ctx):
        a = ctx.need(node.input[0], node)
        b = ctx.init(node.input[1])
        out_shape = ctx.shape(node.output[0])
        where = ctx.describe(node)
        reason = None
        if b is None:
            reason = f"{where}: weights are not a constant initializer"
        elif attr(node, "transA", 0):
            reason = f"{where}: transA=1 is not supported"
        elif a is None or a.axis != 1 or out_shape is None:
            reason = f"{where}: input features unknown"
        c = ctx.init(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if reason is None and len(node.input) > 2 and node.input[2] and c is None:
            reason = f"{where}: bias is not a constant initializer"
        if reason:
            if a is not None:
                ctx.block(a.ids, reason)
            a_shape = ctx.shape(node.input[0])
            if a_shape is not None and len(a_shape) == 2 and out_shape is not None:  # blocked, still counted
                k = a_shape[0] if attr(node, "transA", 0) else a_shape[1]
                ctx.count(node, int(np.prod(out_shape)) * k // max(ctx.graph.batch, 1))
            return _out_blocked(node, ctx, 1, reason)
        trans_b = int(attr(node, "transB", 0))
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        n = b.shape[n_axis]
        out = ctx.fresh(n)
        ctx.set(node.output[0], Channels(1, out))
        ctx.sink(node, 0)
        ctx.source(node, 1, n_axis, node.output[0])
        ctx.bind(node, 1, k_axis, node.input[0])
        ctx.bind(node, 1, n_axis, node.output[0])
        if c is not None and c.ndim >= 1 and c.shape[-1] == n and n > 1:
            ctx.bind(node, 2, c.ndim - 1, node.output[0])
        macs = int(np.prod(out_shape)) * b.shape[k_axis] // max(ctx.graph.batch, 1)
        ctx.count(node, macs, node.input[0], node.output[0])


@register("MatMul")
class MatMul(Handler):
    def analyze(self, node, ctx):
        a = ctx.get(node.input[0])
        b = ctx.init(node.input[1])
        a_shape, out_shape = ctx.shape(node.input[0]), ctx.shape(node.output[0])
        where = ctx.describe(node)
        b_ch = ctx.get(node.input[1])
        if a_shape is None or out_shape is None:
            reason = f"{where}: shapes unknown"
            for ch in (a, b_ch):
                if ch is not None:
                    ctx.block(ch.ids, reason)
            return
        k = a_shape[-1]
        macs = int(np.prod(out_shape)) * k // max(ctx.graph.batch, 1)
        if b is None or b.ndim != 2:
            reason = f"{where}: the second operand is not a constant 2-D weight"
            for ch in (a, b_ch):
                if ch is not None:
                    ctx.block(ch.ids, reason)
            ctx.count(node, macs)
            return
        if a is None:
            a = ctx.need(node.input[0], node)
            if a is None:
                ctx.count(node, macs)
                return
        last = len(a_shape) - 1
        if a.axis != last:  # channels on a batch/row axis of A: untouched by the product
            ctx.set(node.output[0], Channels(a.axis + len(out_shape) - len(a_shape), a.ids))
            ctx.count(node, macs, node.input[0])
            return
        out = ctx.fresh(b.shape[1])
        ctx.set(node.output[0], Channels(len(out_shape) - 1, out))
        ctx.sink(node, 0)
        ctx.source(node, 1, 1, node.output[0])
        ctx.bind(node, 1, 0, node.input[0])
        ctx.bind(node, 1, 1, node.output[0])
        ctx.count(node, macs, node.input[0], node.output[0])
