"""Reading node attributes and constant inputs, the same way for every handler."""
from __future__ import annotations

import numpy as np
import onnx


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute `name` of `node` (ints/floats as Python lists), or `default`."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def const_input(ctx, node: onnx.NodeProto, index: int) -> np.ndarray | None:
    """Input `index` of `node` when it is a constant initializer; None when absent or computed."""
    if index >= len(node.input) or not node.input[index]:
        return None
    return ctx.init(node.input[index])


def norm_axis(axis: int, rank: int) -> int:
    """An ONNX axis in [-rank, rank) as its non-negative index."""
    axis = int(axis)
    return axis + rank if axis < 0 else axis


def has_input(node: onnx.NodeProto, index: int) -> bool:
    return index < len(node.input) and bool(node.input[index])


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Replace (or add) attribute `name` of `node`."""
    for k, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[k]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def del_attr(node: onnx.NodeProto, name: str) -> None:
    for k, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[k]
            return


def write_width(tensor: str, index: int, position: int, factor: int = 1):
    """A cut-time rewrite: element `position` of constant input `index` := kept channels of `tensor` · factor.

    Reshape targets (C·H·W), Resize `sizes` and Expand shapes hold a channel count this way."""
    def fn(node, cut):
        value = cut.input_value(node, index).copy()
        value[position] = len(cut.kept(tensor)) * factor
        cut.set_input(node, index, value)
    return fn
