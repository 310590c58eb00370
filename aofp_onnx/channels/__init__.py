"""Channel handlers: one small handler per op type, in a registry that refuses duplicates.

A handler reads a node and tells the analysis context (`Context` below; `aofp_onnx.groups.Analysis`
implements it) how the node's channels
relate: which output channels are new (a *source*: Conv filters, Gemm columns), which are the same
channels as an input (passthrough: activations, BN, pooling), which are tied together (residual Add,
SE gate Mul), how ranges map (Concat, Split, Slice, Flatten), which initializers are per-channel and
must be sliced when channels go, and where a channel is consumed (a *sink*: the mask point of the
verification and the damage point of AOFP). What a handler cannot vouch for it blocks, with a reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import onnx

_REGISTRY: dict[str, "Handler"] = {}


@dataclass
class Channels:
    """Channel layout of one tensor: the channel axis and the atom id at each index along it."""

    axis: int
    ids: np.ndarray


class Context(Protocol):
    """What a handler may read and record; the analysis (`aofp_onnx.groups.Analysis`) provides it, so
    this package needs nothing from the modules above it."""

    graph: object  # the `aofp_onnx.graph.Graph` being analysed (producers, consumers, shapes, opset)

    def fresh(self, n: int) -> np.ndarray: ...  # n new channel atoms
    def union(self, a: np.ndarray, b: np.ndarray) -> None: ...  # tie a[i] with b[i]
    def block(self, ids: np.ndarray, reason: str) -> None: ...
    def get(self, tensor: str) -> Channels | None: ...
    def set(self, tensor: str, ch: Channels) -> None: ...
    def need(self, tensor: str, node: onnx.NodeProto) -> Channels | None: ...
    def shape(self, tensor: str) -> tuple[int, ...] | None: ...
    def init(self, tensor: str) -> np.ndarray | None: ...
    def bind(self, node: onnx.NodeProto, input_index: int, axis: int, tensor: str,
             local: int | None = None) -> None: ...
    def rewrite(self, node: onnx.NodeProto, fn: Callable) -> None: ...
    def sink(self, node: onnx.NodeProto, input_index: int) -> None: ...
    def source(self, node: onnx.NodeProto, input_index: int, axis: int, tensor: str) -> None: ...
    def count(self, node: onnx.NodeProto, macs: int, *scale_with: str) -> None: ...
    def describe(self, node: onnx.NodeProto) -> str: ...


class Handler:
    """Base: `analyze(node, ctx)` records the node's channel relations in the analysis context."""

    ops: tuple[str, ...] = ()

    def analyze(self, node: onnx.NodeProto, ctx: Context) -> None:
        raise NotImplementedError


class Passthrough(Handler):
    """Output 0 carries exactly the channels of input 0 (elementwise activations, casts, ...)."""

    def analyze(self, node, ctx):
        ch = ctx.need(node.input[0], node)
        if ch is not None:
            ctx.set(node.output[0], ch)


def register(*ops: str):
    """Class decorator: register one handler instance for `ops`; registering an op twice is an error."""

    def wrap(cls):
        for k, op in enumerate(ops):  # check all first: a refused registration registers nothing
            if op in _REGISTRY:
                raise ValueError(f"op {op} already has a channel handler ({type(_REGISTRY[op]).__name__})")
            if op in ops[:k]:
                raise ValueError(f"op {op} is listed twice in one registration ({cls.__name__})")
        handler = cls()
        handler.ops = ops
        for op in ops:
            _REGISTRY[op] = handler
        return cls

    return wrap


def handler_for(op_type: str, domain: str = "") -> Handler | None:
    if domain not in ("", "ai.onnx"):
        return None
    return _REGISTRY.get(op_type)


def supported_ops() -> list[str]:
    return sorted(_REGISTRY)


from . import conv, dense, elementwise, layout, norm, pool  # noqa: E402,F401  (registers the handlers)
