"""Layout ops: where channels go when tensors are joined, cut, flattened, reshaped or permuted.

Index maps, both ways (channel c ↔ output positions):
* Concat on the channel axis: input k's channel c → offset_k + c. On another axis: inputs are tied.
* Split / Slice (step 1) on the channel axis: output position p ↔ input channel start + p; the sizes
  and bounds are recomputed from the kept channels at cut time.
* Flatten / flattening Reshape: channel c of [.., e1..ek, C, d1..dn] → features (j·C + c)·m + s,
  s < m = d1·…·dj, j < e1·…·ek for the dims merged with the channel axis (j > 0: a channels-last
  flatten); a shape constant holding C·m·e is rewritten to C'·m·e.
* Squeeze / Unsqueeze / Transpose: the channel axis moves; Shape/Size read no values.
"""
from __future__ import annotations

import numpy as np

from . import Channels, Handler, register
from .attrs import attr, const_input, del_attr, has_input, norm_axis, set_attr, write_width


@register("Shape", "Size")
class ShapeOf(Handler):
    """Reads only the shape: the channel count it reports adapts to the cut by itself."""

    def analyze(self, node, ctx):
        return None


@register("Concat")
class Concat(Handler):
    def analyze(self, node, ctx):
        out_shape = ctx.shape(node.output[0])
        chs = [ctx.get(n) for n in node.input]
        labelled = [ch for ch in chs if ch is not None]
        if not labelled or out_shape is None:
            return
        where = ctx.describe(node)
        axis = norm_axis(int(attr(node, "axis", 0)), len(out_shape))
        if len({ch.axis for ch in labelled}) != 1:
            for ch in labelled:
                ctx.block(ch.ids, f"{where}: inputs carry channels on different axes")
            return
        ch_axis = labelled[0].axis
        if axis != ch_axis:
            for ch in labelled[1:]:
                ctx.union(labelled[0].ids, ch.ids)
            unlabelled = [n for n, ch in zip(node.input, chs)
                          if ch is None and (ctx.shape(n) is None or ctx.shape(n)[ch_axis] > 1)]
            if unlabelled:
                ctx.block(labelled[0].ids, f"{where}: joins channels with an operand that carries none")
            ctx.set(node.output[0], Channels(ch_axis, labelled[0].ids))
            return
        parts = []
        for name, ch in zip(node.input, chs):
            if ch is None:
                shape = ctx.shape(name)
                if shape is None:
                    for c in labelled:
                        ctx.block(c.ids, f"{where}: an input's shape is unknown")
                    return
                ids = ctx.fresh(shape[axis])
                ctx.block(ids, f"{where}: '{name}' joins the channels without a channel mapping")
                ch = Channels(axis, ids)
            parts.append(ch.ids)
        ctx.set(node.output[0], Channels(axis, np.concatenate(parts)))


