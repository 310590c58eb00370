"""Small graphs written the way real exporters write them (onnx.helper, seeded weights).

* `paddle_cnn`: Paddle2ONNX — weights as Constant nodes, conv bias as `Reshape(constant) → Add`,
  unfused BatchNormalization, x·HardSigmoid(x), an SE block, the classifier's Reshape target
  `Concat(Shape(x)[:1], [C])` → MatMul + Add.
* `keras_cnn`: keras2onnx/tf2onnx — NHWC input, Transposes around every conv and pool, a BN folded to
  Mul/Add on the channels-last axis, Keras `Flatten` (NHWC order) or `GlobalAveragePooling2D`
  (ReduceMean over H, W) and MatMul + Add dense layers.
* `opset9_cnn`: an opset-9 export (Upsample, unfused BN, Flatten → Gemm).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Net:
    """Accumulates nodes and initializers; `const` stores weights as initializers or Constant nodes."""

    def __init__(self, seed: int = 0, constant_nodes: bool = False):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.constant_nodes = constant_nodes
        self.k = 0

    def name(self, op: str) -> str:
        self.k += 1
        return f"{op.lower()}_{self.k}"

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        name = self.name(hint)
        tensor = numpy_helper.from_array(np.asarray(value), name)
        if self.constant_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const", value=tensor))
        else:
            self.inits.append(tensor)
        return name

    def op(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str:
        name = self.name(op)
        outs = [f"{name}_out{k}" if k else f"{name}_out" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0]

    def weight(self, *shape) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) or 1
        return (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def model(self, inputs, outputs, opset: int, ir_version: int = 8) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "export", inputs, outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="exportstyles")
        model.ir_version = ir_version
        onnx.checker.check_model(model)
        return model


def paddle_cnn(seed: int = 0, width: int = 8) -> onnx.ModelProto:
    n = Net(seed, constant_nodes=True)
    x = "x"
    for k, (cin, cout) in enumerate([(3, width), (width, 2 * width), (2 * width, 2 * width)]):
        x = n.op("Conv", [x, n.const(n.weight(cout, cin, 3, 3), "w")], pads=[1, 1, 1, 1],
                 strides=[2, 2] if k else [1, 1])
        bias = n.op("Reshape", [n.const(n.weight(cout) + 0.1, "b"), n.const(np.array([1, cout, 1, 1], np.int64))])
        x = n.op("Add", [x, bias])
        x = n.op("BatchNormalization", [x, n.const(1 + 0.1 * n.weight(cout), "s"), n.const(0.1 * n.weight(cout)),
                                        n.const(0.1 * n.weight(cout)), n.const(np.abs(n.weight(cout)) + 0.5)])
        # Paddle's hard_swish at opset 11: x · HardSigmoid(x)
        x = n.op("Mul", [x, n.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5)]) if k != 1 else n.op("Relu", [x])
        if k == 1:  # SE block: pool → 1×1 conv (+ reshaped bias) → Relu → 1×1 conv → HardSigmoid → Mul
            s = n.op("GlobalAveragePool", [x])
            s = n.op("Conv", [s, n.const(n.weight(cout // 2, cout, 1, 1), "w")])
            s = n.op("Add", [s, n.op("Reshape", [n.const(n.weight(cout // 2), "b"),
                                                  n.const(np.array([1, cout // 2, 1, 1], np.int64))])])
            s = n.op("Relu", [s])
            s = n.op("Conv", [s, n.const(n.weight(cout, cout // 2, 1, 1), "w")])
            s = n.op("HardSigmoid", [s], alpha=0.2, beta=0.5)
            x = n.op("Mul", [x, s])
    c = 2 * width
    x = n.op("GlobalAveragePool", [x])
    batch = n.op("Slice", [n.op("Shape", [x]), n.const(np.array([0], np.int64)), n.const(np.array([1], np.int64)),
                           n.const(np.array([0], np.int64))])
    target = n.op("Concat", [batch, n.op("Cast", [n.const(np.array([c], np.int32))], to=TensorProto.INT64)], axis=0)
    x = n.op("Reshape", [x, target])
    x = n.op("Add", [n.op("MatMul", [x, n.const(n.weight(c, 10), "fc")]), n.const(n.weight(10), "fcb")])
    y = n.op("Softmax", [x], axis=1)
    model = n.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                    [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 10])], opset=11, ir_version=6)
    model.metadata_props.add(key="exporter", value="paddle2onnx-style")
    return model


def _nhwc_to_nchw(n: Net, x: str) -> str:
    return n.op("Transpose", [x], perm=[0, 3, 1, 2])


def _nchw_to_nhwc(n: Net, x: str) -> str:
    return n.op("Transpose", [x], perm=[0, 2, 3, 1])


def keras_cnn(seed: int = 0, width: int = 8, head: str = "flatten", size: int = 16) -> onnx.ModelProto:
    """head: "flatten" (Keras Flatten of NHWC → Reshape [-1, H·W·C]) or "gap" (ReduceMean over H, W)."""
    n = Net(seed)
    x = "input_1"
    cin = 3
    for k, cout in enumerate([width, 2 * width, 2 * width]):
        x = _nhwc_to_nchw(n, x)
        x = n.op("Conv", [x, n.const(n.weight(cout, cin, 3, 3), "w"), n.const(0.1 * n.weight(cout), "b")],
                 pads=[1, 1, 1, 1])
        x = _nchw_to_nhwc(n, x)
        x = n.op("Relu", [x])
        if k == 1:  # a Keras BatchNormalization tf2onnx wrote as channels-last Mul + Add
            x = n.op("Add", [n.op("Mul", [x, n.const(1 + 0.1 * n.weight(cout), "bn_s")]),
                             n.const(0.1 * n.weight(cout))])
        x = _nchw_to_nhwc(n, n.op("MaxPool", [_nhwc_to_nchw(n, x)], kernel_shape=[2, 2], strides=[2, 2]))
        cin = cout
    hw = (size // 8) ** 2
    if head == "flatten":
        x = n.op("Reshape", [x, n.const(np.array([-1, hw * cin], np.int64))])
        features = hw * cin
    else:
        x = n.op("ReduceMean", [x], axes=[1, 2], keepdims=0)
        features = cin
    x = n.op("Relu", [n.op("Add", [n.op("MatMul", [x, n.const(n.weight(features, 32), "dense")]),
                                   n.const(0.1 * n.weight(32))])])
    x = n.op("Add", [n.op("MatMul", [x, n.const(n.weight(32, 10), "dense")]), n.const(0.1 * n.weight(10))])
    y = n.op("Softmax", [x], axis=-1)
    return n.model([helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__0", size, size, 3])],
                   [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["unk__0", 10])], opset=13)


def opset9_cnn(seed: int = 0, width: int = 8) -> onnx.ModelProto:
    n = Net(seed)
    x = n.op("Conv", ["x", n.const(n.weight(width, 3, 3, 3), "w"), n.const(0.1 * n.weight(width))], pads=[1, 1, 1, 1])
    x = n.op("BatchNormalization", [x, n.const(1 + 0.1 * n.weight(width)), n.const(0.1 * n.weight(width)),
                                    n.const(0.1 * n.weight(width)), n.const(np.abs(n.weight(width)) + 0.5)])
    x = n.op("MaxPool", [n.op("Relu", [x])], kernel_shape=[2, 2], strides=[2, 2])
    x = n.op("Relu", [n.op("Conv", [x, n.const(n.weight(2 * width, width, 3, 3), "w")], pads=[1, 1, 1, 1])])
    x = n.op("Upsample", [x, n.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    x = n.op("Relu", [n.op("Conv", [x, n.const(n.weight(width, 2 * width, 3, 3), "w")], pads=[1, 1, 1, 1, ],
                           strides=[2, 2])])
    x = n.op("Flatten", [x], axis=1)
    y = n.op("Gemm", [x, n.const(n.weight(10, width * 64), "fc"), n.const(n.weight(10))], transB=1)
    return n.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                   [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 10])], opset=9, ir_version=4)
