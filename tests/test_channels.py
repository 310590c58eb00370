"""Channel handlers one at a time, on tiny onnx.helper graphs.

Each graph is x → Conv (creates the channels under test) → the op under test → Conv (consumes them)
→ output, so the group under test is prunable unless the op blocks it. Every test asserts the group
structure (widths, counts, positions, reasons) and, where the group is prunable, a verified cut:
valid ONNX, the pruned model equals the masked original (`aofp_onnx.verify`), the rewritten
initializers/attributes have the planned sizes, and the predicted MACs equal the independent count.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import reference_macs
from aofp_onnx.channels import Handler, handler_for, register, supported_ops
from aofp_onnx.graph import Graph
from aofp_onnx.groups import analyze
from aofp_onnx.surgery import cut
from aofp_onnx.verify import verify

IR_VERSION = 8  # onnx writes IR 14 by default, which this onnxruntime refuses


# --------------------------------------------------------------------------------------------------
# a tiny graph writer


class Net:
    def __init__(self, x_shape=(1, 3, 8, 8), seed=0):
        self.rng = np.random.default_rng(seed)
        self.x_shape = tuple(x_shape)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def uid(self, prefix):
        self._n += 1
        return f"{prefix}{self._n}"

    def const(self, value, name=None, dtype=np.float32) -> str:
        name = name or self.uid("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def const_node(self, value, name=None, dtype=np.float32) -> str:
        """A Constant node (Paddle2ONNX style) instead of an initializer."""
        name = name or self.uid("k")
        self.nodes.append(helper.make_node("Constant", [], [name],
                                           value=numpy_helper.from_array(np.asarray(value, dtype=dtype), name)))
        return name

    def op(self, op_type, inputs, n_out=1, name=None, domain=None, **attrs):
        name = name or self.uid(op_type.lower())
        outs = [f"{name}_out{k}" if n_out > 1 else f"{name}_out" for k in range(n_out)]
        kw = {"domain": domain} if domain else {}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **kw, **attrs))
        return outs if n_out > 1 else outs[0]

    def conv(self, x, cin, cout, k=3, group=1, bias=True, name=None, stride=1, weight=None, bias_name=None):
        name = name or self.uid("conv")
        w = weight or self.const(self.rng.normal(0, 1 / np.sqrt(cin // group * k * k), (cout, cin // group, k, k)),
                                 f"{name}.w")
        ins = [x, w]
        if bias:
            ins.append(bias_name or self.const(self.rng.uniform(-0.5, 0.5, cout), f"{name}.b"))
        return self.op("Conv", ins, name=name, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2,
                       group=group)

    def model(self, outputs, opset=13, extra_opsets=()) -> onnx.ModelProto:
        if isinstance(outputs, str):
            outputs = [outputs]
        graph = helper.make_graph(
            self.nodes, "t",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *self.x_shape[1:]])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits)
        opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
        return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def analyzed(model: onnx.ModelProto, x_shape=None):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = Graph.from_model(copy, {"x": tuple(x_shape)} if x_shape else None)
    return g, analyze(g)


def _proto(model) -> onnx.ModelProto:
    return model.materialize() if hasattr(model, "materialize") else model


def group_of(cm, tensor: str):
    """The one group that holds `tensor`'s channels."""
    found = cm.groups_of_tensor[tensor]
    assert len(found) == 1, [g.id for g in found]
    return found[0]


def plan(cm, picks: dict) -> np.ndarray:
    """Keep vector: for each group (its id, or a tensor only it holds) keep the listed local channels."""
    keep = cm.full_keep()
    for key, kept in picks.items():
        g = cm.by_id[key] if key in cm.by_id else group_of(cm, key)
        assert g.prunable, (g.id, g.reasons)
        mask = np.zeros(g.width, bool)
        mask[list(kept)] = True
        keep[g.slots] = mask
    return keep


def feeds_for(model, batch=2, seed=3):
    shape = [batch] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return {"x": np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)}


def checked_cut(cm, keep, model, batch=2):
    """Cut, then assert: full onnx check, verified equal to the masked original, exact MACs. -> pruned proto."""
    pruned = _proto(cut(cm, keep))
    onnx.checker.check_model(pruned, full_check=True)
    feeds = feeds_for(model, batch)
    v = verify(cm, keep, pruned, [feeds], "cpu")
    assert v.passed, v.detail
    assert v.max_rel_diff <= 1e-4
    assert v.samples == batch
    assert cm.total_macs == reference_macs.count_macs(model, feeds)
    assert cm.macs(keep) == reference_macs.count_macs(pruned, feeds)
    return pruned


def inits_of(model) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def node_named(model, name) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def input_value(model, node_name, index) -> np.ndarray:
    return inits_of(model)[node_named(model, node_name).input[index]]