@register("Split")
class Split(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        if ch is None:
            return
        shape = ctx.shape(node.input[0])
        axis = norm_axis(int(attr(node, "axis", 0)), len(shape))
        outs = [o for o in node.output]
        if axis != ch.axis:
            for o in outs:
                if o:
                    ctx.set(o, ch)
            return
        sizes = [(ctx.shape(o) or (None,) * len(shape))[axis] for o in outs]
        if any(s is None for s in sizes) or sum(sizes) != len(ch.ids):
            return ctx.block(ch.ids, f"{ctx.describe(node)}: split sizes unknown")
        start = 0
        for o, size in zip(outs, sizes):
            if o:
                ctx.set(o, Channels(axis, ch.ids[start:start + size]))
            start += size
        ctx.rewrite(node, _split_sizes(node.input[0], sizes))


def _split_sizes(tensor, sizes):
    bounds = np.cumsum([0] + list(sizes))

    def fn(node, cut):
        kept = cut.kept(tensor)
        new = np.array([np.count_nonzero((kept >= a) & (kept < b)) for a, b in zip(bounds[:-1], bounds[1:])], np.int64)
        if cut.opset < 13:
            set_attr(node, "split", new.tolist())
        elif has_input(node, 1):
            cut.set_input(node, 1, new)
        else:
            del_attr(node, "num_outputs")
            cut.add_input(node, 1, new, "split")
    return fn


@register("Slice")
class Slice(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        shape = ctx.shape(node.input[0])
        if ch is None or shape is None:
            return
        where = ctx.describe(node)
        params = [const_input(ctx, node, k) for k in range(1, 5)]
        starts, ends, axes, steps = params
        if (has_input(node, 3) and axes is None) or (has_input(node, 4) and steps is None):
            return ctx.block(ch.ids, f"{where}: slice axes or steps are computed at run time")
        computed = starts is None or ends is None
        if computed:
            starts, ends = ctx.graph.value(node.input[1]), ctx.graph.value(node.input[2])
            if starts is None or ends is None:
                return ctx.block(ch.ids, f"{where}: slice bounds are computed at run time")
        rank = len(shape)
        axes = list(range(len(starts))) if axes is None else [norm_axis(int(a), rank) for a in axes]
        steps = [1] * len(starts) if steps is None else steps.tolist()
        if ch.axis not in axes:
            return ctx.set(node.output[0], ch)
        k = axes.index(ch.axis)
        if steps[k] != 1:
            return ctx.block(ch.ids, f"{where}: slices the channel axis with step {steps[k]}")
        begin, end, _ = slice(int(starts[k]), int(ends[k])).indices(shape[ch.axis])
        end = max(begin, end)
        if computed:  # torch's chunk(): bounds i·C/n from Shape(x); they follow C' if the n chunks stay equal
            width = len(ch.ids)
            size = end - begin
            if not (size and width % size == 0 and begin % size == 0 and _reads_shape_of(ctx, node, node.input[0])):
                return ctx.block(ch.ids, f"{where}: slice bounds are computed at run time")
            chunks = ch.ids.reshape(width // size, size)
            for other in chunks[1:]:
                ctx.union(chunks[0], other)
        else:
            to_end = int(ends[k]) >= shape[ch.axis]  # "to the end" stays so (INT64_MAX, not a count)
            ctx.rewrite(node, _slice_bounds(node.input[0], k, begin, end, to_end))
        ctx.set(node.output[0], Channels(ch.axis, ch.ids[begin:end]))


def _reads_shape_of(ctx, node, tensor) -> bool:
    """Whether `node`'s bounds are computed from Shape(tensor) (so they follow the cut channel count)."""
    todo = [i for i in node.input[1:3] if i]
    seen = set()
    while todo:
        name = todo.pop()
        producer = ctx.graph.producer.get(name)
        if producer is None or name in seen:
            continue
        seen.add(name)
        if producer.op_type == "Shape":
            if producer.input[0] == tensor:
                return True
            continue
        todo.extend(i for i in producer.input if i)
    return False


def _slice_bounds(tensor, k, begin, end, to_end):
    def fn(node, cut):
        kept = cut.kept(tensor)
        new_begin = int(np.count_nonzero(kept < begin))
        new_end = new_begin + int(np.count_nonzero((kept >= begin) & (kept < end)))
        for index, value in ((1, new_begin), (2, None if to_end else new_end)):
            if value is None:
                continue
            arr = cut.input_value(node, index).copy()
            arr[k] = value
            cut.set_input(node, index, arr)
    return fn


@register("Flatten")
class Flatten(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        shape = ctx.shape(node.input[0])
        if ch is None or shape is None:
            return
        axis = norm_axis(int(attr(node, "axis", 1)), len(shape))
        if axis == 0:
            return ctx.block(ch.ids, f"{ctx.describe(node)}: flattens the batch axis into the channels")
        if ch.axis < axis:
            return ctx.block(ch.ids, f"{ctx.describe(node)}: flattens the channel axis into the outer dimension")
        inner = int(np.prod(shape[ch.axis + 1:]))
        outer = int(np.prod(shape[axis:ch.axis]))
        ctx.set(node.output[0], Channels(1, np.tile(np.repeat(ch.ids, inner), outer)))


def _shape_constants(ctx, name, depth=0):
    """Constant values a computed shape is built from (stopping at Shape ops, which adapt to the cut)."""
    value = ctx.init(name)
    if value is not None:
        return [value]
    node = ctx.graph.producer.get(name)
    if node is None or node.op_type in ("Shape", "Size") or depth > 32:
        return []
    out = []
    for i in node.input:
        if i:
            out.extend(_shape_constants(ctx, i, depth + 1))
    return out


def _concat_piece(ctx, name, position):
    """(concat, k, local, value) when shape tensor `name` is a Concat of 1-D pieces and element `position`
    is element `local` of its constant input k; None otherwise."""
    concat = ctx.graph.producer.get(name)
    if concat is None or concat.op_type != "Concat":
        return None
    start = 0
    for k, piece in enumerate(concat.input):
        shape = ctx.shape(piece)
        if shape is None or len(shape) != 1:
            return None
        if start <= position < start + shape[0]:
            value = ctx.init(piece)
            return None if value is None else (concat, k, position - start, int(value[position - start]))
        start += shape[0]
    return None


@register("Reshape")
class Reshape(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        in_shape, out_shape = ctx.shape(node.input[0]), ctx.shape(node.output[0])
        if ch is None or in_shape is None:
            return
        where = ctx.describe(node)
        if out_shape is None:
            return ctx.block(ch.ids, f"{where}: output shape unknown")
        found = _merged_axis(in_shape, out_shape, ch.axis)
        if found is None:
            return ctx.block(ch.ids, f"{where}: splits or mixes the channel axis")
        o, outer, inner = found
        m = outer * inner
        target = const_input(ctx, node, 1)
        piece = _concat_piece(ctx, node.input[1], o) if target is None else None
        if piece is not None and piece[3] not in (-1, 0):  # Paddle: Concat(Shape(x)[:1], [C·m])
            concat, k, local, _ = piece
            ctx.rewrite(concat, write_width(node.input[0], k, local, m))
        elif target is None:
            literal = out_shape[o]
            if any(np.any(v == literal) for v in _shape_constants(ctx, node.input[1])) and literal > 1:
                return ctx.block(ch.ids, f"{where}: target shape is computed from a constant holding the channel count")
        elif target[o] not in (-1, 0):
            ctx.rewrite(node, write_width(node.input[0], 1, o, m))
        elif target[o] == 0 and not (o == ch.axis and m == 1):
            return ctx.block(ch.ids, f"{where}: target shape copies a dim that moves")
        ctx.set(node.output[0], Channels(o, np.tile(np.repeat(ch.ids, inner), outer)))


def _merged_axis(in_shape, out_shape, c):
    """(o, outer, inner): output axis o holds input axes a..b merged, 1 ≤ a ≤ c ≤ b (the batch axis stays
    apart), so channel i of C sits at positions (j·C + i)·inner + s, j < outer = ∏ dims a..c-1 (a
    channels-last flatten: Keras' NHWC Flatten), s < inner = ∏ dims c+1..b; or None.

    With C > 1 at most one axis fits for a given a; a = c is tried first. A single channel (C = 1) fits
    any size-1 axis after the outer dims too (the batch axis of [1, 1, H·W] as well as axis 1): it keeps
    its own axis c when that fits."""
    for a in range(c, 0, -1) if c > 0 else [0]:
        head = int(np.prod(in_shape[:a]))
        outer = int(np.prod(in_shape[a:c]))
        tails = np.cumprod([1] + list(in_shape[c + 1:]))
        found = []
        for o in range(len(out_shape)):
            if int(np.prod(out_shape[:o])) != head:
                continue
            for m in tails:
                if out_shape[o] == outer * in_shape[c] * m:
                    found.append((o, outer, int(m)))
                    break
        if found:
            return next((f for f in found if f[0] == c), found[0])
    return None


def _axes(node, ctx):
    axes = attr(node, "axes")
    if axes is None and has_input(node, 1):
        value = const_input(ctx, node, 1)
        return None if value is None else value.tolist()
    return axes


@register("Squeeze")
class Squeeze(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        shape = ctx.shape(node.input[0])
        if ch is None or shape is None:
            return
        axes = _axes(node, ctx)
        if axes is None and not has_input(node, 1):
            if shape[0] == 1:  # the analysis batch of 1 would be squeezed too, a larger one would not
                return ctx.block(ch.ids, f"{ctx.describe(node)}: squeezes every size-1 dim, the batch's too")
            axes = [a for a, d in enumerate(shape) if d == 1]
        if axes is None:
            return ctx.block(ch.ids, f"{ctx.describe(node)}: axes are computed at run time")
        axes = [norm_axis(a, len(shape)) for a in axes]
        if ch.axis in axes:
            return ctx.block(ch.ids, f"{ctx.describe(node)}: squeezes the channel axis")
        ctx.set(node.output[0], Channels(ch.axis - sum(a < ch.axis for a in axes), ch.ids))


@register("Unsqueeze")
class Unsqueeze(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        out_shape = ctx.shape(node.output[0])
        axes = _axes(node, ctx)
        if ch is None or out_shape is None:
            return
        if axes is None:
            return ctx.block(ch.ids, f"{ctx.describe(node)}: axes are computed at run time")
        inserted = {norm_axis(a, len(out_shape)) for a in axes}
        kept_positions = [p for p in range(len(out_shape)) if p not in inserted]
        ctx.set(node.output[0], Channels(kept_positions[ch.axis], ch.ids))


@register("Transpose")
class Transpose(Handler):
    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        shape = ctx.shape(node.input[0])
        if ch is None or shape is None:
            return
        perm = attr(node, "perm") or list(range(len(shape)))[::-1]
        ctx.set(node.output[0], Channels(list(perm).index(ch.axis), ch.ids))


@register("Tile", "Expand")
class Broadcasted(Handler):
    """Tile/Expand: channels pass when the channel dim is unchanged (repeats 1 / target 1 or C)."""

    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        in_shape, out_shape = ctx.shape(node.input[0]), ctx.shape(node.output[0])
        if ch is None or in_shape is None:
            return
        where = ctx.describe(node)
        if out_shape is None or len(out_shape) != len(in_shape) or out_shape[ch.axis] != in_shape[ch.axis]:
            return ctx.block(ch.ids, f"{where}: changes the channel axis")
        value = const_input(ctx, node, 1)
        if value is None:
            return ctx.block(ch.ids, f"{where}: its shape/repeats are computed at run time")
        if node.op_type == "Expand":
            local = ch.axis - (len(out_shape) - len(value))
            if local >= 0 and value[local] == in_shape[ch.axis] and in_shape[ch.axis] > 1:
                ctx.rewrite(node, write_width(node.input[0], 1, local))
        ctx.set(node.output[0], Channels(ch.axis, ch.ids))
