"""A model's weights beside a light proto: the representation every step of the data flow passes on.

Initializers with at least `LARGE` elements live outside the proto as numpy arrays
(`ModelData.weights`); the proto keeps an external-data placeholder for each, so protos stay small to
copy and onnxruntime sessions read the arrays in place (zero copy). `materialize()` puts them back.
This module sits below `graph` (load + normalize) and `runtime` (sessions), which both use it.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

LARGE = 1024  # initializers with at least this many elements are kept as numpy arrays outside the proto
PLACEHOLDER = "aofp-in-memory"


@dataclass
class ModelData:
    """A model whose large initializers are numpy arrays beside a light proto (placeholders inside)."""

    proto: onnx.ModelProto
    weights: dict[str, np.ndarray]

    def copy_proto(self) -> onnx.ModelProto:
        return copy_model(self.proto)

    def write(self, f) -> None:
        """Serialize to the binary file `f` one initializer at a time (never the whole model in memory).

        Protobuf merges concatenated messages (repeated fields append), so the model without
        initializers followed by one `ModelProto{graph{initializer: t}}` per initializer, in order,
        parses as the whole model."""
        head = self.copy_proto()
        head.graph.ClearField("initializer")
        f.write(head.SerializeToString())
        for init in self.proto.graph.initializer:
            tensor = numpy_helper.from_array(self.weights[init.name], init.name) if is_placeholder(init) else init
            chunk = onnx.ModelProto()
            chunk.graph.initializer.append(tensor)
            f.write(chunk.SerializeToString())

    def check(self) -> None:
        """onnx.checker (full check) without materializing: placeholders point at a sparse file."""
        with tempfile.TemporaryDirectory(prefix="aofp-onnx-") as tmp:
            proto = self.copy_proto()
            offset = 0
            for init in proto.graph.initializer:
                if is_placeholder(init):
                    nbytes = self.weights[init.name].nbytes
                    del init.external_data[:]
                    for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(nbytes))):
                        entry = init.external_data.add()
                        entry.key, entry.value = key, value
                    offset += nbytes
            with open(os.path.join(tmp, "weights.bin"), "wb") as f:
                f.truncate(offset)
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(proto, path)
            onnx.checker.check_model(path, full_check=True)

    def materialize(self) -> onnx.ModelProto:
        """A self-contained ModelProto (the arrays copied back into the initializers)."""
        model = copy_model(self.proto)
        for k, init in enumerate(model.graph.initializer):
            if is_placeholder(init):
                model.graph.initializer[k].CopyFrom(numpy_helper.from_array(self.weights[init.name], init.name))
        return model


def is_placeholder(init: onnx.TensorProto) -> bool:
    return init.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == PLACEHOLDER for e in init.external_data)


def placeholder(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer entry whose data is `array`, held outside the proto."""
    t = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    t.data_location = onnx.TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", PLACEHOLDER
    return t


def initializer(name: str, array: np.ndarray, weights: dict[str, np.ndarray]) -> onnx.TensorProto:
    """A placeholder (registering `array` in `weights`) for a large array, an inline initializer otherwise."""
    if array.size >= LARGE:
        weights[name] = array
        return placeholder(name, array)
    weights.pop(name, None)  # an array cut below LARGE is inline now: no stale copy beside it
    return numpy_helper.from_array(array, name)


def split_weights(model: onnx.ModelProto) -> ModelData:
    """Large initializers of `model` as numpy arrays, beside a new light proto (`model` loses its initializers).

    The light proto is a fresh message: protobuf frees a message's memory only with the message, so
    the caller dropping `model` is what returns the weights' bytes."""
    weights, inits = {}, []
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) >= LARGE and not is_placeholder(init):
            weights[init.name] = numpy_helper.to_array(init)
            inits.append(placeholder(init.name, weights[init.name]))
        else:
            kept = onnx.TensorProto()
            kept.CopyFrom(init)
            inits.append(kept)
    model.graph.ClearField("initializer")
    light = copy_model(model)
    light.graph.initializer.extend(inits)
    return ModelData(light, weights)


def as_model_data(model: "onnx.ModelProto | ModelData") -> ModelData:
    return model if isinstance(model, ModelData) else ModelData(model, {})


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
