"""The PyTorch bridge: OnnxModule matches onnxruntime, write_back changes initializer values and nothing else.

Numbers checked: every zoo model and PP-OCRv4 det against onnxruntime (max |diff| / max |reference|
≤ 1e-4, as loaded and after fold_constants + split_weights); a round trip without training is
byte-identical and runs bitwise-equal in onnxruntime; a changed parameter changes exactly one
initializer; gradients reach every Conv weight; BN running statistics follow the mode; and one
small graph per op semantic (opset variants, padding modes, coordinate modes) against onnxruntime.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

import zoo  # noqa: E402
from aofp_onnx.bridge import NodeError, OnnxModule, UnsupportedOpError, to_torch_inputs, write_back  # noqa: E402
from aofp_onnx.graph import fold_constants  # noqa: E402
from aofp_onnx.modeldata import LARGE, ModelData, is_placeholder, split_weights  # noqa: E402

TOL = 1e-4
IR_VERSION = 8  # onnxruntime reads IR ≤ 13; onnx.helper would write a newer one
BATCH = 2


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _folded(model: onnx.ModelProto) -> ModelData:
    return split_weights(fold_constants(_copy(model)))


def _proto(model) -> onnx.ModelProto:
    return model.materialize() if isinstance(model, ModelData) else model


def _ort(model, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _bridge(model, feeds: dict, **kwargs) -> list[np.ndarray]:
    module = OnnxModule(model, **kwargs).eval()
    with torch.no_grad():
        return [t.numpy() for t in module(**to_torch_inputs(feeds))]


def _rel(expected: np.ndarray, got: np.ndarray) -> float:
    """max |expected − got| / max |expected| (shapes and dtypes must agree; a zero reference is refused)."""
    assert expected.shape == got.shape and expected.dtype == got.dtype, (expected.shape, got.shape, got.dtype)
    if expected.dtype == bool or np.issubdtype(expected.dtype, np.integer):
        return float(np.any(expected != got))
    scale = float(np.max(np.abs(expected)))
    assert scale > 0, "an all-zero reference says nothing"
    return float(np.max(np.abs(expected.astype(np.float64) - got))) / scale


def _init_bytes(model) -> dict[str, bytes]:
    """Each initializer's value as bytes (placeholders read from the weights)."""
    data = model if isinstance(model, ModelData) else ModelData(model, {})
    return {i.name: (data.weights[i.name] if is_placeholder(i) else numpy_helper.to_array(i)).tobytes()
            for i in data.proto.graph.initializer}


@pytest.fixture(scope="module")
def zoo_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bridge_zoo")
    cache = {}

    def get(name: str):
        if name not in cache:
            zm = zoo.build(name, directory)
            cache[name] = (zm, onnx.load(str(zm.path)))
        return cache[name]

    return get


# --- 1, 2: outputs match onnxruntime


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_matches_onnxruntime(zoo_model, name):
    zm, model = zoo_model(name)
    feeds = zm.feeds(batch=BATCH, seed=3)
    expected = _ort(model, feeds)
    for source in (model, _folded(model)):
        got = _bridge(source, feeds)
        assert len(got) == len(expected)
        worst = max(_rel(e, g) for e, g in zip(expected, got))
        assert worst <= TOL, f"{name}: {worst:.2e}"


