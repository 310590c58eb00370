"""Write a module's trained values back into the ONNX graph it was built from.

Requires: `module` was built from a model with the same initializers (names, shapes) as `model`.
Ensures: the result's proto is `model`'s proto with only initializer values replaced, each cast back to
its original dtype: nodes, names, value_info, opsets, metadata, initializer order, names, dtypes and
storage (inline or an external placeholder) are unchanged, and an initializer whose value did not
change keeps its original bytes. `model` is not modified. Constant-node values are not written
back (fold them into initializers first, `aofp_onnx.graph.fold_constants`, to train them).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..modeldata import ModelData, as_model_data, is_placeholder
from .executor import OnnxModule

DATA_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data", "raw_data")


def write_back(module: OnnxModule, model: "onnx.ModelProto | ModelData") -> ModelData:
    """A new ModelData: `model` with its initializer values taken from `module`'s parameters and buffers."""
    data = as_model_data(model)
    proto = data.copy_proto()
    weights = dict(data.weights)
    tensors = module.tensors()
    for init in proto.graph.initializer:
        if init.name not in tensors:
            raise ValueError(f"initializer {init.name!r} is not in the module (built from another model?)")
        old = data.weights[init.name] if is_placeholder(init) else numpy_helper.to_array(init)
        new = tensors[init.name].detach().cpu().numpy().astype(helper.tensor_dtype_to_np_dtype(init.data_type))
        if new.shape != old.shape:
            raise ValueError(f"initializer {init.name!r}: the module holds shape {list(new.shape)}, the model "
                             f"{list(old.shape)} (built from another model?)")
        if new.tobytes() == old.tobytes():
            continue
        if is_placeholder(init):
            weights[init.name] = new
        else:
            for field in DATA_FIELDS:
                init.ClearField(field)
            init.raw_data = np.ascontiguousarray(new).astype(new.dtype.newbyteorder("<"), copy=False).tobytes()
    return ModelData(proto, weights)
