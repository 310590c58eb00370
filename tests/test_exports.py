"""Exports as users have them (issue 11, items 2-5): constant subgraphs folded at load, channels-last
(Keras/TF) graphs, float16 weights and activations, old opsets — each inspected for its prunable share
and pruned with the cut verified (max |pruned − masked original| ≤ 1e-4, float16 compared in float32), the
written model keeping the input's I/O names, dtypes and dims."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import exportstyles
from aofp_onnx import api
from aofp_onnx.errors import InputError
from aofp_onnx.graph import Graph
from aofp_onnx.normalize import fold_constants

float16 = pytest.importorskip("onnxconverter_common.float16", reason="the float16 tests need onnxconverter-common")


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _io(model: onnx.ModelProto) -> list:
    """Names, element types and dims (as declared) of the graph inputs and outputs."""
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in [*model.graph.input, *model.graph.output]]


def _prune(tmp_path, model: onnx.ModelProto, name: str, criterion: str = "l1", target: float = 0.5, **kw) -> tuple:
    src, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}.pruned.onnx"
    onnx.save(model, src)
    rep = api.prune(src, out, calib="random:8", criterion=criterion, flops_target=target, latency=False,
                    batch_size=4, **kw)
    return rep, onnx.load(out)


def _input_dtype(model):
    return onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)


# --- item 2: constant subgraphs folded ------------------------------------------------------------------

def test_fold_turns_constant_subgraphs_into_initializers_and_keeps_the_rest():
    model = exportstyles.paddle_cnn()
    before = onnx.ModelProto()
    before.CopyFrom(model)
    folded = fold_constants(model)
    ops = [n.op_type for n in folded.graph.node]
    assert "Constant" not in ops
    reshape_inputs = [n.input[0] for n in folded.graph.node if n.op_type == "Reshape"]
    assert len(reshape_inputs) == 1 and reshape_inputs[0] not in {i.name for i in folded.graph.initializer}
    # the Paddle bias Reshapes (3 convs + the SE's) went; the classifier's Shape of an activation stayed
    assert ops.count("Shape") == 1 and ops.count("Cast") == 0
    names = [n.name for n in before.graph.node]
    kept = [n.name for n in folded.graph.node]
    assert kept == [x for x in names if x in set(kept)]  # same names, same order
    constants = sum(n.op_type == "Constant" for n in before.graph.node)
    assert constants == 31 and len(kept) == len(names) - constants - 5  # + 4 bias Reshapes, the Cast of [C]
    assert folded.metadata_props[0].value == "paddle2onnx-style"
    # nothing dangling: every initializer is read, every input defined
    read = {i for n in folded.graph.node for i in n.input}
    assert {i.name for i in folded.graph.initializer} <= read
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert np.array_equal(_run(before, {"x": x})[0], _run(folded, {"x": x})[0])


def test_fold_leaves_growth_randomness_and_input_dependent_nodes():
    shape = numpy_helper.from_array(np.array([1, 128, 32, 32], np.int64), "shape")
    one = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "one")
    small = numpy_helper.from_array(np.arange(128, dtype=np.float32).reshape(1, 128, 1, 1), "small")
    nodes = [helper.make_node("Expand", ["one", "shape"], ["big"], name="expand"),  # 131072 elements from 5
             helper.make_node("RandomNormal", [], ["noise"], name="random", shape=[1, 128, 1, 1]),
             helper.make_node("Mul", ["small", "small"], ["sq"], name="square"),  # folded
             helper.make_node("Shape", ["x"], ["xs"], name="shape_of_x"),  # depends on the input
             helper.make_node("Add", ["x", "sq"], ["a"], name="add"),
             helper.make_node("Add", ["a", "noise"], ["b"], name="add_noise"),
             helper.make_node("Expand", ["b", "xs"], ["c"], name="expand_x"),
             helper.make_node("Mul", ["big", "c"], ["y"], name="mul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, 32, 32])],
                              [shape, one, small])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    folded = fold_constants(model)
    assert [n.name for n in folded.graph.node] == ["expand", "random", "shape_of_x", "add", "add_noise", "expand_x",
                                                   "mul"]
    sq = next(i for i in folded.graph.initializer if i.name == "sq")
    assert np.array_equal(numpy_helper.to_array(sq), np.arange(128, dtype=np.float32).reshape(1, 128, 1, 1) ** 2)
    assert "small" not in {i.name for i in folded.graph.initializer}  # read by the folded node only


def test_paddle_export_bias_reshapes_are_prunable_and_cut(tmp_path):
    model = exportstyles.paddle_cnn()
    graph = Graph.from_model(exportstyles.paddle_cnn(), None)
    info = api.Pruner(str(tmp_path), graph, api.analyze(graph)).inspect()
    prunable = [g for g in info["groups"] if g["prunable"]]
    assert len(prunable) == 4 and info["prunable_macs_fraction"] == 1.0  # 3 convs + the SE squeeze
    rep, pruned = _prune(tmp_path, model, "paddle")
    assert rep["verification"]["passed"] and rep["verification"]["max_abs_diff"] <= 1e-4
    assert rep["macs_after"] <= 0.5 * rep["macs_before"]
    assert _io(pruned) == _io(model) and pruned.metadata_props[0].value == "paddle2onnx-style"
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    assert _run(pruned, {"x": x})[0].shape == (3, 10)


# --- item 3: channels-last exports ------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["flatten", "gap"])
def test_keras_channels_last_is_prunable_and_cut(tmp_path, head):
    model = exportstyles.keras_cnn(head=head)
    src = tmp_path / "keras.onnx"
    onnx.save(model, src)
    info = api.inspect(src)
    assert info["prunable_macs_fraction"] >= 0.95
    assert [g["id"] for g in info["groups"] if g["prunable"]] == ["conv_4_out", "conv_13_out", "conv_26_out",
                                                                  "matmul_3%d_out" % (5 if head == "flatten" else 4)]
    assert next(g for g in info["groups"] if g["id"] == "input_1")["width"] == 3  # NHWC: C is the last axis
    # --round-to 1: no latency table, so the measured weighting cannot move the cut off the dense's input group
    # --damage-at next: the cut this test follows into the dense rows (output damage keeps that group whole)
    rep, pruned = _prune(tmp_path, model, "keras", criterion="aofp" if head == "flatten" else "l1", round_to=1,
                         damage_at="next")
    assert rep["verification"]["passed"] and rep["verification"]["max_abs_diff"] <= 1e-4
    assert rep["macs_after"] <= 0.55 * rep["macs_before"]
    assert _io(pruned) == _io(model)
    dense = next(i for i in pruned.graph.initializer if i.name.startswith("dense"))
    assert dense.dims[0] < (16 * 4 if head == "flatten" else 16)  # the dense rows follow the NHWC flatten
    x = np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype(np.float32)
    assert _run(pruned, {"input_1": x})[0].shape == (2, 10)


# --- item 4: float16 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep_io", [True, False], ids=["float32-io", "float16-io"])
@pytest.mark.parametrize("criterion", ["l1", "random", "aofp", "descent", "oracle"])
def test_float16_model_is_pruned_by_every_criterion(tmp_path, keep_io, criterion):
    model = float16.convert_float_to_float16(exportstyles.paddle_cnn(), keep_io_types=keep_io)
    rep, pruned = _prune(tmp_path, model, "fp16", criterion=criterion)
    v = rep["verification"]  # compared in float32 (both models widened): the cut, not float16 rounding
    assert v["passed"] and v["max_rel_diff"] <= 1e-4
    assert rep["macs_after"] <= 0.55 * rep["macs_before"]
    assert _io(pruned) == _io(model)
    assert {i.data_type for i in pruned.graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)} \
        == {TensorProto.FLOAT16}
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(_input_dtype(model))
    y = _run(pruned, {"x": x})[0]
    assert y.dtype == (np.float32 if keep_io else np.float16) and y.shape == (2, 10)


def test_float16_keras_reconstruct(tmp_path):
    model = float16.convert_float_to_float16(exportstyles.keras_cnn(), keep_io_types=False)
    data = tmp_path / "calib.npz"
    np.savez(data, input_1=np.random.default_rng(0).standard_normal((64, 16, 16, 3)).astype(np.float16))
    src, out = tmp_path / "k16.onnx", tmp_path / "k16.pruned.onnx"
    onnx.save(model, src)
    rep = api.prune(src, out, calib=str(data), criterion="l1", flops_target=0.5, latency=False, reconstruct=True)
    assert rep["verification"]["passed"]
    error = rep["reconstruction"]["output_error"]
    assert error["reconstructed"] < error["cut"]
    assert _io(onnx.load(out)) == _io(model)


def test_float16_runs_in_the_bridge_as_in_onnxruntime():
    torch = pytest.importorskip("torch")
    from aofp_onnx.bridge.executor import OnnxModule

    model = float16.convert_float_to_float16(exportstyles.paddle_cnn(), keep_io_types=False)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float16)
    module = OnnxModule(model)
    assert all(p.dtype == torch.float32 for p in module.parameters())  # float32 master weights
    with torch.no_grad():
        got = module(torch.from_numpy(x))[0].numpy()
    want = _run(model, {"x": x})[0].astype(np.float32)
    assert np.max(np.abs(got - want)) <= 1e-2  # float16 rounding of the reference


# --- item 5: old opsets -------------------------------------------------------------------------------------

def test_opset9_is_upgraded_and_pruned(tmp_path):
    model = exportstyles.opset9_cnn()
    src = tmp_path / "op9.onnx"
    onnx.save(model, src)
    info = api.inspect(src)
    assert info["notes"] == ["opset 9 upgraded to 11"] and info["opset"] == 11
    assert info["prunable_macs_fraction"] == 1.0 and sum(g["prunable"] for g in info["groups"]) == 3
    rep, pruned = _prune(tmp_path, model, "op9")
    assert rep["notes"] == ["opset 9 upgraded to 11"]
    assert rep["verification"]["passed"] and rep["verification"]["max_abs_diff"] <= 1e-4
    assert _io(pruned) == _io(model) and pruned.opset_import[0].version == 11


def test_an_opset_onnx_knows_but_onnxruntime_does_not_is_refused(tmp_path):
    newest = onnx.defs.onnx_opset_version()
    model = exportstyles.keras_cnn()
    model.opset_import[0].version, model.ir_version = newest, 10
    try:
        _run(model, {"input_1": np.zeros((1, 16, 16, 3), np.float32)})
        pytest.skip(f"this onnxruntime runs opset {newest}, the newest onnx knows")
    except Exception:
        pass
    src = tmp_path / "new.onnx"
    onnx.save(model, src)
    with pytest.raises(InputError, match=f"opset {newest} is newer than this onnxruntime runs"):
        api.inspect(src)
