"""Counting: parameters of a model; MACs live on the channel map (`ChannelMap.macs`).

params = Σ elements of floating-point initializers (weights, biases, BN statistics, per-channel constants).
MACs are per sample: Conv Cout·∏out·(Cin/g)·∏k, ConvTranspose Cin·∏in·(Cout/g)·∏k, Gemm/MatMul ∏out·K.
"""
from __future__ import annotations

import numpy as np
import onnx

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def count_params(model: onnx.ModelProto) -> int:
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in FLOAT_TYPES))
