"""Shape and layout ops: Shape/Reshape/Slice/Gather/Pad/... and the casts and copies around them.

Shape-like inputs (Reshape's shape, Slice's starts, Pad's pads, ...) are read as Python ints;
shape arithmetic on int64 tensors between them runs in torch like any other op. Attributes that
became inputs (Split's `split` and Squeeze/Unsqueeze `axes` at opset 13, Slice's at 10, Pad's at 11)
are read from wherever the node's opset puts them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnx.helper import tensor_dtype_to_string as onnx_type_name

from .registry import DTYPES, axis_of, ints, op, tensor_from_numpy

PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@op("Identity")
def identity(n, x):
    return x


@op("Dropout")
def dropout(n, x, ratio=None, training_mode=None):
    """Identity (mask all true) in eval(); in train() (or with training_mode true) y = x·mask/(1 − ratio)."""
    p = n.attr("ratio", 0.5) if n.opset < 12 else (0.5 if ratio is None else float(ratio.item()))
    active = n.owner.training or (training_mode is not None and bool(training_mode.item()))
    if not active or p == 0.0:
        return x, torch.ones_like(x, dtype=torch.bool)
    mask = torch.rand_like(x) >= p
    return x * mask / (1.0 - p), mask


@op("Cast")
def cast(n, x):
    to = n.attr("to")
    if to not in DTYPES:
        raise NotImplementedError(f"Cast to ONNX type {onnx_type_name(to)}")
    return x.to(DTYPES[to])


@op("CastLike")
def cast_like(n, x, like):
    return x.to(like.dtype)


@op("Shape")
def shape(n, x):
    dims = list(x.shape)[n.attr("start", 0):n.attr("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@op("Size")
def size(n, x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@op("Reshape")
def reshape(n, x, target=None):
    """0 copies the input's dim (unless allowzero), −1 is inferred."""
    dims = n.attr("shape") if n.opset < 5 else ints(target)
    if not n.attr("allowzero", 0):
        dims = [x.shape[k] if d == 0 else d for k, d in enumerate(dims)]
    return x.reshape(dims)


@op("Flatten")
def flatten(n, x):
    axis = axis_of(n.attr("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Transpose")
def transpose(n, x):
    return x.permute(n.attr("perm") or list(reversed(range(x.dim()))))


def _axes(n, axes_input, since=13):
    return n.attr("axes") if n.opset < since else ints(axes_input)


@op("Squeeze")
def squeeze(n, x, axes_input=None):
    axes = _axes(n, axes_input)
    if not axes:
        return x.squeeze()
    return x.squeeze(tuple(axis_of(a, x.dim()) for a in axes))


@op("Unsqueeze")
def unsqueeze(n, x, axes_input=None):
    """Axes index the output, whose rank is rank(x) + len(axes)."""
    axes = _axes(n, axes_input)
    rank = x.dim() + len(axes)
    for a in sorted(axis_of(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


@op("Concat")
def concat(n, *xs):
    return torch.cat(xs, axis_of(n.attr("axis"), xs[0].dim()))


@op("Split")
def split(n, x, split_input=None):
    """Sizes from `split` (attribute before opset 13, input from 13); else `num_outputs` (opset 18) or the
    number of outputs, in equal chunks of ⌈dim/n⌉ with a smaller last one."""
    axis = axis_of(n.attr("axis", 0), x.dim())
    sizes = n.attr("split") if n.opset < 13 else ints(split_input)
    if not sizes:
        count = n.attr("num_outputs", len(n.outputs))
        sizes = -(-x.shape[axis] // count)
    return tuple(torch.split(x, sizes, axis))


@op("Slice")
def slice_(n, x, starts=None, ends=None, axes=None, steps=None):
    """Negative starts/ends count from the end; then start and end clamp to [0, dim] for step > 0, to
    [0, dim − 1] and [−1, dim − 1] for step < 0 (so huge or very negative bounds mean "to the edge")."""
    if n.opset < 10:
        starts, ends, axes, steps = n.attr("starts"), n.attr("ends"), n.attr("axes"), None
    else:
        starts, ends, axes, steps = ints(starts), ints(ends), ints(axes), ints(steps)
    axes = axes if axes else list(range(len(starts)))
    steps = steps if steps else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis_of(axis, x.dim())
        dim = x.shape[axis]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            index = (slice(None),) * axis + (slice(start, end, step),)
            x = x[index]
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            x = x.index_select(axis, torch.arange(start, end, step, device=x.device))
    return x


@op("Gather")
def gather(n, x, indices):
    """out[i.., j.., k..] = x[i.., indices[j..], k..] along `axis`; negative indices count from the end."""
    axis = axis_of(n.attr("axis", 0), x.dim())
    idx = indices.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


@op("GatherElements")
def gather_elements(n, x, indices):
    axis = axis_of(n.attr("axis", 0), x.dim())
    idx = indices.long()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


@op("Expand")
def expand(n, x, target):
    """Bidirectional broadcast of x with `target` (a 1 in either keeps the other's dim)."""
    return x.expand(torch.broadcast_shapes(x.shape, tuple(ints(target))))


@op("Tile")
def tile(n, x, repeats):
    return x.repeat(ints(repeats))


@op("ConstantOfShape")
def constant_of_shape(n, target):
    value = n.attr("value")
    if value is None:
        return torch.zeros(ints(target), dtype=torch.float32, device=target.device)
    fill = tensor_from_numpy(value.reshape(-1)[:1])
    return torch.full(ints(target), fill.item(), dtype=fill.dtype, device=target.device)


@op("Range")
def range_(n, start, limit, delta):
    """start, start + delta, ... while < limit (> limit for negative delta): ⌈(limit − start)/delta⌉ values."""
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@op("Pad")
def pad(n, x, pads=None, value=None, axes=None):
    """pads = [begin of each axis…, end of each axis…]; negative pads crop. Modes constant/reflect/edge/wrap.

    Before opset 11 pads and value are attributes; from 11 inputs; from 18 an optional `axes` input."""
    if n.opset < 11:
        pads, value = n.attr("pads"), n.attr("value", 0.0)
    else:
        pads, value = ints(pads), 0 if value is None else value.item()
    axes = [axis_of(a, x.dim()) for a in (ints(axes) or range(x.dim()))]
    begin, end = [0] * x.dim(), [0] * x.dim()
    for k, a in enumerate(axes):
        begin[a], end[a] = pads[k], pads[k + len(axes)]
    first = next((d for d in range(x.dim()) if begin[d] or end[d]), x.dim())
    torch_pads = [p for d in reversed(range(first, x.dim())) for p in (begin[d], end[d])]
    if not torch_pads:
        return x
    mode = PAD_MODES[n.attr("mode", "constant")]
    if mode == "constant":
        return F.pad(x, torch_pads, value=value)
    return F.pad(x, torch_pads, mode=mode)
