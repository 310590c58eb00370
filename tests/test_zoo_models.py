"""The test zoo checks itself: every model builds, is valid ONNX, runs, and its MACs are what torch
(or a hand formula) says. Also pins the graph patterns each model exists to exercise, and checks the
independent MACs/params counter on hand-built graphs."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import reference_macs
import zoo

ARCHS = [
    "vgg", "resnet_basic", "resnet_bottleneck", "mobilenet_v2", "mobilenet_v3",
    "yolov8_neck", "unet", "densenet", "shared_bias", "conv1d",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    directory = tmp_path_factory.mktemp("zoo")
    cache: dict[str, zoo.ZooModel] = {}

    def get(name: str) -> zoo.ZooModel:
        if name not in cache:
            cache[name] = zoo.build(name, directory)
        return cache[name]

    return get


def _ops(zm: zoo.ZooModel) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(zm.path)).graph.node)


def _session(zm):
    return ort.InferenceSession(str(zm.path), providers=["CPUExecutionProvider"])


def test_registry_has_every_architecture_in_both_variants():
    names = zoo.names()
    for arch in ARCHS:
        assert arch in names and f"{arch}_bn" in names, arch
    assert {"shared_bias_direct", "paddle_det_op11", "paddle_cls_op17"} <= set(names)
    assert len(names) == len(set(names)) == 2 * len(ARCHS) + 3
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.build("nope", "/nonexistent")


@pytest.mark.parametrize("name", zoo.names())
def test_model_builds_checks_runs_and_counts(built, name):
    zm = built(name)
    assert zm.name == name and zm.path.is_file() and zm.path.stat().st_size > 0
    model = onnx.load(str(zm.path))
    onnx.checker.check_model(model, full_check=True)

    sess = _session(zm)
    assert [i.name for i in sess.get_inputs()] == list(zm.input_shapes)
    assert sess.get_inputs()[0].type == "tensor(float)"
    outs = sess.run(None, zm.feeds(seed=1))
    assert outs and all(o.shape[0] == 1 for o in outs)
    for o in outs:
        assert np.isfinite(o).all()
        assert o.std() > 1e-4, "output is (near) constant: the model is degenerate"

    macs = reference_macs.count_macs(zm.path, zm.feeds())
    expected = zm.torch_macs if zm.torch_macs is not None else zm.formula_macs
    assert expected is not None and expected > 0
    assert macs == expected
    # per-sample: the batch size does not change the count (the batch axis is dynamic)
    assert reference_macs.count_macs(model, zm.feeds(batch=3)) == macs


@pytest.mark.parametrize("arch", ARCHS)
def test_bn_variants(built, arch):
    folded, kept = _ops(built(arch)), _ops(built(f"{arch}_bn"))
    assert kept["BatchNormalization"] > 0
    if arch == "densenet":  # pre-activation BN (BN → ReLU → Conv) cannot be folded into a Conv
        assert 0 < folded["BatchNormalization"] < kept["BatchNormalization"]
    else:
        assert folded["BatchNormalization"] == 0
    assert folded["Conv"] == kept["Conv"]
    # same function either way (same seed): BN folding only
    a, b = built(arch), built(f"{arch}_bn")
    ya = _session(a).run(None, a.feeds(seed=2))
    yb = _session(b).run(None, b.feeds(seed=2))
    for u, v in zip(ya, yb):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


def test_bn_is_not_identity(built):
    model = onnx.load(str(built("resnet_basic_bn").path))
    consts = reference_macs.constant_arrays(model)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    scale, bias, mean, var = (consts[i] for i in bn.input[1:])
    assert not np.allclose(scale, 1) and not np.allclose(bias, 0)
    assert not np.allclose(mean, 0) and not np.allclose(var, 1)
    assert var.min() >= 0.5 and var.max() <= 2.0


REQUIRED_OPS = {
    "vgg": {"MaxPool", "Flatten", "Gemm"},
    "resnet_basic": {"Add", "GlobalAveragePool", "Gemm"},
    "resnet_bottleneck": {"Add", "GlobalAveragePool", "Gemm"},
    "mobilenet_v2": {"Clip", "Add"},
    "mobilenet_v3": {"HardSwish", "HardSigmoid", "GlobalAveragePool", "Mul", "Add"},
    "yolov8_neck": {"Sigmoid", "Mul", "Split", "Slice", "Shape", "Concat", "MaxPool", "Resize", "Add"},
    "unet": {"ConvTranspose", "Concat", "MaxPool"},
    "densenet": {"Concat", "AveragePool", "BatchNormalization"},
    "shared_bias": {"Identity"},
    "conv1d": {"Add", "GlobalAveragePool"},
    "paddle_det_op11": {"Constant", "BatchNormalization", "Clip", "Div", "PRelu", "HardSigmoid",
                        "ConvTranspose", "Concat", "Sigmoid"},
    "paddle_cls_op17": {"Constant", "BatchNormalization", "HardSwish", "Clip", "Div", "PRelu",
                        "HardSigmoid", "Reshape", "MatMul"},
}


@pytest.mark.parametrize("name", sorted(REQUIRED_OPS))
def test_model_contains_the_patterns_it_exists_for(built, name):
    ops = _ops(built(name))
    assert REQUIRED_OPS[name] <= set(ops), REQUIRED_OPS[name] - set(ops)


def test_depthwise_convs_present(built):
    for name in ("mobilenet_v2", "mobilenet_v3", "paddle_det_op11", "paddle_cls_op17", "conv1d"):
        model = onnx.load(str(built(name).path))
        consts = reference_macs.constant_arrays(model)
        dw = [
            n for n in model.graph.node
            if n.op_type == "Conv"
            and (g := next((a.i for a in n.attribute if a.name == "group"), 1)) > 1
            and consts[n.input[1]].shape[0] == g and consts[n.input[1]].shape[1] == 1
        ]
        assert dw, name


def test_vgg_flatten_over_4x4_map(built):
    model = onnx.load(str(built("vgg").path))
    consts = reference_macs.constant_arrays(model)
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert [consts[g.input[1]].shape for g in gemms] == [(64, 32 * 4 * 4), (10, 64)]
    shapes = reference_macs.node_shapes(model, built("vgg").feeds())
    assert shapes[gemms[0].input[0]] == (1, 512)


def test_yolo_split_and_resize(built):
    model = onnx.load(str(built("yolov8_neck").path))
    consts = reference_macs.constant_arrays(model)
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    assert [consts[s.input[1]].tolist() for s in splits] == [[32, 32], [16, 16]]  # b4 (c=32), n1 (c=16)
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    assert consts[resize.input[2]].tolist() == [1.0, 1.0, 2.0, 2.0]
    pools = [n for n in model.graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 3
    for p in pools:
        attrs = {a.name: helper.get_attribute_value(a) for a in p.attribute}
        assert attrs["kernel_shape"] == [5, 5] and attrs["strides"] == [1, 1] and attrs["pads"] == [2] * 4


def _bias_users(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    inits = {i.name for i in model.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    users: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 2:
            users[alias.get(n.input[2], n.input[2])].append(n)
    return users


@pytest.mark.parametrize("name,expected", [
    ("shared_bias", [2, 2]), ("shared_bias_bn", [2, 3]), ("shared_bias_direct", [2, 2]),
])
def test_shared_zero_bias(built, name, expected):
    model = onnx.load(str(built(name).path))
    consts = reference_macs.constant_arrays(model)
    shared = {k: v for k, v in _bias_users(model).items() if len(v) > 1}
    assert sorted(len(v) for v in shared.values()) == expected
    for init, convs in shared.items():
        assert not consts[init].any()
        groups = {next((a.i for a in c.attribute if a.name == "group"), 1) for c in convs}
        if consts[init].shape == (16,):
            assert len(groups) > 1  # shared between a grouped conv and a depthwise conv
    if name == "shared_bias_direct":
        assert not any(n.op_type == "Identity" for n in model.graph.node)
        direct = collections.Counter(n.input[2] for n in model.graph.node if n.op_type == "Conv")
        assert sorted(c for c in direct.values() if c > 1) == [2, 2]


@pytest.mark.parametrize("name,opset", [("paddle_det_op11", 11), ("paddle_cls_op17", 17)])
def test_paddle_style_graph(built, name, opset):
    zm = built(name)
    model = onnx.load(str(zm.path))
    assert len(model.graph.initializer) == 0
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    const_out = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    consts = reference_macs.constant_arrays(model)
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "BatchNormalization", "PRelu", "MatMul"):
            assert all(i in const_out for i in n.input[1:]), n.name
    # decomposed hard-swish x * clip(x + 3, 0, 6) / 6 with scalar constants
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert clips
    for c in clips:
        assert [consts[i].shape for i in c.input[1:]] == [(), ()]
        assert [float(consts[i]) for i in c.input[1:]] == [0.0, 6.0]
    prelu = next(n for n in model.graph.node if n.op_type == "PRelu")
    assert consts[prelu.input[1]].ndim == 3 and consts[prelu.input[1]].shape[1:] == (1, 1)
    muls = [consts[i].shape for n in model.graph.node if n.op_type == "Mul" for i in n.input if i in consts]
    affine = (24, 1, 1) if opset == 11 else (1, 32, 1, 1)
    assert affine in muls
    if opset == 11:
        assert "HardSwish" not in _ops(zm)  # HardSwish only exists from opset 14
        assert (1, 16, 1, 1) in [consts[i].shape for n in model.graph.node if n.op_type == "Add"
                                 for i in n.input if i in consts]  # ConvTranspose bias as an Add
    else:
        reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
        assert consts[reshape.input[1]].tolist() == [-1, 512]


def test_paddle_macs_hand_formula(built):
    det = (
        16 * 16 * 16 * 3 * 9        # stem 3->16, 3x3 s2 -> 16x16
        + 16 * 16 * 16 * 1 * 9      # depthwise 3x3
        + 16 * 4 + 4 * 16           # SE convs on 1x1
        + 16 * 16 * 24 * 16         # 1x1 16->24
        + 8 * 8 * 32 * 24 * 9       # 3x3 s2 24->32 -> 8x8
        + 8 * 8 * 32 * 16 * 4       # ConvTranspose 32->16 k2 s2 (input 8x8)
        + 16 * 16 * 16 * 40 * 9     # 3x3 40->16 after Concat
        + 16 * 16 * 16 * 1 * 4      # ConvTranspose 16->1 k2 s2 (input 16x16)
    )
    cls = (
        16 * 16 * 16 * 3 * 9        # stem
        + 16 * 16 * 16 * 9          # depthwise 3x3
        + 16 * 8 + 8 * 16           # SE
        + 16 * 16 * 32 * 16         # 1x1 16->32
        + 8 * 8 * 32 * 32 * 9       # 3x3 s2
        + 4 * 4 * 32 * 25           # depthwise 5x5 s2 -> 4x4
        + 512 * 64 + 64 * 10        # MatMul head
    )
    for name, want in (("paddle_det_op11", det), ("paddle_cls_op17", cls)):
        zm = built(name)
        assert zm.formula_macs == want
        assert reference_macs.count_macs(zm.path, zm.feeds()) == want


# ---------------------------------------------------------------------------------------------
# reference_macs on hand-built graphs


def _model(nodes, inputs, outputs, inits, opset=13):
    g = helper.make_graph(nodes, "t", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _w(name, shape):
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


def test_reference_macs_each_op():
    nodes = [
        # Conv 4->6, group 2, 3x3, stride 2, pad 1 on 8x8 -> 4x4
        helper.make_node("Conv", ["x", "wc"], ["c"], group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
        # ConvTranspose 6->4, group 2, k2 s2 on 4x4 -> 8x8
        helper.make_node("ConvTranspose", ["c", "wt"], ["t"], group=2, strides=[2, 2]),
        helper.make_node("Flatten", ["t"], ["f"]),                 # [N, 256]
        helper.make_node("Gemm", ["f", "wg"], ["g"], transB=1),    # wg [5, 256]
        helper.make_node("Reshape", ["g", "shp"], ["r"]),          # [N, 1, 5]
        helper.make_node("MatMul", ["r", "wm"], ["m"]),            # [N, 1, 7]
    ]
    inits = [_w("wc", (6, 2, 3, 3)), _w("wt", (6, 2, 2, 2)), _w("wg", (5, 256)), _w("wm", (5, 7)),
             numpy_helper.from_array(np.array([-1, 1, 5], np.int64), "shp")]
    model = _model(nodes, [_f("x", ["n", 4, 8, 8])], [_f("m", None)], inits)
    per_node = reference_macs.count_macs_by_node(model, {"x": np.ones((2, 4, 8, 8), np.float32)})
    assert list(per_node.values()) == [
        6 * 4 * 4 * 2 * 9,  # Conv: Cout*HW*(Cin/g)*k*k
        6 * 4 * 4 * 2 * 4,  # ConvTranspose: Cin*HWin*(Cout/g)*k*k
        256 * 5,            # Gemm K*N per sample
        1 * 7 * 5,          # MatMul prod(out)/N * K
    ]
    assert reference_macs.count_macs(model, {"x": np.ones((2, 4, 8, 8), np.float32)}) == sum(per_node.values())


def test_reference_params_counts_initializers_and_constants():
    nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones((3, 2), np.float32))),
        helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([1, 6], np.int64))),
        helper.make_node("Constant", [], ["v"], value_float=2.0),
        helper.make_node("MatMul", ["x", "k"], ["y"]),
        helper.make_node("Add", ["y", "b"], ["z"]),
        helper.make_node("Mul", ["z", "v"], ["o"]),
    ]
    inits = [_w("b", (2,)), numpy_helper.from_array(np.zeros(4, np.int64), "unused_int")]
    model = _model(nodes, [_f("x", [1, 3])], [_f("o", [1, 2])], inits)
    assert reference_macs.count_params(model) == 6 + 1 + 2


def test_reference_params_of_zoo(built):
    assert reference_macs.count_params(built("paddle_cls_op17").path) == sum(
        a.size for a in reference_macs.constant_arrays(built("paddle_cls_op17").path).values()
        if a.dtype == np.float32
    )
    # conv1d, BN kept: every torch parameter and BN running stat is one float initializer
    zm = built("conv1d_bn")
    net = zoo.Conv1dNet()
    expected = sum(p.numel() for p in net.parameters()) + sum(
        b.numel() for n, b in net.named_buffers() if b.is_floating_point()
    )
    assert reference_macs.count_params(zm.path) == expected


# ---------------------------------------------------------------------------------------------
# real model fetch (tests/realmodels.py)


def test_realmodels_bad_wheel_is_reported_and_removed(tmp_path):
    import realmodels

    bad = tmp_path / "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(realmodels.RealModelUnavailable, match="not a readable wheel"):
        realmodels.ppocr_det_path(tmp_path)
    assert not bad.exists()


@pytest.mark.slow
def test_ppocr_det_fetch_loads_and_runs(ppocr_det):
    import realmodels

    model = onnx.load(str(ppocr_det))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == [realmodels.PPOCR_DET_INPUT_NAME]
    assert len(model.graph.initializer) == 0  # Paddle2ONNX: weights are Constant nodes
    sess = ort.InferenceSession(str(ppocr_det), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 160, 160)).astype(np.float32)
    (y,) = sess.run(None, {"x": x})
    assert y.shape == (1, 1, 160, 160) and np.isfinite(y).all() and 0 <= y.min() and y.max() <= 1
    small = reference_macs.count_macs(model, {"x": x})
    assert small > 0
    ops = _ops(zoo.ZooModel("ppocr", ppocr_det, {}, None))
    assert {"Conv", "ConvTranspose", "HardSigmoid", "Clip", "Resize", "Concat"} <= set(ops)