def attr_of(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# --------------------------------------------------------------------------------------------------
# Reshape


def test_reshape_flatten_then_matmul_maps_channel_to_hw_columns():
    C, H, W = 6, 4, 4
    n = Net((1, 3, H, W))
    y = n.op("Relu", [n.conv("x", 3, C, name="a")])
    shape = n.const([-1, C * H * W], "flat_shape", np.int64)
    flat = n.op("Reshape", [y, shape], name="flat")
    out = n.op("MatMul", [flat, n.const(n.rng.normal(0, 0.1, (C * H * W, 5)), "fc.w")], name="fc")
    model = n.model(out)
    g, cm = analyzed(model)
    grp = group_of(cm, "a_out")
    assert grp.prunable and grp.width == C
    assert flat in grp.tensors and cm.tensor_axis[flat] == 1
    np.testing.assert_array_equal(cm.positions(flat), np.repeat(cm.positions("a_out"), H * W))
    assert [x.id for x in cm.groups if not x.prunable] == ["x", "fc_out"]
    kept = [0, 2, 5]
    pruned = checked_cut(cm, plan(cm, {"a_out": kept}), model)
    np.testing.assert_array_equal(input_value(pruned, "flat", 1), [-1, len(kept) * H * W])
    rows = np.concatenate([np.arange(c * H * W, (c + 1) * H * W) for c in kept])
    np.testing.assert_array_equal(input_value(pruned, "fc", 1), inits_of(model)["fc.w"][rows])
    assert input_value(pruned, "a", 1).shape == (3, 3, 3, 3)


def test_reshape_keeping_channel_axis():
    C = 6
    n = Net((1, 3, 4, 4))
    y = n.conv("x", 3, C, name="a")
    r = n.op("Reshape", [y, n.const([1, C, 16], "s1", np.int64)], name="r1")
    r = n.op("Softmax", [r], axis=-1)  # over the spatial axis: channels pass
    r = n.op("Reshape", [r, n.const([0, C, 4, 4], "s2", np.int64)], name="r2")
    out = n.conv(r, C, 2, name="b")
    model = n.model(out)
    g, cm = analyzed(model)
    grp = group_of(cm, "a_out")
    assert grp.prunable and grp.width == C and len(cm.prunable) == 1
    assert cm.tensor_axis["r1_out"] == 1 and "r2_out" in grp.tensors
    np.testing.assert_array_equal(cm.positions("r1_out"), cm.positions("a_out"))
    pruned = checked_cut(cm, plan(cm, {"a_out": [1, 4]}), model, batch=1)
    np.testing.assert_array_equal(input_value(pruned, "r1", 1), [1, 2, 16])
    np.testing.assert_array_equal(input_value(pruned, "r2", 1), [0, 2, 4, 4])
    assert input_value(pruned, "b", 1).shape == (2, 2, 3, 3)


def test_reshape_splitting_channels_is_blocked():
    C = 8
    n = Net((1, 3, 4, 4))
    y = n.conv("x", 3, C, name="a")
    r = n.op("Reshape", [y, n.const([1, 2, C // 2, 4, 4], "s1", np.int64)], name="split_c")
    r = n.op("Reshape", [n.op("Relu", [r]), n.const([1, C, 4, 4], "s2", np.int64)], name="back")
    out = n.conv(r, C, 2, name="b")
    g, cm = analyzed(n.model(out))
    grp = group_of(cm, "a_out")
    assert not grp.prunable and grp.width == C
    assert any("splits" in r and "split_c" in r for r in grp.reasons), grp.reasons
    assert cm.prunable == [] and cm.n_slots == 0


# --------------------------------------------------------------------------------------------------
# Slice, Split, Concat


def test_slice_on_channel_axis_rewrites_bounds():
    n = Net()
    y = n.conv("x", 3, 8, name="a")
    s = n.op("Slice", [y, n.const([2], "st", np.int64), n.const([6], "en", np.int64), n.const([1], "ax", np.int64)],
             name="sl")
    out = n.conv(s, 4, 3, name="b")
    model = n.model(out)
    g, cm = analyzed(model)
    # the sliced channels and the four that nothing reads occur in different tensors: two groups
    outer, inner = cm.groups_of_tensor["a_out"]
    assert group_of(cm, "sl_out") is inner and (outer.width, inner.width) == (4, 4)
    assert inner.tensors == ["a_out", "sl_out"] and outer.tensors == ["a_out"]
    assert outer.prunable and inner.prunable and outer.sinks == [] and len(inner.sinks) == 1
    np.testing.assert_array_equal(cm.positions("a_out")[[0, 1, 6, 7]], outer.slots)
    np.testing.assert_array_equal(cm.positions("sl_out"), cm.positions("a_out")[2:6])
    np.testing.assert_array_equal(cm.positions("sl_out"), inner.slots)
    # keep channels 0, 3, 4, 7: 1 before the slice, 2 inside, 1 after
    pruned = checked_cut(cm, plan(cm, {outer.id: [0, 3], inner.id: [1, 2]}), model)
    assert input_value(pruned, "sl", 1).tolist() == [1] and input_value(pruned, "sl", 2).tolist() == [3]
    assert input_value(pruned, "a", 1).shape == (4, 3, 3, 3)
    np.testing.assert_array_equal(input_value(pruned, "b", 1), inits_of(model)["b.w"][:, [1, 2]])


def test_slice_with_step_2_is_blocked():
    n = Net()
    y = n.conv("x", 3, 8, name="a")
    s = n.op("Slice", [y, n.const([0], "st", np.int64), n.const([8], "en", np.int64), n.const([1], "ax", np.int64),
                       n.const([2], "sp", np.int64)], name="sl")
    out = n.conv(s, 4, 3, name="b")
    g, cm = analyzed(n.model(out))
    grp = group_of(cm, "a_out")
    assert not grp.prunable
    assert grp.reasons == ["Slice 'sl': slices the channel axis with step 2"]


def _split_net(opset, mode):
    n = Net()
    y = n.conv("x", 3, 8, name="a")
    if mode == "input":
        parts = n.op("Split", [y, n.const([3, 5], "sizes", np.int64)], n_out=2, name="sp", axis=1)
    elif mode == "attr":
        parts = n.op("Split", [y], n_out=2, name="sp", axis=1, split=[3, 5])
    else:
        parts = n.op("Split", [y], n_out=2, name="sp", axis=1, num_outputs=2)
    widths = [3, 5] if mode != "num_outputs" else [4, 4]
    b = n.conv(parts[0], widths[0], 4, name="b")
    c = n.conv(parts[1], widths[1], 4, name="c")
    out = n.conv(n.op("Add", [b, c], name="add"), 4, 2, name="d")
    return n.model(out, opset=opset), widths


@pytest.mark.parametrize("opset,mode", [(13, "input"), (11, "attr"), (18, "num_outputs")])
def test_split_on_channels_rewrites_sizes(opset, mode):
    model, widths = _split_net(opset, mode)
    g, cm = analyzed(model)
    # each part is its own group (its channels occur in a_out and one split output)
    first, second = cm.groups_of_tensor["a_out"]
    assert group_of(cm, "sp_out0") is first and group_of(cm, "sp_out1") is second
    assert (first.width, second.width) == tuple(widths) and first.prunable and second.prunable
    np.testing.assert_array_equal(cm.positions("sp_out0"), cm.positions("a_out")[: widths[0]])
    np.testing.assert_array_equal(cm.positions("sp_out1"), cm.positions("a_out")[widths[0]:])
    # b and c feed a residual Add: their outputs are one group
    assert group_of(cm, "b_out") is group_of(cm, "c_out") and group_of(cm, "add_out").width == 4
    assert len(cm.prunable) == 3
    if mode == "num_outputs":  # keep 0, 1, 2 | 7: uneven parts afterwards
        picks, expected = {first.id: [0, 1, 2], second.id: [3]}, [3, 1]
    else:  # keep 0 | 5, 6
        picks, expected = {first.id: [0], second.id: [2, 3]}, [1, 2]
    pruned = checked_cut(cm, plan(cm, {**picks, "add_out": [1, 3]}), model)
    node = node_named(pruned, "sp")
    if mode == "attr":
        assert attr_of(node, "split") == expected and len(node.input) == 1
    else:
        assert inits_of(pruned)[node.input[1]].tolist() == expected
        assert attr_of(node, "num_outputs") is None
    assert input_value(pruned, "b", 1).shape == (2, expected[0], 3, 3)
    assert input_value(pruned, "c", 1).shape == (2, expected[1], 3, 3)
    assert input_value(pruned, "d", 1).shape == (2, 2, 3, 3)


def test_concat_on_channels_keeps_two_groups():
    n = Net()
    a = n.conv("x", 3, 4, name="a")
    b = n.conv("x", 3, 6, name="b")
    cat = n.op("Concat", [a, b], name="cat", axis=1)
    out = n.conv(cat, 10, 2, name="c")
    model = n.model(out)
    g, cm = analyzed(model)
    ga, gb = group_of(cm, "a_out"), group_of(cm, "b_out")
    assert ga is not gb and (ga.width, gb.width) == (4, 6) and len(cm.prunable) == 2
    assert cm.groups_of_tensor["cat_out"] == [ga, gb]
    np.testing.assert_array_equal(cm.positions("cat_out"),
                                  np.concatenate([cm.positions("a_out"), cm.positions("b_out")]))
    pruned = checked_cut(cm, plan(cm, {"a_out": [3], "b_out": [0, 2, 5]}), model)
    np.testing.assert_array_equal(input_value(pruned, "c", 1), inits_of(model)["c.w"][:, [3, 4, 6, 9]])


def test_concat_on_another_axis_ties_inputs():
    n = Net()
    a = n.conv("x", 3, 4, name="a")
    b = n.conv("x", 3, 4, name="b")
    cat = n.op("Concat", [a, b], name="cat", axis=2)  # along H: channel c of a and b is one channel
    out = n.conv(cat, 4, 2, name="c")
    model = n.model(out)
    g, cm = analyzed(model)
    grp = group_of(cm, "a_out")
    assert grp is group_of(cm, "b_out") is group_of(cm, "cat_out")
    assert grp.width == 4 and len(cm.prunable) == 1 and len(grp.sources) == 2
    pruned = checked_cut(cm, plan(cm, {"a_out": [0, 3]}), model)
    for conv in ("a", "b"):
        assert input_value(pruned, conv, 1).shape == (2, 3, 3, 3)
        assert input_value(pruned, conv, 2).shape == (2,)
    assert input_value(pruned, "c", 1).shape == (2, 2, 3, 3)


# --------------------------------------------------------------------------------------------------
# grouped, depthwise and transposed convolutions


def test_grouped_conv_ties_channels_across_groups():
    n = Net()
    a = n.conv("x", 3, 8, name="a")
    gc = n.conv(a, 8, 8, group=2, name="gc")  # 2 groups, 4 channels per group in and out
    out = n.conv(n.op("Relu", [gc]), 8, 2, name="c")
    model = n.model(out)
    g, cm = analyzed(model)
    ga, gg = group_of(cm, "a_out"), group_of(cm, "gc_out")
    assert ga is not gg and ga.width == 4 and gg.width == 4 and len(cm.prunable) == 2
    np.testing.assert_array_equal(cm.positions("a_out"), np.tile(ga.slots, 2))
    np.testing.assert_array_equal(cm.positions("gc_out"), np.tile(gg.slots, 2))
    pruned = checked_cut(cm, plan(cm, {"a_out": [1, 2], "gc_out": [0]}), model)
    assert input_value(pruned, "a", 1).shape == (4, 3, 3, 3)  # local 1, 2 of both groups: 1, 2, 5, 6
    np.testing.assert_array_equal(input_value(pruned, "a", 1), inits_of(model)["a.w"][[1, 2, 5, 6]])
    w = input_value(pruned, "gc", 1)
    assert w.shape == (2, 2, 3, 3)  # out 0 and 4; in 1, 2 of each group
    np.testing.assert_array_equal(w, inits_of(model)["gc.w"][[0, 4]][:, [1, 2]])
    assert attr_of(node_named(pruned, "gc"), "group") == 2
    assert input_value(pruned, "c", 1).shape == (2, 2, 3, 3)


def test_depthwise_conv_with_multiplier_2():
    n = Net()
    a = n.conv("x", 3, 4, name="a")
    dw = n.conv(a, 4, 8, group=4, name="dw")  # weight [8, 1, 3, 3]: outputs 2k, 2k+1 read input k
    out = n.conv(dw, 8, 2, name="c")
    model = n.model(out)
    g, cm = analyzed(model)
    grp = group_of(cm, "a_out")
    assert grp is group_of(cm, "dw_out") and grp.width == 4 and len(cm.prunable) == 1
    np.testing.assert_array_equal(cm.positions("dw_out"), np.repeat(cm.positions("a_out"), 2))
    pruned = checked_cut(cm, plan(cm, {"a_out": [1, 3]}), model)
    np.testing.assert_array_equal(input_value(pruned, "dw", 1), inits_of(model)["dw.w"][[2, 3, 6, 7]])
    np.testing.assert_array_equal(input_value(pruned, "dw", 2), inits_of(model)["dw.b"][[2, 3, 6, 7]])
    assert attr_of(node_named(pruned, "dw"), "group") == 2
    assert input_value(pruned, "c", 1).shape == (2, 4, 3, 3)


def _conv_t(n, x, cin, cout, group, name, k=2):
    w = n.const(n.rng.normal(0, 0.3, (cin, cout // group, k, k)), f"{name}.w")
    b = n.const(n.rng.uniform(-0.5, 0.5, cout), f"{name}.b")
    return n.op("ConvTranspose", [x, w, b], name=name, kernel_shape=[k, k], strides=[2, 2], group=group)


def test_conv_transpose_creates_and_consumes_channels():
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    up = _conv_t(n, a, 6, 5, 1, "up")
    out = n.conv(up, 5, 2, name="c")
    model = n.model(out)
    g, cm = analyzed(model)
    ga, gu = group_of(cm, "a_out"), group_of(cm, "up_out")
    assert ga is not gu and (ga.width, gu.width) == (6, 5) and len(cm.prunable) == 2
    assert [s.axis for s in gu.sources] == [1]  # ConvTranspose filters: weight axis 1
    pruned = checked_cut(cm, plan(cm, {"a_out": [0, 1, 5], "up_out": [2, 4]}), model)
    np.testing.assert_array_equal(input_value(pruned, "up", 1), inits_of(model)["up.w"][[0, 1, 5]][:, [2, 4]])
    assert input_value(pruned, "up", 2).tolist() == inits_of(model)["up.b"][[2, 4]].tolist()
    assert input_value(pruned, "c", 1).shape == (2, 2, 3, 3)


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv_transpose(mult):
    n = Net()
    a = n.conv("x", 3, 4, name="a")
    up = _conv_t(n, a, 4, 4 * mult, 4, "up")  # weight [4, mult, 2, 2]
    out = n.conv(up, 4 * mult, 2, name="c")
    model = n.model(out)
    g, cm = analyzed(model)
    grp = group_of(cm, "a_out")
    assert grp is group_of(cm, "up_out") and grp.width == 4 and len(cm.prunable) == 1
    np.testing.assert_array_equal(cm.positions("up_out"), np.repeat(cm.positions("a_out"), mult))
    pruned = checked_cut(cm, plan(cm, {"a_out": [0, 2, 3]}), model)
    np.testing.assert_array_equal(input_value(pruned, "up", 1), inits_of(model)["up.w"][[0, 2, 3]])
    assert input_value(pruned, "up", 2).shape == (3 * mult,)
    assert attr_of(node_named(pruned, "up"), "group") == 3
    assert input_value(pruned, "c", 1).shape == (2, 3 * mult, 3, 3)


# --------------------------------------------------------------------------------------------------
# elementwise with per-channel constants


def test_prelu_slope_is_sliced():
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    p = n.op("PRelu", [a, n.const(n.rng.uniform(0.1, 0.3, (6, 1, 1)), "slope")], name="pr")
    out = n.conv(p, 6, 2, name="c")
    model = n.model(out)
    g, cm = analyzed(model)
    grp = group_of(cm, "a_out")
    assert grp.prunable and "pr_out" in grp.tensors and len(cm.prunable) == 1
    pruned = checked_cut(cm, plan(cm, {"a_out": [1, 2, 4]}), model)
    np.testing.assert_array_equal(input_value(pruned, "pr", 1), inits_of(model)["slope"][[1, 2, 4]])


def test_mul_by_per_channel_and_scalar_constants():
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    y = n.op("Mul", [a, n.const(n.rng.uniform(0.5, 1.5, (6, 1, 1)), "s3")], name="m3")
    y = n.op("Mul", [n.const(n.rng.uniform(0.5, 1.5, (1, 6, 1, 1)), "s4"), y], name="m4")  # constant first
    y = n.op("Mul", [y, n.const(np.float32(1.5), "scalar")], name="m0")
    y = n.op("Add", [y, n.const(n.rng.uniform(-1, 1, (1, 6, 1, 1)), "shift")], name="add")
    out = n.conv(y, 6, 2, name="c")
    model = n.model(out)
    g, cm = analyzed(model)
    grp = group_of(cm, "a_out")
    assert grp.prunable and {"m3_out", "m4_out", "m0_out", "add_out"} <= set(grp.tensors)
    assert len(cm.prunable) == 1
    kept = [0, 5]
    pruned = checked_cut(cm, plan(cm, {"a_out": kept}), model)
    orig = inits_of(model)
    np.testing.assert_array_equal(input_value(pruned, "m3", 1), orig["s3"][kept])
    np.testing.assert_array_equal(input_value(pruned, "m4", 0), orig["s4"][:, kept])
    assert input_value(pruned, "m0", 1).shape == () and float(input_value(pruned, "m0", 1)) == 1.5
    assert input_value(pruned, "add", 1).shape == (1, 2, 1, 1)


# --------------------------------------------------------------------------------------------------
# Pad, Resize


def test_pad_on_spatial_axes_passes():
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    p = n.op("Pad", [a, n.const([0, 0, 1, 2, 0, 0, 1, 2], "pads", np.int64)], name="pad")
    out = n.conv(p, 6, 2, name="c")
    model = n.model(out)
    g, cm = analyzed(model)
    grp = group_of(cm, "a_out")
    assert grp.prunable and "pad_out" in grp.tensors
    pruned = checked_cut(cm, plan(cm, {"a_out": [2, 3]}), model)
    assert input_value(pruned, "pad", 1).tolist() == [0, 0, 1, 2, 0, 0, 1, 2]
    assert input_value(pruned, "c", 1).shape == (2, 2, 3, 3)


def test_pad_on_channel_axis_is_blocked():
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    p = n.op("Pad", [a, n.const([0, 1, 0, 0, 0, 1, 0, 0], "pads", np.int64)], name="pad")
    out = n.conv(p, 8, 2, name="c")
    g, cm = analyzed(n.model(out))
    grp = group_of(cm, "a_out")
    assert not grp.prunable and grp.reasons == ["Pad 'pad': pads the channel axis"]
    assert cm.prunable == []


def test_resize_with_scales():
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    r = n.op("Resize", [a, "", n.const([1, 1, 2, 2], "scales")], name="rs", mode="nearest")
    out = n.conv(r, 6, 2, name="c")
    model = n.model(out)
    g, cm = analyzed(model)
    grp = group_of(cm, "a_out")
    assert grp.prunable and cm.tensor_axis["rs_out"] == 1 and g.shape("rs_out") == (1, 6, 16, 16)
    pruned = checked_cut(cm, plan(cm, {"a_out": [0, 1, 2, 3, 4]}), model)
    assert input_value(pruned, "rs", 2).tolist() == [1, 1, 2, 2]
    assert input_value(pruned, "c", 1).shape == (2, 5, 3, 3)


def test_resize_with_sizes_rewrites_channel_count():
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    r = n.op("Resize", [a, "", "", n.const([1, 6, 12, 12], "sizes", np.int64)], name="rs", mode="nearest")
    out = n.conv(r, 6, 2, name="c")
    model = n.model(out)
    g, cm = analyzed(model)
    grp = group_of(cm, "a_out")
    assert grp.prunable and g.shape("rs_out") == (1, 6, 12, 12)
    pruned = checked_cut(cm, plan(cm, {"a_out": [1, 4]}), model, batch=1)
    assert input_value(pruned, "rs", 3).tolist() == [1, 2, 12, 12]


# --------------------------------------------------------------------------------------------------
# the channel axis moves


def test_transpose_squeeze_unsqueeze_move_the_channel_axis():
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    t = n.op("Transpose", [a], name="nhwc", perm=[0, 2, 3, 1])
    t = n.op("Relu", [t], name="relu")
    t = n.op("Transpose", [t], name="nchw", perm=[0, 3, 1, 2])
    u = n.op("Unsqueeze", [t, n.const([0], "uax", np.int64)], name="unsq")
    s = n.op("Squeeze", [u, n.const([0], "sax", np.int64)], name="sq")
    out = n.conv(s, 6, 2, name="c")
    model = n.model(out)
    g, cm = analyzed(model)
    grp = group_of(cm, "a_out")
    assert grp.prunable and len(cm.prunable) == 1
    axes = {t: cm.tensor_axis[t] for t in ("a_out", "nhwc_out", "relu_out", "nchw_out", "unsq_out", "sq_out")}
    assert axes == {"a_out": 1, "nhwc_out": 3, "relu_out": 3, "nchw_out": 1, "unsq_out": 2, "sq_out": 1}
    assert set(axes) <= set(grp.tensors)
    pruned = checked_cut(cm, plan(cm, {"a_out": [0, 3, 5]}), model)
    assert input_value(pruned, "c", 1).shape == (2, 3, 3, 3)


def test_channels_last_into_matmul_consumes_channels():
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    t = n.op("Transpose", [a], name="nhwc", perm=[0, 2, 3, 1])
    out = n.op("MatMul", [t, n.const(n.rng.normal(0, 0.3, (6, 4)), "fc.w")], name="fc")
    model = n.model(out)
    g, cm = analyzed(model)
    grp = group_of(cm, "a_out")
    assert grp.prunable and cm.tensor_axis["fc_out"] == 3
    assert not group_of(cm, "fc_out").prunable
    pruned = checked_cut(cm, plan(cm, {"a_out": [1, 2]}), model)
    np.testing.assert_array_equal(input_value(pruned, "fc", 1), inits_of(model)["fc.w"][[1, 2]])


# --------------------------------------------------------------------------------------------------
# reductions, softmax


@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_mean_over_spatial_axes_passes(opset):
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    if opset < 18:
        r = n.op("ReduceMean", [a], name="rm", axes=[2, 3], keepdims=1)
    else:
        r = n.op("ReduceMean", [a, n.const([-2, -1], "rax", np.int64)], name="rm", keepdims=1)
    out = n.conv(r, 6, 2, k=1, name="c")
    model = n.model(out, opset=opset)
    g, cm = analyzed(model)
    grp = group_of(cm, "a_out")
    assert grp.prunable and "rm_out" in grp.tensors and g.shape("rm_out") == (1, 6, 1, 1)
    pruned = checked_cut(cm, plan(cm, {"a_out": [2, 3, 4]}), model)
    assert input_value(pruned, "c", 1).shape == (2, 3, 1, 1)


def test_reduce_mean_over_channels_is_blocked():
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    r = n.op("ReduceMean", [a], name="rm", axes=[1], keepdims=1)
    out = n.conv(r, 1, 2, name="c")
    g, cm = analyzed(n.model(out))
    grp = group_of(cm, "a_out")
    assert not grp.prunable and grp.reasons == ["ReduceMean 'rm': reduces across channels"]


def test_softmax_over_channels_is_blocked():
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    s = n.op("Softmax", [a], name="sm", axis=1)
    out = n.conv(s, 6, 2, name="c")
    g, cm = analyzed(n.model(out))
    grp = group_of(cm, "a_out")
    assert not grp.prunable and grp.reasons == ["Softmax 'sm': normalizes across channels"]
    # past the softmax every channel depends on all: the consumer's input channels are blocked too
    assert group_of(cm, "sm_out").reasons == ["comes from Softmax 'sm', which carries no channel mapping"]
    assert cm.prunable == []


# --------------------------------------------------------------------------------------------------
# blocks: ops without handler, graph outputs


def test_op_without_handler_blocks_with_its_name():
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    nz = n.op("NonZero", [a], name="nz")
    out = n.conv(n.op("Relu", [a]), 6, 2, name="c")
    model = n.model([out, nz])
    g, cm = analyzed(model)
    grp = group_of(cm, "a_out")
    assert not grp.prunable and grp.width == 6
    assert grp.reasons == ["feeds NonZero 'nz', which has no channel handler"]
    assert handler_for("NonZero") is None


def test_custom_domain_op_blocks_with_its_name():
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    b = n.conv("x", 3, 4, name="b")
    n.op("Foo", [a], name="foo", domain="my.ops")
    out = n.conv(n.op("Relu", [b]), 4, 2, name="c")
    model = n.model(out, extra_opsets=[("my.ops", 1)])
    model.graph.output.append(helper.make_tensor_value_info("foo_out", TensorProto.FLOAT, None))
    g, cm = analyzed(model)
    ga = group_of(cm, "a_out")
    assert not ga.prunable and ga.reasons == ["feeds my.ops.Foo 'foo', which has no channel handler"]
    assert handler_for("Relu", "my.ops") is None
    gb = group_of(cm, "b_out")  # the rest of the graph is still analysed
    assert gb.prunable and gb.width == 4 and cm.prunable == [gb]


def test_tensor_read_inside_a_subgraph_blocks_and_outer_initializers_survive_the_cut():
    """An If body reads the conv output and an initializer from the outer scope (not node inputs)."""
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    c = n.conv(n.op("Relu", [a]), 6, 2, name="c")
    two, cond = n.const(np.float32(2.0), "two"), n.const(np.array(True), "cond", dtype=bool)
    out_vi = [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["N", 2, 8, 8])]
    then_g = helper.make_graph([helper.make_node("Mul", [c, two], ["t_out"])], "then", [], out_vi)
    else_g = helper.make_graph([helper.make_node("Identity", [c], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["N", 2, 8, 8])])
    n.nodes.append(helper.make_node("If", [cond], ["y"], name="if", then_branch=then_g, else_branch=else_g))
    model = n.model("y")
    g, cm = analyzed(model)
    assert group_of(cm, "c_out").reasons == ["feeds If 'if', which has no channel handler"]
    assert cm.prunable == [group_of(cm, "a_out")]
    pruned = checked_cut(cm, plan(cm, {"a_out": [0, 4]}), model)
    assert "two" in inits_of(pruned) and input_value(pruned, "c", 1).shape == (2, 2, 3, 3)


def test_graph_output_blocks():
    n = Net()
    a = n.conv("x", 3, 6, name="a")
    r = n.op("Relu", [a], name="r")
    out = n.conv(r, 6, 2, name="c")
    g, cm = analyzed(n.model([out, r]))
    grp = group_of(cm, "a_out")
    assert not grp.prunable and grp.reasons == ["reaches model output 'r_out'"]
    assert group_of(cm, "c_out").reasons == ["reaches model output 'c_out'"]
    assert group_of(cm, "x").reasons == ["comes from model input 'x'"]
    assert cm.prunable == [] and cm.prunable_macs_fraction() == 0.0


# --------------------------------------------------------------------------------------------------
# shared initializers, folding


def test_initializer_shared_by_two_groups_is_cloned():
    n = Net()
    bias = n.const(n.rng.uniform(-0.5, 0.5, 6), "shared.b")
    a = n.conv("x", 3, 6, name="a", bias_name=bias)
    b = n.conv("x", 3, 6, name="b", bias_name=bias)
    ya, yb = n.conv(n.op("Relu", [a]), 6, 2, name="ca"), n.conv(n.op("Relu", [b]), 6, 2, name="cb")
    out = n.op("Add", [ya, yb], name="add")
    model = n.model(out)
    g, cm = analyzed(model)
    ga, gb = group_of(cm, "a_out"), group_of(cm, "b_out")
    assert ga is not gb and ga.prunable and gb.prunable
    original = inits_of(model)["shared.b"]
    # both groups cut differently: two clones, the original is gone
    pruned = checked_cut(cm, plan(cm, {"a_out": [0, 1], "b_out": [2, 3, 5]}), model)
    ba, bb = node_named(pruned, "a").input[2], node_named(pruned, "b").input[2]
    assert ba != bb and "shared.b" not in inits_of(pruned)
    np.testing.assert_array_equal(inits_of(pruned)[ba], original[[0, 1]])
    np.testing.assert_array_equal(inits_of(pruned)[bb], original[[2, 3, 5]])
    # only one cut: it gets a clone, the other keeps the original initializer
    pruned = checked_cut(cm, plan(cm, {"a_out": [4]}), model)
    ba, bb = node_named(pruned, "a").input[2], node_named(pruned, "b").input[2]
    assert bb == "shared.b" and ba != bb
    np.testing.assert_array_equal(inits_of(pruned)[bb], original)
    np.testing.assert_array_equal(inits_of(pruned)[ba], original[[4]])


def test_initializer_shared_within_one_group_is_cut_in_place():
    n = Net()
    w = n.const(n.rng.normal(0, 0.3, (6, 3, 3, 3)), "shared.w")
    bias = n.const(n.rng.uniform(-0.5, 0.5, 6), "shared.b")
    a = n.conv("x", 3, 6, name="a", weight=w, bias_name=bias)
    b = n.conv(n.op("Neg", ["x"]), 3, 6, name="b", weight=w, bias_name=bias)
    out = n.conv(n.op("Add", [a, b], name="add"), 6, 2, name="c")  # the Add ties a and b
    model = n.model(out)
    g, cm = analyzed(model)
    assert group_of(cm, "a_out") is group_of(cm, "b_out") and len(cm.prunable) == 1
    pruned = checked_cut(cm, plan(cm, {"a_out": [1, 3]}), model)
    inits = inits_of(pruned)
    assert node_named(pruned, "a").input[1:] == node_named(pruned, "b").input[1:] == ["shared.w", "shared.b"]
    assert not any("__aofp" in name for name in inits)
    np.testing.assert_array_equal(inits["shared.w"], inits_of(model)["shared.w"][[1, 3]])


def test_identity_of_initializer_weights_are_folded_and_prunable():
    """torch's exporter writes deduplicated parameters as Identity(initializer)."""
    n = Net()
    w = n.op("Identity", [n.const(n.rng.normal(0, 0.3, (6, 3, 3, 3)), "a.w.src")], name="w_alias")
    b = n.op("Identity", [n.const(n.rng.uniform(-0.5, 0.5, 6), "a.b.src")], name="b_alias")
    a = n.conv("x", 3, 6, name="a", weight=w, bias_name=b)
    out = n.conv(n.op("Relu", [a]), 6, 2, name="c")
    model = n.model(out)
    g, cm = analyzed(model)
    assert [nd.op_type for nd in g.model.graph.node] == ["Conv", "Relu", "Conv"]
    assert {"w_alias_out", "b_alias_out"} <= set(g.inits)
    grp = group_of(cm, "a_out")
    assert grp.prunable and grp.width == 6 and len(grp.sources) == 1
    pruned = checked_cut(cm, plan(cm, {"a_out": [0, 2, 4]}), model)
    np.testing.assert_array_equal(input_value(pruned, "a", 1), inits_of(model)["a.w.src"][[0, 2, 4]])
    np.testing.assert_array_equal(input_value(pruned, "a", 2), inits_of(model)["a.b.src"][[0, 2, 4]])


def test_constant_node_weights_are_folded_and_prunable():
    """Paddle2ONNX writes every weight as a Constant node."""
    n = Net()
    w = n.const_node(n.rng.normal(0, 0.3, (6, 3, 3, 3)), "a.w")
    b = n.const_node(n.rng.uniform(-0.5, 0.5, 6), "a.b")
    a = n.conv("x", 3, 6, name="a", weight=w, bias_name=b)
    slope = n.const_node(n.rng.uniform(0.1, 0.3, (6, 1, 1)), "slope")
    out = n.conv(n.op("PRelu", [a, slope], name="pr"), 6, 2, name="c")
    model = n.model(out, opset=11)
    assert not model.graph.initializer[0].name.startswith("a.")  # a.w, a.b, slope are nodes here
    g, cm = analyzed(model)
    assert "Constant" not in {nd.op_type for nd in g.model.graph.node}
    assert {"a.w", "a.b", "slope"} <= set(g.inits)
    grp = group_of(cm, "a_out")
    assert grp.prunable and grp.width == 6
    pruned = checked_cut(cm, plan(cm, {"a_out": [5]}), model)
    assert input_value(pruned, "a", 1).shape == (1, 3, 3, 3)
    assert input_value(pruned, "a", 2).shape == (1,)
    assert input_value(pruned, "pr", 1).shape == (1, 1, 1)
    assert reference_macs.count_params(pruned) < reference_macs.count_params(model)


# --------------------------------------------------------------------------------------------------
# registry


def test_registry_refuses_duplicate_registration():
    before = handler_for("Conv")
    assert before is not None and "Conv" in supported_ops()
    n_ops = len(supported_ops())

    class Another(Handler):
        def analyze(self, node, ctx):
            raise AssertionError("never called")

    with pytest.raises(ValueError, match="Conv"):
        register("Conv")(Another)
    with pytest.raises(ValueError, match="Relu"):
        register("AofpTestOnlyOp", "Relu")(Another)
    assert handler_for("Conv") is before
    assert handler_for("AofpTestOnlyOp") is None  # a refused registration leaves nothing behind
    with pytest.raises(ValueError, match="AofpTestOnlyOp"):
        register("AofpTestOnlyOp", "AofpTestOnlyOp")(Another)
    assert handler_for("AofpTestOnlyOp") is None
    assert len(supported_ops()) == n_ops
