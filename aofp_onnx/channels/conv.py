"""Conv and ConvTranspose: the filters that create channels, and the inputs that consume them.

Grouped convolution with g groups (weight of Conv: [Cout, Cin/g, k..]; of ConvTranspose: [Cin, Cout/g, k..]):

* one input channel per group (depthwise, any multiplier m): group k reads input channel k and
  writes outputs k·m..k·m+m-1, so those outputs *are* input channel k's atom (in and out tied);
  removing it removes the group and `group` shrinks with it.
* several channels per group: the group count stays, so every group must lose the same local
  channels: input channel j of group 0 is tied to input channel j of every group (likewise outputs).

MACs per sample: Conv Cout·∏out_spatial·(Cin/g)·∏k; ConvTranspose Cin·∏in_spatial·(Cout/g)·∏k.
"""
from __future__ import annotations

import numpy as np

from . import Channels, Handler, register
from .attrs import attr, set_attr


def _block_node(node, ctx, x, out_shape, reason, macs=None):
    """Block the node's channels; its MACs (when the shapes give them) still count, at full width."""
    if x is not None:
        ctx.block(x.ids, reason)
    if out_shape is not None and len(out_shape) >= 2:
        out = ctx.fresh(out_shape[1])
        ctx.block(out, reason)
        ctx.set(node.output[0], _channels(out))
    if macs is not None:
        ctx.count(node, macs)


def _macs(ctx, transposed, w_shape, in_shape, out_shape):
    """Per-sample MACs from the weight, input and output shapes (None when one is unknown)."""
    if w_shape is None or in_shape is None or out_shape is None or len(w_shape) < 2:
        return None
    if transposed:
        macs = w_shape[0] * int(np.prod(in_shape[2:])) * w_shape[1] * int(np.prod(w_shape[2:])) * in_shape[0]
    else:
        macs = w_shape[0] * int(np.prod(out_shape[2:])) * w_shape[1] * int(np.prod(w_shape[2:])) * out_shape[0]
    return macs // max(ctx.graph.batch, 1)


def _channels(ids, axis=1):
    return Channels(axis, ids)


def _tie_across_groups(ctx, ids: np.ndarray, groups: int) -> None:
    per = ids.reshape(groups, -1)
    for k in range(1, groups):
        ctx.union(per[0], per[k])


def _set_group_from(tensor):
    def fn(node, cut):
        set_attr(node, "group", int(len(cut.kept(tensor))))
    return fn


class _GroupedConv(Handler):
    transposed = False

    def analyze(self, node, ctx):
        x = ctx.need(node.input[0], node)
        w = ctx.init(node.input[1])
        out_name = node.output[0]
        out_shape = ctx.shape(out_name)
        in_shape = ctx.shape(node.input[0])
        where = ctx.describe(node)
        macs = _macs(ctx, self.transposed, w.shape if w is not None else ctx.shape(node.input[1]), in_shape, out_shape)
        if w is None:
            return _block_node(node, ctx, x, out_shape, f"{where}: weights are not a constant initializer", macs)
        if x is None or out_shape is None or in_shape is None:
            return _block_node(node, ctx, x, out_shape, f"{where}: input or output shape unknown", macs)
        group = int(attr(node, "group", 1))
        if self.transposed:
            cin, cout = w.shape[0], w.shape[1] * group
        else:
            cout, cin = w.shape[0], w.shape[1] * group
        cin_g = cin // group
        depthwise = group > 1 and cin_g == 1
        mapped = x.axis == 1  # else the labelled axis is one the conv mixes, and its input channels are unmapped
        if not mapped and depthwise:
            return _block_node(node, ctx, x, out_shape, f"{where}: channels are not on axis 1 of its input", macs)
        if not mapped:
            ctx.block(x.ids, f"{where}: channels are not on axis 1 of its input")
        elif len(x.ids) != cin:
            return _block_node(node, ctx, x, out_shape,
                               f"{where}: weight expects {cin} input channels, input has {len(x.ids)}", macs)
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if has_bias and ctx.init(node.input[2]) is None:
            return _block_node(node, ctx, x, out_shape, f"{where}: bias is not a constant initializer", macs)
        in_axis, out_axis = (0, 1) if self.transposed else (1, 0)
        if depthwise:  # any multiplier: outputs are the input's atoms
            out = np.repeat(x.ids, cout // group)
            ctx.set(out_name, _channels(out))
            ctx.bind(node, 1, 0, out_name if not self.transposed else node.input[0])
            ctx.rewrite(node, _set_group_from(node.input[0]))
            ctx.count(node, macs, out_name)
        else:
            out = np.tile(ctx.fresh(cout // group), group) if group > 1 else ctx.fresh(cout)
            ctx.set(out_name, _channels(out))
            ctx.source(node, 1, out_axis, out_name)
            local_out = cout // group if (group > 1 and self.transposed) else None
            ctx.bind(node, 1, out_axis, out_name, local=local_out)
            if mapped:
                if group > 1:
                    _tie_across_groups(ctx, x.ids, group)
                ctx.sink(node, 0)
                ctx.bind(node, 1, in_axis, node.input[0], local=cin_g if (group > 1 and not self.transposed) else None)
                ctx.count(node, macs, node.input[0], out_name)
            else:
                ctx.count(node, macs, out_name)
        if has_bias:
            ctx.bind(node, 2, 0, out_name)


@register("Conv")
class Conv(_GroupedConv):
    transposed = False


@register("ConvTranspose")
class ConvTranspose(_GroupedConv):
    transposed = True
