"""Elementwise ops: unary activations pass channels through; n-ary ops tie or broadcast them.

For Add/Sub/Mul/Div/Max/Min/Sum/Mean/Pow/PRelu the inputs broadcast numpy-style (right-aligned).
With C channels on output axis c, an operand whose aligned dim is C either carries channels (they
are tied: residuals, gates, x·sigmoid(x)), or is a constant that is per-channel along that dim (it is
sliced with the channels: BN-like affine, PRelu slopes). An aligned dim of 1 broadcasts and is left
alone. Anything else (a computed per-channel operand, a channel tensor broadcast along channels)
blocks the channels involved.
"""
from __future__ import annotations

from . import Channels, Handler, Passthrough, register

UNARY = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Mish", "Gelu", "Erf", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Floor", "Ceil",
    "Round", "Sign", "Sin", "Cos", "Identity", "Cast", "ThresholdedRelu", "Shrink", "Swish",
)


@register(*UNARY)
class Unary(Passthrough):
    pass


@register("Dropout")
class Dropout(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        if ch is not None:
            for out in node.output:
                if out:
                    ctx.set(out, ch)


@register("Clip")
class Clip(Handler):
    """Clip(x, min, max): passthrough when the bounds are scalars (they must be, per the spec)."""

    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        if ch is None:
            return
        for k in (1, 2):
            if k < len(node.input) and node.input[k]:
                bound = ctx.init(node.input[k])
                if bound is None or bound.size != 1:
                    ctx.block(ch.ids, f"{ctx.describe(node)}: bounds are not constant scalars")
        ctx.set(node.output[0], ch)


@register("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu")
class Broadcast(Handler):
    def analyze(self, node, ctx):
        out_shape = ctx.shape(node.output[0])
        labelled = [(k, ctx.get(n)) for k, n in enumerate(node.input) if n and ctx.get(n) is not None]
        if not labelled:
            return  # shape arithmetic, or nothing that carries channels
        where = ctx.describe(node)
        if out_shape is None:
            for _, ch in labelled:
                ctx.block(ch.ids, f"{where}: output shape unknown")
            return
        rank = len(out_shape)
        axes = {ch.axis + rank - len(ctx.shape(node.input[k]) or out_shape) for k, ch in labelled}
        if len(axes) != 1:
            for _, ch in labelled:
                ctx.block(ch.ids, f"{where}: operands carry channels on different axes")
            return
        axis = axes.pop()
        width = out_shape[axis]
        tied = []
        for k, name in enumerate(node.input):
            if not name:
                continue
            shape = ctx.shape(name)
            if shape is None:
                continue
            local = axis - (rank - len(shape))
            dim = shape[local] if local >= 0 else 1
            ch = ctx.get(name)
            if ch is not None:
                if dim == width:
                    tied.append(ch.ids)
                else:
                    ctx.block(ch.ids, f"{where}: broadcast along the channel axis")
            elif dim == width and width > 1:
                if ctx.init(name) is not None:
                    ctx.bind(node, k, local, node.output[0])
                else:
                    tied.append(None)
        if not tied:
            return
        if any(t is None for t in tied):
            reason = f"{where}: an operand is a computed per-channel tensor"
            for ids in tied:
                if ids is not None:
                    ctx.block(ids, reason)
            ids = next((t for t in tied if t is not None), None)
            if ids is None:
                return
        else:
            ids = tied[0]
            for other in tied[1:]:
                ctx.union(ids, other)
        ctx.set(node.output[0], Channels(axis, ids))