def _document_image(size: int) -> np.ndarray:
    """A synthetic text page (dark strokes on light paper), normalized as PP-OCR's det preprocessing does."""
    rng = np.random.default_rng(0)
    page = np.full((size, size, 3), 235.0)
    for _ in range(size // 25):
        y, x = rng.integers(8, size - 30, 2)
        h, w = rng.integers(6, 20), rng.integers(40, 120)
        for k in range(x, min(x + w, size - 2), 7):
            page[y:y + h, k:k + 4] = 20.0
    page += rng.normal(0, 8, page.shape)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((page / 255 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


def test_ppocr_det_matches_onnxruntime(ppocr_det):
    model = onnx.load(str(ppocr_det))
    feeds = {"x": _document_image(320)}
    expected = _ort(model, feeds)
    assert float(expected[0].max()) > 0.5  # text found: the comparison covers the whole sigmoid range
    for source in (model, _folded(model)):
        worst = _rel(expected[0], _bridge(source, feeds)[0])
        assert worst <= TOL, f"{worst:.2e}"
    folded = _folded(model)
    written = write_back(OnnxModule(folded), folded)  # no training: the same model, bit for bit
    assert written.proto.SerializeToString() == folded.proto.SerializeToString()
    assert np.array_equal(_ort(written, feeds)[0], _ort(folded, feeds)[0])


# --- 3, 4: write-back


def _with_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    model = _copy(model)
    helper.set_model_props(model, {"author": "bridge test", "license": "MIT"})
    model.doc_string = "trained weights go back here"
    model.producer_name, model.producer_version = "bridge-test", "0.0"
    return model


@pytest.mark.parametrize("name", ["resnet_basic_bn", "paddle_det_op11", "yolov8_neck", "densenet_bn"])
def test_round_trip_is_byte_identical(zoo_model, name):
    zm, model = zoo_model(name)
    model = _with_metadata(model)
    feeds = zm.feeds(batch=BATCH, seed=5)
    expected = _ort(model, feeds)
    for source in (model, _folded(model)):
        before = source.SerializeToString() if isinstance(source, onnx.ModelProto) else None
        written = write_back(OnnxModule(source), source)
        original = source if isinstance(source, ModelData) else ModelData(source, {})
        assert written.proto.SerializeToString() == original.proto.SerializeToString()
        assert written.weights.keys() == original.weights.keys()
        assert all(np.array_equal(written.weights[k], v) for k, v in original.weights.items())
        assert written.materialize().metadata_props == model.metadata_props
        for e, g in zip(expected, _ort(written, feeds)):
            assert np.array_equal(e, g)
        if before is not None:
            assert source.SerializeToString() == before  # the input is not modified


@pytest.mark.parametrize("folded", [False, True], ids=["proto", "model_data"])
def test_write_back_after_a_change(zoo_model, folded):
    zm, model = zoo_model("resnet_basic")
    source = _folded(model) if folded else model
    module = OnnxModule(source)
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and len(n.input) == 3 and sizes[n.input[1]] >= LARGE)
    bias, weight = conv.input[2], conv.input[1]
    with torch.no_grad():
        module.parameter_for(bias).add_(1.0)
        module.parameter_for(weight).mul_(-0.5)  # ≥ LARGE elements: a placeholder in the ModelData
    written = write_back(module, source)
    feeds = zm.feeds(batch=BATCH, seed=9)
    with torch.no_grad():
        ours = [t.numpy() for t in module.eval()(**to_torch_inputs(feeds))]
    for e, g in zip(ours, _ort(written, feeds)):
        assert _rel(e, g) <= 1e-5
    old, new = _init_bytes(source), _init_bytes(written)
    assert {k for k in old if old[k] != new[k]} == {bias, weight}
    assert np.array_equal(np.frombuffer(new[bias], np.float32), np.frombuffer(old[bias], np.float32) + 1.0)
    assert np.array_equal(np.frombuffer(new[weight], np.float32), np.frombuffer(old[weight], np.float32) * -0.5)
    stripped_old, stripped_new = _copy(_proto(source)), _proto(written)
    for m in (stripped_old, stripped_new):
        m.graph.ClearField("initializer")
    assert stripped_old.SerializeToString() == stripped_new.SerializeToString()


def test_write_back_keeps_dtypes():
    """float16 initializers train in float32 (master weights), float64 in its own dtype; both are written
    back in their own dtype."""
    w16 = np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3)
    w64 = np.arange(3, dtype=np.float64)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
         helper.make_node("Mul", ["x16", "w:16/a.b"], ["y16"], name="mul16"),
         helper.make_node("Cast", ["y16"], ["y64"], to=TensorProto.DOUBLE),
         helper.make_node("Add", ["y64", "w:64"], ["y"])],
        "dtypes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 3])],
        [numpy_helper.from_array(w16, "w:16/a.b"), numpy_helper.from_array(w64, "w:64")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    module = OnnxModule(model)
    assert module.initializer_names() == ["w:16/a.b", "w:64"]
    assert module.parameter_for("w:16/a.b").dtype == torch.float32
    with torch.no_grad():
        module.parameter_for("w:16/a.b").mul_(2)
        module.parameter_for("w:64").add_(0.25)
    written = write_back(module, model).proto.graph.initializer
    assert [i.data_type for i in written] == [TensorProto.FLOAT16, TensorProto.DOUBLE]
    assert np.array_equal(numpy_helper.to_array(written[0]), w16 * 2)
    assert np.array_equal(numpy_helper.to_array(written[1]), w64 + 0.25)
    x = np.ones((2, 3), np.float32)
    assert np.array_equal(_ort(write_back(module, model), {"x": x})[0], _bridge(write_back(module, model), {"x": x})[0])


def test_write_back_refuses_another_model(zoo_model):
    _, vgg = zoo_model("vgg")
    _, resnet = zoo_model("resnet_basic")
    with pytest.raises(ValueError, match="not in the module"):
        write_back(OnnxModule(vgg), resnet)


# --- 5: training


def test_gradients_reach_every_conv_weight(zoo_model):
    zm, model = zoo_model("mobilenet_v3_bn")
    module = OnnxModule(_folded(model)).train()
    (out,) = module(**to_torch_inputs(zm.feeds(batch=BATCH, seed=1)))
    (out ** 2).mean().backward()
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) > 10
    for node in convs:
        grad = module.parameter_for(node.input[1]).grad
        assert grad is not None and float(grad.abs().sum()) > 0, node.name
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    assert float(module.parameter_for(bn.input[1]).grad.abs().sum()) > 0  # BN scale trains
    assert set(bn.input[3:5]).isdisjoint(module.initializer_names())  # running stats are buffers
    assert not module.parameter_for(bn.input[3]).requires_grad


