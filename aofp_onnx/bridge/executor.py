"""`OnnxModule`: an ONNX graph run node by node in torch, its initializers as named parameters.

Construction requires: a topologically sorted graph whose nodes all have a handler (default ONNX
domain). It ensures: every float initializer (float16/32/64) is an `nn.Parameter`, except the
running mean/var inputs of BatchNormalization, which are float buffers; other initializers and the
values of `Constant` nodes are constant buffers. float16 is computed in float32 (float16 weights,
constants, inputs and Casts to float16 all become float32: master weights, since Adam's small steps
and its eps vanish in float16); the write-back casts each value to its initializer's own type.
`forward` walks the nodes in graph order with an environment name → tensor; a tensor is dropped from
it after its last use. A failing handler raises `NodeError` naming the node.

Inputs a handler reads as Python numbers (Clip bounds, Resize scales, Pad pads, shapes) get no
gradient, so training leaves those initializers as they are.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import InputError
from ..modeldata import ModelData, as_model_data, default_opset, is_placeholder
from . import ops_math, ops_nn, ops_resize, ops_tensor  # noqa: F401  (register the handlers)
from .registry import HANDLERS, Node, decode_attrs, tensor_from_numpy

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
BN_STATS = (3, 4)  # BatchNormalization inputs: X, scale, B, input_mean, input_var
BN_MODES = ("frozen", "update")


class UnsupportedOpError(InputError):
    """A node has no bridge handler (raised at construction)."""


class NodeError(RuntimeError):
    """A handler failed; the message names the node and the cause."""


class OnnxModule(torch.nn.Module):
    """Runs an ONNX graph node by node in torch.

    bn="frozen": BatchNormalization always uses its running statistics (inference formula), also in
    train(); its scale and bias train. bn="update": in train() BN normalizes with batch statistics
    and updates running = running·momentum + batch·(1 − momentum) (ONNX semantics, population
    variance); in eval() it uses the running statistics.
    """

    def __init__(self, model: "onnx.ModelProto | ModelData", *, bn: str = "frozen"):
        super().__init__()
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
        self.bn = bn
        data = as_model_data(model)
        self.params = torch.nn.ParameterDict()
        self.stats = torch.nn.Module()  # BN running mean/var (float buffers, written back)
        self.consts = torch.nn.Module()  # non-float initializers and Constant-node values
        self._keys: dict[str, tuple[str, str]] = {}  # ONNX name -> (holder, attribute key)
        self._used: set[str] = set()
        self._load_initializers(data)
        self._trainable = [i.name for i in data.proto.graph.initializer if self._keys[i.name][0] == "params"]
        self.input_names = [i.name for i in data.proto.graph.input if i.name not in self._keys]
        self.output_names = [o.name for o in data.proto.graph.output]
        self._nodes = self._load_nodes(data.proto)
        self._drop = _last_uses(self._nodes, set(self.output_names))

    def _load_initializers(self, data: ModelData) -> None:
        graph = data.proto.graph
        stats = {n.input[k] for n in graph.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
                 for k in BN_STATS if len(n.input) > k}
        for init in graph.initializer:
            value = _wide(tensor_from_numpy(data.weights[init.name] if is_placeholder(init)
                                            else numpy_helper.to_array(init)))
            if init.data_type not in FLOAT_TYPES:
                self._add("consts", init.name, value)
            elif init.name in stats:
                self._add("stats", init.name, value)
            else:
                self._add("params", init.name, torch.nn.Parameter(value))

    def _load_nodes(self, model: onnx.ModelProto) -> list[Node]:
        """The nodes to run, each checked to have a handler and its inputs defined before it; Constant
        nodes become constant buffers here."""
        opset = default_opset(model)
        nodes, known = [], set(self._keys) | set(self.input_names)
        for k, proto in enumerate(model.graph.node):
            name = proto.name or f"#{k}"
            default_domain = proto.domain in ("", "ai.onnx")
            if not default_domain or proto.op_type not in HANDLERS and proto.op_type != "Constant":
                where = proto.op_type if default_domain else f"{proto.domain}:{proto.op_type}"
                raise UnsupportedOpError(f"node '{name}' ({where}): the PyTorch bridge has no handler for op "
                                         f"type {where}")
            missing = [i for i in proto.input if i and i not in known]
            if missing:
                raise InputError(f"node '{name}' ({proto.op_type}): input {missing[0]!r} is not produced before "
                                 "it (the graph is not topologically sorted)")
            attrs = decode_attrs(proto)
            if proto.op_type == "Cast" and attrs.get("to") == onnx.TensorProto.FLOAT16:
                attrs["to"] = onnx.TensorProto.FLOAT
            if isinstance(attrs.get("value"), np.ndarray) and attrs["value"].dtype == np.float16:  # ConstantOfShape
                attrs["value"] = attrs["value"].astype(np.float32)
            known.update(o for o in proto.output if o)
            if proto.op_type == "Constant":
                self._add("consts", proto.output[0], _wide(_constant(name, attrs)))
            else:
                nodes.append(Node(name, proto.op_type, list(proto.input), list(proto.output), attrs, opset,
                                  HANDLERS[proto.op_type], self))
        missing = [o for o in self.output_names if o not in known]
        if missing:
            raise InputError(f"graph output {missing[0]!r} is produced by no node")
        return nodes

    def _add(self, holder: str, name: str, value: torch.Tensor) -> None:
        """Register `value` under a valid attribute key derived from the ONNX name `name`."""
        key = re.sub(r"\W", "_", name) or "_"
        if key[0].isdigit():
            key = "_" + key
        base, k = key, 1
        while key in self._used:
            k += 1
            key = f"{base}_{k}"
        self._used.add(key)
        if holder == "params":
            self.params[key] = value
        else:
            getattr(self, holder).register_buffer(key, value)
        self._keys[name] = (holder, key)

    def initializer_names(self) -> list[str]:
        """The ONNX initializer names that are trainable parameters, in initializer order."""
        return list(self._trainable)

    def parameter_for(self, initializer_name: str) -> torch.Tensor:
        """The parameter (or buffer, for BN statistics and non-float initializers) of an initializer."""
        try:
            holder, key = self._keys[initializer_name]
        except KeyError:
            raise KeyError(f"{initializer_name!r} is not an initializer or constant of this model") from None
        return self.params[key] if holder == "params" else getattr(getattr(self, holder), key)

    def tensors(self) -> dict[str, torch.Tensor]:
        """ONNX name → current tensor for every initializer and Constant-node value."""
        return {name: self.parameter_for(name) for name in self._keys}

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, ...]:
        """Graph outputs (always a tuple) for the graph inputs given by position or by name."""
        if len(args) > len(self.input_names):
            raise TypeError(f"{len(args)} positional inputs given, the graph has {len(self.input_names)}")
        feeds = dict(zip(self.input_names, args))
        for name, value in kwargs.items():
            if name not in self.input_names or name in feeds:
                raise TypeError(f"unexpected or repeated input {name!r}; inputs: {self.input_names}")
            feeds[name] = value
        absent = [n for n in self.input_names if n not in feeds]
        if absent:
            raise TypeError(f"missing graph input(s) {absent}")
        env = self.tensors()
        device = next(iter(env.values())).device if env else None
        env.update({n: _wide(v if isinstance(v, torch.Tensor) else torch.as_tensor(v, device=device))
                    for n, v in feeds.items()})
        for node, drop in zip(self._nodes, self._drop):
            try:
                out = node.fn(node, *[env[i] if i else None for i in node.inputs])
                out = out if isinstance(out, tuple) else (out,)
                wanted = [k for k, o in enumerate(node.outputs) if o]
                if wanted and wanted[-1] >= len(out):
                    raise NotImplementedError(f"output {wanted[-1]} ({node.outputs[wanted[-1]]!r}) is not computed "
                                              f"by the bridge (it gives {len(out)} output(s))")
            except NodeError:
                raise
            except Exception as exc:
                raise NodeError(f"{node.describe()}: {type(exc).__name__}: {exc}") from exc
            for k in wanted:
                env[node.outputs[k]] = out[k]
            for name in drop:
                env.pop(name, None)
        return tuple(env[o] for o in self.output_names)


def to_torch_inputs(feeds: dict[str, np.ndarray], device: "torch.device | str | None" = None
                    ) -> dict[str, torch.Tensor]:
    """Numpy feeds (name → array) as torch tensors on `device`, for `module(**feeds)`."""
    return {name: torch.as_tensor(np.asarray(value), device=device) for name, value in feeds.items()}


def _constant(name: str, attrs: dict) -> torch.Tensor:
    """The value of a Constant node (`value` tensor or one of the value_* attributes)."""
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            value = attrs[key]
            dtype = np.float32 if "float" in key else np.int64 if "int" in key else None
            return tensor_from_numpy(np.asarray(value, dtype))
    raise UnsupportedOpError(f"node '{name}' (Constant): only tensor, float and int constants are supported, "
                             f"got {sorted(attrs)}")


def _wide(value: torch.Tensor) -> torch.Tensor:
    """float16 as float32 (see the module docstring); other tensors as they are."""
    return value.float() if value.dtype == torch.float16 else value


def _last_uses(nodes: list[Node], keep: set[str]) -> list[list[str]]:
    """Per node, the tensors that no later node reads (dropped from the environment after it runs)."""
    last: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for name in node.inputs:
            if name:
                last[name] = k
    drops: list[list[str]] = [[] for _ in nodes]
    for name, k in last.items():
        if name not in keep:
            drops[k].append(name)
    return drops
