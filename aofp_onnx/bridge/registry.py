"""Op handlers for the bridge: one small function per ONNX op type, in a registry that refuses duplicates.

A handler is `fn(node, *inputs) -> Tensor | tuple[Tensor, ...]`: `node` is the `Node` being run (its
attributes, the model's opset, the owning module), `inputs` the node's input tensors in order, `None`
for an omitted optional input. Attribute defaults are those of the ONNX spec for the node's opset.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from onnx import helper, numpy_helper

HANDLERS: dict[str, Callable] = {}

# ONNX TensorProto data types → torch dtypes (Cast's `to`, ConstantOfShape's value, ...)
DTYPES = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16, 6: torch.int32,
    7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 12: torch.uint32, 13: torch.uint64,
    16: torch.bfloat16,
}


def op(*op_types: str):
    """Decorator: register `fn` as the handler of `op_types`; registering an op type twice is an error."""

    def wrap(fn):
        for k, op_type in enumerate(op_types):  # check all first: a refused registration registers nothing
            if op_type in HANDLERS or op_type in op_types[:k]:
                raise ValueError(f"op {op_type} already has a bridge handler")
        for op_type in op_types:
            HANDLERS[op_type] = fn
        return fn

    return wrap


def supported_ops() -> list[str]:
    return sorted(HANDLERS)


@dataclass(eq=False)
class Node:
    """One ONNX node as the executor runs it: decoded attributes and the handler to call."""

    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    fn: Callable
    owner: Any = field(repr=False)  # the OnnxModule (its training flag and BN mode)

    def attr(self, key: str, default=None):
        return self.attrs.get(key, default)

    def describe(self) -> str:
        return f"node '{self.name}' ({self.op_type})"


def decode_attrs(node) -> dict[str, Any]:
    """Attribute values as Python objects: strings decoded, tensors as numpy arrays."""
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif a.type == a.TENSOR:
            value = numpy_helper.to_array(value)
        out[a.name] = value
    return out


def ints(t: torch.Tensor | None) -> list[int] | None:
    """A shape-like input (Reshape shape, Slice starts, Pad pads, ...) as Python ints."""
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def floats(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else [float(v) for v in t.reshape(-1).tolist()]


def axis_of(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def tensor_from_numpy(array: np.ndarray) -> torch.Tensor:
    """A torch tensor owning a copy of `array` (so training never writes into the model's arrays)."""
    return torch.from_numpy(np.array(array, copy=True, order="C"))