def _bn_model(momentum: float = 0.8, eps: float = 1e-3) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(0)
    arrays = {"scale": rng.uniform(0.5, 2, 3), "bias": rng.uniform(-1, 1, 3), "mean": rng.uniform(-1, 1, 3),
              "var": rng.uniform(0.5, 2, 3)}
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn",
                          momentum=momentum, epsilon=eps)],
        "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3, 5, 5])],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=IR_VERSION), arrays


def test_bn_frozen_keeps_running_stats():
    model, arrays = _bn_model()
    x = np.random.default_rng(1).normal(2.0, 3.0, (4, 3, 5, 5)).astype(np.float32)
    module = OnnxModule(model, bn="frozen").train()
    (y,) = module(torch.from_numpy(x))
    assert np.array_equal(module.parameter_for("mean").numpy(), arrays["mean"])
    assert np.array_equal(module.parameter_for("var").numpy(), arrays["var"])
    assert _rel(_ort(model, {"x": x})[0], y.detach().numpy()) <= 1e-6  # the inference formula, in train()
    assert module.initializer_names() == ["scale", "bias"]


def test_bn_update_follows_momentum():
    model, arrays = _bn_model(momentum=0.8, eps=1e-3)
    x = np.random.default_rng(1).normal(2.0, 3.0, (4, 3, 5, 5)).astype(np.float32)
    module = OnnxModule(model, bn="update").train()
    (y,) = module(torch.from_numpy(x))
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3))
    np.testing.assert_allclose(module.parameter_for("mean").numpy(), arrays["mean"] * 0.8 + mean * 0.2, rtol=1e-5)
    np.testing.assert_allclose(module.parameter_for("var").numpy(), arrays["var"] * 0.8 + var * 0.2, rtol=1e-5)
    c = (1, 3, 1, 1)
    expected = ((x64 - mean.reshape(c)) / np.sqrt(var.reshape(c) + 1e-3) * arrays["scale"].reshape(c)
                + arrays["bias"].reshape(c))
    assert _rel(expected, y.detach().numpy().astype(np.float64)) <= 1e-5
    stats = {k: module.parameter_for(k).clone() for k in ("mean", "var")}
    module.eval()
    with torch.no_grad():
        (y_eval,) = module(torch.from_numpy(x))
    assert all(torch.equal(stats[k], module.parameter_for(k)) for k in stats)  # eval() does not update
    written = write_back(module, model)
    assert _rel(_ort(written, {"x": x})[0], y_eval.numpy()) <= 1e-5  # the updated stats are written back
    assert np.allclose(numpy_helper.to_array(written.proto.graph.initializer[2]), stats["mean"].numpy(), rtol=0)


# --- 6: errors name the node


def _one_node_model(node, inputs, outputs, inits=(), opset=17, domains=()):
    graph = helper.make_graph([node], "g", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def test_unsupported_op_is_refused_at_construction():
    boxes = helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 4])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 4])
    out = helper.make_tensor_value_info("sel", TensorProto.INT64, [None, 3])
    nms = helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"], name="nms_head")
    with pytest.raises(UnsupportedOpError, match=r"node 'nms_head' \(NonMaxSuppression\)"):
        OnnxModule(_one_node_model(nms, [boxes, scores], [out]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    custom = helper.make_node("FancyAct", ["x"], ["y"], name="fancy", domain="my.ops")
    with pytest.raises(UnsupportedOpError, match=r"node 'fancy' \(my\.ops:FancyAct\)"):
        OnnxModule(_one_node_model(custom, [x], [y], domains=["my.ops"]))


def test_handler_failure_names_the_node():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="bad_reshape")
    model = _one_node_model(node, [x], [y], [numpy_helper.from_array(np.array([4, 4], np.int64), "shape")])
    module = OnnxModule(model)  # constructing is fine: shapes are only known at run time
    with pytest.raises(NodeError, match=r"node 'bad_reshape' \(Reshape\): RuntimeError: shape '\[4, 4\]'"):
        module(torch.zeros(2, 3))


def test_bridge_without_torch_says_what_to_install():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import aofp_onnx.bridge\nexcept ImportError as exc:\n    print(exc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "the PyTorch bridge needs torch: pip install 'aofp-onnx[torch]'"


def test_duplicate_handler_registration_is_refused():
    from aofp_onnx.bridge.registry import HANDLERS, op

    relu = HANDLERS["Relu"]
    with pytest.raises(ValueError, match="Relu already has a bridge handler"):
        op("NotAnOnnxOp", "Relu")(lambda n, x: x)
    assert HANDLERS["Relu"] is relu and "NotAnOnnxOp" not in HANDLERS  # nothing registered


# --- 7: op semantics against onnxruntime, one small graph each

RNG = np.random.default_rng(42)


def _f(*shape, low=-2.0, high=2.0):
    return RNG.uniform(low, high, shape).astype(np.float32)


def _i(values):
    return np.array(values, np.int64)


def _case(op_type, inputs, attrs=None, opset=17, n_out=1, inits=()):
    """A one-node model: `inputs` is a list of (name, array) ('' for an omitted optional input);
    names listed in `inits` are initializers, the rest graph inputs."""
    names = [name for name, _ in inputs]
    node = helper.make_node(op_type, names, [f"y{k}" for k in range(n_out)], name=f"{op_type.lower()}_node",
                            **(attrs or {}))
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                    for n, a in inputs if n and n not in inits]
    initializers = [numpy_helper.from_array(a, n) for n, a in inputs if n in inits]
    outputs = [onnx.ValueInfoProto(name=f"y{k}") for k in range(n_out)]
    model = _one_node_model(node, graph_inputs, outputs, initializers, opset)
    feeds = {n: a for n, a in inputs if n and n not in inits}
    return pytest.param(model, feeds, id=f"{op_type}-{len(CASE_IDS)}")


CASE_IDS: list = []
X4 = _f(2, 3, 7, 9)


def _add(*args, **kwargs):
    CASE_IDS.append(_case(*args, **kwargs))


# Resize / Upsample
_add("Resize", [("x", X4), ("", None), ("scales", np.array([1, 1, 2, 3], np.float32))],
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, 13,
     inits=("scales",))
_add("Resize", [("x", X4), ("", None), ("scales", np.array([1, 1, 1.7, 0.6], np.float32))],
     {"mode": "nearest", "nearest_mode": "round_prefer_ceil"}, 13, inits=("scales",))
_add("Resize", [("x", X4), ("roi", np.zeros(0, np.float32)), ("scales", np.array([1, 1, 2.5, 0.5], np.float32))],
     {"mode": "linear"}, 11, inits=("roi", "scales"))
for _mode in ("align_corners", "pytorch_half_pixel", "asymmetric", "half_pixel"):
    _add("Resize", [("x", X4), ("", None), ("", None), ("sizes", _i([2, 3, 12, 4]))],
         {"mode": "linear", "coordinate_transformation_mode": _mode}, 13, inits=("sizes",))
_add("Resize", [("x", X4), ("", None), ("scales", np.array([1, 1, 2, 1.5], np.float32))],
     {"mode": "cubic"}, 13, inits=("scales",))
_add("Resize", [("x", X4), ("", None), ("", None), ("sizes", _i([2, 3, 5, 13]))],
     {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1}, 13, inits=("sizes",))
_add("Resize", [("x", X4), ("roi", np.array([0, 0, 0.2, 0.1, 1, 1, 0.9, 1.2], np.float32)), ("", None),
                ("sizes", _i([2, 3, 6, 8]))],
     {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": 7.0}, 13,
     inits=("roi", "sizes"))
_add("Resize", [("x", X4), ("", None), ("", None), ("sizes", _i([9, 5]))],
     {"mode": "nearest", "axes": [3, 2], "coordinate_transformation_mode": "half_pixel_symmetric"}, 19,
     inits=("sizes",))
_add("Resize", [("x", X4), ("scales", np.array([1, 1, 2, 0.5], np.float32))], {"mode": "nearest"}, 10,
     inits=("scales",))
_add("Upsample", [("x", X4), ("scales", np.array([1, 1, 2, 3], np.float32))], {"mode": "nearest"}, 9,
     inits=("scales",))
_add("Upsample", [("x", X4), ("scales", np.array([1, 1, 2, 2], np.float32))], {"mode": "linear"}, 9,
     inits=("scales",))
_add("Upsample", [("x", X4)], {"mode": "nearest", "scales": [1.0, 1.0, 2.0, 1.5]}, 7)
# Pad
for _mode in ("reflect", "edge", "constant"):
    _add("Pad", [("x", X4), ("pads", _i([0, 0, 2, 1, 0, 0, 1, 3])), ("value", np.array(1.5, np.float32))],
         {"mode": _mode}, 13, inits=("pads", "value"))
_add("Pad", [("x", X4), ("pads", _i([0, 1, -2, 1, 0, 0, 1, -3]))], {}, 13, inits=("pads",))
_add("Pad", [("x", X4)], {"mode": "reflect", "pads": [0, 0, 1, 2, 0, 0, 2, 1]}, 2)
_add("Pad", [("x", X4), ("pads", _i([1, 2, 0, 1])), ("", None), ("axes", _i([-1, 2]))], {"mode": "wrap"}, 19,
     inits=("pads", "axes"))
# Slice
for _starts, _ends, _axes, _steps in [([-1, 8], [-1000, 0], [3, 2], [-2, -3]), ([1, -100], [2**62, 5], [1, 3], [1, 2]),
                                      ([5], [-2**62], [-1], [-1]), ([0, 0], [-1, 1], [0, 1], None)]:
    _inputs = [("x", X4), ("starts", _i(_starts)), ("ends", _i(_ends)), ("axes", _i(_axes))]
    _add("Slice", _inputs + ([("steps", _i(_steps))] if _steps else []), {}, 13,
         inits=("starts", "ends", "axes", "steps"))
# Split
_add("Split", [("x", X4)], {"axis": 3, "split": [2, 3, 4]}, 11, n_out=3)
_add("Split", [("x", X4), ("split", _i([4, 5]))], {"axis": -1}, 13, n_out=2, inits=("split",))
_add("Split", [("x", _f(2, 6, 3))], {"axis": 1}, 13, n_out=3)
_add("Split", [("x", X4)], {"axis": 2, "num_outputs": 4}, 18, n_out=4)
# Softmax family
for _op in ("Softmax", "LogSoftmax", "Hardmax"):
    for _opset in (11, 13):
        _add(_op, [("x", X4)], {"axis": 1}, _opset)
_add("Softmax", [("x", X4)], {}, 11)
_add("Softmax", [("x", X4)], {}, 13)
# Conv / ConvTranspose
_W = _f(6, 3, 3, 3)
_add("Conv", [("x", X4), ("w", _W), ("b", _f(6))], {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, 13,
     inits=("w", "b"))
_add("Conv", [("x", X4), ("w", _W)], {"strides": [2, 3], "auto_pad": "SAME_LOWER"}, 13,
     inits=("w",))
_add("Conv", [("x", _f(2, 4, 7, 9)), ("w", _f(6, 2, 3, 2))], {"pads": [1, 0, 2, 1], "group": 2}, 13, inits=("w",))
_add("Conv", [("x", _f(1, 4, 11)), ("w", _f(4, 1, 5))], {"pads": [2, 2], "group": 4, "strides": [2]}, 13,
     inits=("w",))
_add("Conv", [("x", _f(1, 2, 5, 6, 4)), ("w", _f(3, 2, 3, 3, 1))], {"auto_pad": "VALID"}, 13, inits=("w",))
_WT = _f(4, 3, 3, 3)
_XT = _f(2, 4, 5, 6)
_add("ConvTranspose", [("x", _XT), ("w", _WT), ("b", _f(6))],
     {"strides": [2, 3], "output_padding": [1, 2], "group": 2, "pads": [1, 0, 0, 1]}, 13, inits=("w", "b"))
_add("ConvTranspose", [("x", _XT), ("w", _WT)], {"strides": [2, 2], "dilations": [2, 1], "pads": [2, 1, 2, 1]}, 13,
     inits=("w",))
for _shape in ([12, 11], [10, 12], [9, 10]):
    _add("ConvTranspose", [("x", _XT), ("w", _WT)], {"strides": [2, 2], "output_shape": _shape}, 13, inits=("w",))
_add("ConvTranspose", [("x", _XT), ("w", _WT)], {"strides": [2, 2], "output_shape": [10, 11], "auto_pad": "SAME_UPPER"},
     13, inits=("w",))
_add("ConvTranspose", [("x", _XT), ("w", _WT)], {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, 13, inits=("w",))
_add("ConvTranspose", [("x", _XT), ("w", _WT)], {"strides": [2, 2], "auto_pad": "SAME_LOWER"}, 13, inits=("w",))
_add("ConvTranspose", [("x", _f(1, 2, 6)), ("w", _f(2, 3, 4)), ("b", _f(3))], {"strides": [3]}, 13,
     inits=("w", "b"))
# pools
for _attrs in ({"count_include_pad": 0, "pads": [1, 1, 1, 1]}, {"count_include_pad": 1, "pads": [1, 0, 1, 2]},
               {"ceil_mode": 1, "strides": [2, 2]}, {"ceil_mode": 1, "strides": [2, 2], "pads": [1, 1, 1, 1]},
               {"ceil_mode": 1, "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
               {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, {"auto_pad": "SAME_LOWER", "strides": [2, 2]}):
    _add("AveragePool", [("x", X4)], {"kernel_shape": [3, 3], **_attrs}, 13)
    _attrs.pop("count_include_pad", None)
    _add("MaxPool", [("x", X4)], {"kernel_shape": [3, 3], **_attrs}, 13)
_add("MaxPool", [("x", X4)], {"kernel_shape": [2, 3], "dilations": [2, 2], "ceil_mode": 1, "strides": [2, 1]}, 13)
_add("MaxPool", [("x", _f(2, 3, 10))], {"kernel_shape": [3], "strides": [3], "ceil_mode": 1}, 13)
_add("AveragePool", [("x", _f(1, 2, 5, 4, 6))], {"kernel_shape": [2, 2, 3], "pads": [1, 0, 1, 0, 1, 2]}, 13)
_add("LpPool", [("x", X4)], {"kernel_shape": [2, 3], "p": 2, "strides": [2, 2], "pads": [1, 0, 0, 1]}, 13)
for _op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
    _add(_op, [("x", X4)], {}, 13)
# Clip
_add("Clip", [("x", X4)], {"min": -0.5, "max": 1.0}, 6)
_add("Clip", [("x", X4), ("lo", np.array(-0.3, np.float32))], {}, 13, inits=("lo",))
_add("Clip", [("x", X4), ("", None), ("hi", np.array(0.4, np.float32))], {}, 13, inits=("hi",))
# Gemm / MatMul
_add("Gemm", [("a", _f(5, 4)), ("b", _f(3, 5)), ("c", _f(3))], {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0},
     13, inits=("b", "c"))
_add("Gemm", [("a", _f(4, 5)), ("b", _f(5, 3)), ("c", _f(4, 1))], {}, 13, inits=("b", "c"))
_add("MatMul", [("a", _f(2, 1, 4, 5)), ("b", _f(3, 5, 2))], {}, 13)
# reductions
for _op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
            "ReduceSumSquare"):
    _add(_op, [("x", X4)], {"axes": [1, -1], "keepdims": 0}, 13)
    _add(_op, [("x", X4), ("axes", _i([2]))], {}, 18, inits=("axes",))
_add("ReduceLogSum", [("x", _f(2, 3, 4, low=0.1))], {"axes": [0, 2]}, 13)
_add("ReduceSum", [("x", X4), ("axes", _i([-2, 1]))], {"keepdims": 0}, 13, inits=("axes",))
_add("ReduceSum", [("x", X4)], {}, 13)
_add("ReduceSum", [("x", X4), ("axes", _i([]))], {"noop_with_empty_axes": 1}, 13, inits=("axes",))
_add("ReduceMean", [("x", X4)], {}, 18)
_add("ArgMax", [("x", np.array([[1, 3, 3], [2, 2, 0]], np.float32))], {"axis": 1, "select_last_index": 1}, 13)
_add("ArgMin", [("x", X4)], {"axis": -2, "keepdims": 0}, 13)
# indexing and shapes
_add("Gather", [("x", X4), ("idx", _i([[0, -1], [2, 1]]))], {"axis": 2}, 13, inits=("idx",))
_add("Gather", [("x", X4), ("idx", np.array(-2, np.int64))], {"axis": 1}, 13, inits=("idx",))
_add("GatherElements", [("x", _f(3, 4)), ("idx", _i([[0, -1, 2, 1], [1, 0, 0, 2]]))], {"axis": 0}, 13,
     inits=("idx",))
_add("Squeeze", [("x", _f(1, 3, 1, 2))], {"axes": [0, -2]}, 11)
_add("Squeeze", [("x", _f(1, 3, 1, 2)), ("axes", _i([2]))], {}, 13, inits=("axes",))
_add("Squeeze", [("x", _f(1, 3, 1, 2))], {}, 13)
_add("Unsqueeze", [("x", _f(3, 2))], {"axes": [0, 3]}, 11)
_add("Unsqueeze", [("x", _f(3, 2)), ("axes", _i([-1, 1]))], {}, 13, inits=("axes",))
_add("Reshape", [("x", X4), ("shape", _i([0, -1, 9]))], {}, 13, inits=("shape",))
_add("Reshape", [("x", _f(0, 3)), ("shape", _i([3, 0]))], {"allowzero": 1}, 14, inits=("shape",))
_add("Flatten", [("x", X4)], {"axis": -1}, 13)
_add("Flatten", [("x", X4)], {"axis": 0}, 13)
_add("Transpose", [("x", X4)], {"perm": [0, 2, 3, 1]}, 13)
_add("Transpose", [("x", X4)], {}, 13)
_add("Shape", [("x", X4)], {"start": 1, "end": -1}, 15)
_add("Size", [("x", X4)], {}, 13)
_add("Expand", [("x", _f(3, 1)), ("shape", _i([2, 1, 4]))], {}, 13, inits=("shape",))
_add("Tile", [("x", _f(2, 3)), ("reps", _i([2, 3]))], {}, 13, inits=("reps",))
_add("ConstantOfShape", [("shape", _i([2, 3]))], {"value": numpy_helper.from_array(np.array([7], np.int64))}, 13)
_add("ConstantOfShape", [("shape", _i([4]))], {}, 13)
_add("Range", [("s", np.array(1.0, np.float32)), ("l", np.array(-4.0, np.float32)), ("d", np.array(-1.5, np.float32))],
     {}, 13)
_add("Concat", [("a", _f(2, 3)), ("b", _f(2, 1)), ("c", _f(2, 2))], {"axis": -1}, 13)
_add("Cast", [("x", np.array([-2.7, -0.5, 0.4, 2.9], np.float32))], {"to": TensorProto.INT32}, 13)
_add("Where", [("c", np.array([[True, False, True]])), ("a", _f(2, 3)), ("b", _f(1))], {}, 13)
_add("Dropout", [("x", X4)], {}, 13)
# elementwise
_XA, _XB = _f(2, 3, 4), _f(3, 1)
for _op in ("Add", "Sub", "Mul", "Div", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"):
    _add(_op, [("a", _XA), ("b", _XB)], {}, 13)
_add("Div", [("a", _i([7, -7, 7, -7])), ("b", _i([2, 2, -2, -2]))], {}, 13)
_add("Mod", [("a", _i([7, -7, 7, -7])), ("b", _i([3, 3, -3, -3]))], {}, 13)
_add("Mod", [("a", _f(5)), ("b", _f(5, low=0.5))], {"fmod": 1}, 13)
_add("Pow", [("a", _f(2, 3, low=0.1)), ("b", _f(3))], {}, 13)
for _op in ("And", "Or", "Xor"):
    _add(_op, [("a", np.array([True, True, False, False])), ("b", np.array([True, False, True, False]))], {}, 13)
_add("Not", [("a", np.array([True, False]))], {}, 13)
for _op in ("Max", "Min", "Sum", "Mean"):
    _add(_op, [("a", _XA), ("b", _XB), ("c", _f(4))], {}, 13)
for _op in ("Abs", "Ceil", "Cos", "Erf", "Exp", "Floor", "Neg", "Reciprocal", "Relu", "Round", "Sigmoid", "Sign",
            "Sin", "Tanh", "Softplus", "Softsign", "Identity", "HardSwish", "Mish"):
    _add(_op, [("x", X4)], {}, 18)
_add("Round", [("x", np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49], np.float32))], {}, 13)
for _op in ("Log", "Sqrt"):
    _add(_op, [("x", _f(3, 4, low=0.1))], {}, 13)
for _op, _attrs in [("Elu", {"alpha": 0.7}), ("Celu", {"alpha": 1.3}), ("Selu", {}), ("LeakyRelu", {"alpha": 0.2}),
                    ("ThresholdedRelu", {"alpha": 0.3}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
                    ("Shrink", {"lambd": 0.6, "bias": 0.2}), ("Gelu", {}), ("Gelu", {"approximate": "tanh"})]:
    _add(_op, [("x", X4)], _attrs, 20)
_add("Swish", [("x", X4)], {"alpha": 0.7}, 24)
_add("PRelu", [("x", X4), ("slope", _f(3, 1, 1))], {}, 13, inits=("slope",))
# normalizations
_add("BatchNormalization", [("x", X4), ("s", _f(3)), ("b", _f(3)), ("m", _f(3)), ("v", _f(3, low=0.5))],
     {"epsilon": 1e-3}, 15, inits=("s", "b", "m", "v"))
_add("InstanceNormalization", [("x", X4), ("s", _f(3)), ("b", _f(3))], {"epsilon": 1e-4}, 13, inits=("s", "b"))
_add("LayerNormalization", [("x", X4), ("s", _f(7, 9)), ("b", _f(7, 9))], {"axis": 2}, 17, inits=("s", "b"))
_add("LayerNormalization", [("x", X4), ("s", _f(9))], {"axis": 2}, 17, inits=("s",))
_add("LRN", [("x", _f(2, 6, 4, 4))], {"size": 3, "alpha": 0.1, "beta": 0.6, "bias": 2.0}, 13)
_add("LRN", [("x", _f(2, 6, 4, 4))], {"size": 5}, 13)
_add("LpNormalization", [("x", X4)], {"axis": 1, "p": 1}, 13)
_add("LpNormalization", [("x", X4)], {}, 13)


@pytest.mark.parametrize("model, feeds", CASE_IDS)
def test_op_matches_onnxruntime(model, feeds):
    expected = _ort(model, feeds)
    got = _bridge(model, feeds)
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        if not np.any(e):
            assert e.dtype == g.dtype and np.array_equal(e, g)
        else:
            assert _rel(e, g) <= 1e-5


def test_constant_nodes_are_buffers_not_parameters(zoo_model):
    _, model = zoo_model("paddle_cls_op17")
    assert sum(n.op_type == "Constant" for n in model.graph.node) > 10
    assert OnnxModule(model).initializer_names() == []
    folded = _folded(model)
    names = OnnxModule(folded).initializer_names()
    stats = {n.input[k] for n in model.graph.node if n.op_type == "BatchNormalization" for k in (3, 4)}
    assert stats and names == [i.name for i in folded.proto.graph.initializer
                               if i.data_type == TensorProto.FLOAT and i.name not in stats]


def test_module_copies_are_independent(zoo_model):
    """deepcopy (a teacher, an EMA copy) and pickling keep the graph and copy the parameters."""
    import copy
    import pickle

    zm, model = zoo_model("unet_bn")
    module = OnnxModule(_folded(model), bn="update").eval()
    feeds = to_torch_inputs(zm.feeds(batch=1, seed=2))
    with torch.no_grad():
        (before,) = module(**feeds)
        clone, restored = copy.deepcopy(module), pickle.loads(pickle.dumps(module))
        assert clone.bn == "update" and clone.train().training and not module.training
        for p in clone.parameters():
            p.mul_(0.5)
        (after,) = module(**feeds)
        (restored_out,) = restored(**feeds)
        (clone_out,) = clone.eval()(**feeds)
    assert torch.equal(before, after) and torch.equal(before, restored_out)
    assert not torch.allclose(before, clone_out)
