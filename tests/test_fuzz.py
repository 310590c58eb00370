"""Fuzzing the cut: random CNN graphs (tests/fuzzgraphs.py) × random plans, every cut proven.

For each case every prunable group keeps a random non-empty subset; the cut must pass onnx.checker
(full check), run in onnxruntime, equal the masked original (`verify`, relative diff ≤ 1e-4, outputs
and every counted layer), and have exactly the MACs `cm.macs(keep)` predicts, counted independently
by tests/reference_macs.py from a real run of the pruned model.

CI runs `AOFP_FUZZ_EXAMPLES` examples (default 200, a fixed derandomized sequence so CI is
reproducible); setting the variable also makes the run random, e.g. `AOFP_FUZZ_EXAMPLES=2000 pytest
tests/test_fuzz.py`. `benchmarks/fuzz.py` runs the same builder on a thousand seeded graphs.
Graphs that once failed are kept below as explicit regression tests.

Exporter conventions (fuzzgraphs.Conventions: pinned / -1 batch, Constant-node weights, Paddle bias
reshapes, NHWC with Transposes, float16, opsets 11-21) are drawn for every graph; each is also forced on a
few seeded graphs that go through the CLI (tests/fuzzcli.py: `prune` and `apply` with `--calib random:8`,
then a run of the written model), so a failure names the convention.
"""
from __future__ import annotations

import collections
import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzcli
import fuzzgraphs as fg

EXAMPLES = int(os.environ.get("AOFP_FUZZ_EXAMPLES", "200"))


def assert_proven(outcome: fg.Outcome, plans: int) -> None:
    assert outcome.plans == plans
    assert outcome.ok, "\n".join(f"[{kind}] {msg}" for kind, msg in outcome.failures)


@settings(max_examples=EXAMPLES, deadline=None, derandomize="AOFP_FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
@given(case=fg.graphs(), plan_seed=st.integers(0, 2**32 - 1))
def test_random_graph_random_plan_cut_is_proven(case, plan_seed):
    assert_proven(fg.check_case(case.model, case.input_shape, [plan_seed], case.batch), 1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_seeded_graphs_from_the_benchmark_generator(seed):
    """The benchmark's numpy-driven generator, a few fixed seeds, three plans each."""
    case = fg.random_case(seed)
    assert_proven(fg.check_case(case.model, case.input_shape, [seed, seed + 1000, seed + 2000], case.batch), 3)


def test_generator_covers_every_block_opset_and_weight_style():
    """200 seeded graphs: all valid, and between them every block kind, head, opset and style occurs."""
    seen = collections.Counter()
    ops = collections.Counter()
    for seed in range(200):
        case = fg.random_case(seed)
        onnx.checker.check_model(case.model, full_check=True)
        assert case.model.ir_version == max(fg.IR_VERSION, onnx.helper.find_min_ir_version_for(case.model.opset_import))
        spatial = case.input_shape[1:3] if "nhwc" in case.conventions else case.input_shape[2:]
        assert case.input_shape[0] == 1 and 3 in case.input_shape and all(8 <= d <= 16 for d in spatial)
        layers = sum(n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") for n in case.model.graph.node)
        assert 1 <= layers <= fg.MAX_LAYERS
        seen[f"opset{case.model.opset_import[0].version}"] += 1
        seen.update(case.description)
        seen.update(case.conventions)
        ops.update(n.op_type for n in case.model.graph.node)
        if any(n.op_type == "Constant" for n in case.model.graph.node):
            seen["constant-node weights"] += 1
    for key in ("opset11", "opset13", "opset17", "style=init", "style=constant", "style=mixed", "sharing=share",
                "sharing=dedupe", "twice", "residual", "add_earlier", "concat_earlier", "concat_h", "se1",
                "constant-node weights", "reshape_spatial", "shuffle", "LRN", "softmax_c", "spatial_attention",
                "depth_to_space", "inits_as_inputs", "value_info", "Sum", "Max", "batch=dynamic", "batch=pinned",
                "batch=minus1", "pinned_in_reshape", "paddle_bias", "nhwc", "fp16", "fp16-io32", "nhwc_bias",
                *(f"opset{v}" for v in fg.OPSETS)):
        assert seen[key] > 0, key
    for prefix in ("gap_gemmx", "flatten_gemmx", "reshape_matmulx", "slice[", "split[", "dw", "grouped", "convT",
                   "resizesizes", "resizescales", "pad", "nhwc_linear", "squeeze_gemmx", "reduce_gemmx"):
        assert any(k.startswith(prefix) for k in seen), prefix
    for op in ("Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "Relu", "Clip", "HardSwish",
               "Sigmoid", "LeakyRelu", "PRelu", "HardSigmoid", "Add", "Mul", "Concat", "Split", "Slice",
               "GlobalAveragePool", "MaxPool", "AveragePool", "Resize", "Flatten", "Gemm", "Reshape", "MatMul",
               "Constant", "Pad", "ReduceMean", "Squeeze", "Transpose", "LRN", "DepthToSpace", "Softmax", "Sum"):
        assert ops[op] > 0, op
    assert 0 < sum(fg.random_case(s).batch == 2 for s in range(40)) < 40  # dynamic batch, fed 2 samples


def _declared_batch(case):
    return case.model.graph.input[0].type.tensor_type.shape.dim[0]


def test_each_switch_forces_its_convention():
    """`random_case(seed, NAME)` has convention NAME on, and the graph is valid and runs (on `case.batch` samples)."""
    import onnxruntime as ort

    for name in ("pinned", "minus1", "constant", "paddle_bias", "nhwc", "fp16", "fp16-io32", "opset11", "opset21"):
        for seed in range(3):
            case = fg.random_case(seed, name)
            onnx.checker.check_model(case.model, full_check=name != "minus1")  # (onnx aborts on some -1 graphs)
            feeds = fg.feeds_for((case.batch, *case.input_shape[1:]), n_batches=1, dtype=fg.input_dtype(case.model))
            ort.InferenceSession(case.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds[0])
            tags, graph = case.conventions, case.model.graph
            assert {"pinned": "batch=pinned" in tags and _declared_batch(case).dim_value == 1 and case.batch == 1,
                    "minus1": "batch=minus1" in tags and _declared_batch(case).dim_value == -1,
                    "constant": "weights=constant" in tags and not graph.initializer,
                    "paddle_bias": "paddle_bias" in tags,
                    "nhwc": "nhwc" in tags and case.input_shape[3] == 3 and graph.node[0].op_type == "Transpose",
                    "fp16": "fp16" in tags and fg.input_dtype(case.model) == np.float16 and fg.is_float16(case.model),
                    "fp16-io32": "fp16-io32" in tags and fg.input_dtype(case.model) == np.float32
                    and fg.is_float16(case.model),
                    "opset11": case.model.opset_import[0].version == 11,
                    "opset21": case.model.opset_import[0].version == 21}[name], (name, seed, tags)


@pytest.mark.parametrize("convention", ["dynamic", "pinned", "minus1", "constant", "paddle_bias", "nhwc", "fp16",
                                        "fp16-io32", "opset11", "opset21"])
def test_convention_through_the_cli(convention, tmp_path):
    """Two seeded graphs with the convention on: the API check and the CLI check (multi-sample calibration) pass."""
    for seed in (0, 1):
        case = fg.random_case(seed, convention)
        failures = fg.check_case(case.model, case.input_shape, [seed], case.batch).failures
        folder = tmp_path / str(seed)
        folder.mkdir()
        failures += fuzzcli.check_case_cli(case, seed, folder)
        assert not failures, f"{convention} seed {seed} {case.conventions}: " + "\n".join(
            f"[{kind}] {msg.strip().splitlines()[-1][:400]}" for kind, msg in failures)


@pytest.mark.parametrize("seed", [24, 48])
def test_conventions_combined_through_the_cli(seed, tmp_path):
    """Benchmark seeds where conventions meet (24: float16 with a pinned batch; 48: float16 under a dynamic
    batch that a Reshape pins): once exit 1 — the working copy of a pinned batch lost the float16 types."""
    case = fg.random_case(seed)
    assert {"fp16", "batch=pinned" if seed == 24 else "pinned_in_reshape"} <= set(case.conventions)
    failures = fuzzcli.check_case_cli(case, seed, tmp_path)
    assert not failures, "\n".join(f"[{kind}] {msg.strip().splitlines()[-1][:400]}" for kind, msg in failures)


def test_random_keep_keeps_a_nonempty_subset_of_every_group():
    case = fg.random_case(11)
    from aofp_onnx.graph import Graph
    from aofp_onnx.groups import analyze

    cm = analyze(Graph.from_model(fg._copy(case.model), {fg.INPUT: case.input_shape}))
    assert cm.prunable
    modes = collections.Counter()
    for seed in range(50):
        keep = fg.random_keep(cm, seed)
        assert keep[-1]  # the always-kept slot of blocked channels
        for g in cm.prunable:
            k = int(keep[g.slots].sum())
            assert 1 <= k <= g.width
            modes["one" if k == 1 else "all" if k == g.width else "some"] += 1
    assert modes["one"] and modes["all"] and modes["some"]


# --------------------------------------------------------------------------------------------------
# regression tests: minimal graphs the fuzzer once broke (shrunk by hypothesis), kept explicit


def _model(nodes, inits, out_shape, opset=13, x_shape=(1, 3, 8, 8)):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "regression",
                              [helper.make_tensor_value_info(fg.INPUT, TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=fg.IR_VERSION)


def _analysis(model, x_shape=(1, 3, 8, 8)):
    from aofp_onnx.graph import Graph
    from aofp_onnx.groups import analyze

    return analyze(Graph.from_model(fg._copy(model), {fg.INPUT: x_shape}))


def _w(*shape, seed=0):
    return np.random.default_rng(seed).normal(0, 0.5, shape).astype(np.float32)


def test_regression_one_channel_reshaped_to_positions_keeps_its_axis():
    """Shrunk from benchmark seeds 700109 / 700028: a 1-channel map [1, 1, H, W] reshaped to
    [1, 1, H·W] (and back) had its channel put on axis 0 (the batch dim, also of size 1): the next
    Conv saw 'channels not on axis 1', was blocked and its MACs were not counted (predicted 1427,
    counted 1832). Fixed in channels/layout.py `_merged_axis`: C = 1 keeps its axis when it fits."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(_w(1, 3, 3, 3), "w1"), numpy_helper.from_array(_w(4, 1, 3, 3, seed=1), "w2"),
             numpy_helper.from_array(np.array([1, 1, 64], np.int64), "flat"),
             numpy_helper.from_array(np.array([1, 1, 8, 8], np.int64), "back")]
    nodes = [helper.make_node("Conv", [fg.INPUT, "w1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Reshape", ["c1", "flat"], ["r1"]),
             helper.make_node("Softmax", ["r1"], ["s1"], axis=-1),
             helper.make_node("Reshape", ["s1", "back"], ["r2"]),
             helper.make_node("Conv", ["r2", "w2"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)]
    model = _model(nodes, inits, [1, 4, 8, 8])
    cm = _analysis(model)
    assert cm.tensor_axis["r1"] == 1 and cm.tensor_axis["r2"] == 1
    assert cm.total_macs == 64 * 27 + 4 * 64 * 9 == 4032
    c1 = cm.by_id["c1"]
    assert c1.prunable and c1.width == 1
    assert_proven(fg.check_case(model, (1, 3, 8, 8), [0, 1]), 2)


@pytest.mark.parametrize("variant", ["channels_on_axis_2", "computed_weight", "gemm_trans_a"])
def test_regression_blocked_conv_and_gemm_still_count_their_macs(variant):
    """Found with the case above: a Conv blocked for any reason (input channels on another axis,
    weights computed in the graph) and a blocked Gemm (transA=1) were left out of the MACs
    altogether, so `cm.macs` disagreed with the model's real count. Fixed in channels/conv.py and
    channels/dense.py: a blocked node is counted at full width (it scales with no prunable group)."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(_w(6, 3, 3, 3), "w1")]
    nodes = [helper.make_node("Conv", [fg.INPUT, "w1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"])]
    if variant == "channels_on_axis_2":  # [1, 6, 8, 8] → [1, 8, 6, 8]: rows become the next conv's channels
        nodes.append(helper.make_node("Transpose", ["r1"], ["t1"], perm=[0, 2, 1, 3]))
        inits.append(numpy_helper.from_array(_w(5, 8, 1, 1, seed=2), "w2"))
        nodes.append(helper.make_node("Conv", ["t1", "w2"], ["y"], kernel_shape=[1, 1]))
        out_shape, blocked_macs = [1, 5, 6, 8], 5 * 6 * 8 * 8
    elif variant == "computed_weight":  # W' = W · s with s read from the input: a weight only known at run time
        inits.append(numpy_helper.from_array(_w(5, 6, 3, 3, seed=2), "w2"))  # (W · constant is folded at load)
        nodes.append(helper.make_node("ReduceMax", [fg.INPUT], ["s"], keepdims=0))
        nodes.append(helper.make_node("Mul", ["w2", "s"], ["w2s"]))
        nodes.append(helper.make_node("Conv", ["r1", "w2s"], ["y"], kernel_shape=[3, 3], pads=[1] * 4))
        out_shape, blocked_macs = [1, 5, 8, 8], 5 * 64 * 6 * 9
    else:  # Gemm with transA=1 over [C·H·W, 1]
        inits += [numpy_helper.from_array(np.array([384, 1], np.int64), "col"),
                  numpy_helper.from_array(_w(384, 7, seed=2), "fc")]
        nodes.append(helper.make_node("Reshape", ["r1", "col"], ["v"]))
        nodes.append(helper.make_node("Gemm", ["v", "fc"], ["y"], transA=1))
        out_shape, blocked_macs = [1, 7], 384 * 7
    model = _model(nodes, inits, out_shape)
    cm = _analysis(model)
    assert cm.total_macs == 6 * 64 * 27 + blocked_macs
    assert not cm.prunable  # every group touches the blocked node (or the input/output)
    import reference_macs

    assert reference_macs.count_macs(model, fg.feeds_for((1, 3, 8, 8))[0]) == cm.total_macs
    assert_proven(fg.check_case(model, (1, 3, 8, 8), [0]), 1)


def test_regression_cut_adds_no_value_info_that_breaks_onnxruntime():
    """Shrunk from benchmark seed 700820: an old-style export (initializers also listed as graph
    inputs, dynamic batch) with Conv → Transpose → MatMul → Transpose → Resize(roi, sizes) → ReduceMean
    → Gemm. The file has no value_info and runs; the cut re-inferred value_info, and with those shapes
    onnxruntime's transpose optimizer (ORT_ENABLE_ALL, the default) pushed the Transpose through the
    Resize and gathered from its empty, non-constant roi: 'Gather ... indices element out of data
    bounds' at session run. The original with onnx-inferred value_info fails the same way (an
    onnxruntime bug); fixed in surgery.py by re-inferring value_info only for files that had some."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(_w(4, 3, 1, 1), "w1"), numpy_helper.from_array(_w(4, 5, seed=1), "m"),
             numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
             numpy_helper.from_array(np.array([1, 5, 16, 16], np.int64), "sizes"),
             numpy_helper.from_array(_w(5, 3, seed=2), "fc")]
    nodes = [helper.make_node("Conv", [fg.INPUT, "w1"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t", "m"], ["mm"]),
             helper.make_node("Transpose", ["mm"], ["tb"], perm=[0, 3, 1, 2]),
             helper.make_node("Resize", ["tb", "roi", "", "sizes"], ["r"], mode="nearest"),
             helper.make_node("ReduceMean", ["r"], ["p"], axes=[2, 3], keepdims=0),
             helper.make_node("Gemm", ["p", "fc"], ["y"])]
    model = _model(nodes, inits, ["N", 3], x_shape=["N", 3, 8, 8])
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits)
    x = fg.feeds_for((1, 3, 8, 8))[0]
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)  # runs
    with pytest.raises(Exception, match="Gather"):  # the onnxruntime bug: the same file with inferred value_info
        ort.InferenceSession(onnx.shape_inference.infer_shapes(model).SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, x)
    cm = _analysis(model)
    assert sorted(g.id for g in cm.prunable) == ["c", "mm"]
    from aofp_onnx.surgery import cut

    keep = cm.full_keep()
    keep[cm.by_id["c"].slots] = [True, False, True, False]
    keep[cm.by_id["mm"].slots] = [False, True, True, False, True]
    pruned = cut(cm, keep).materialize()
    y = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert not pruned.graph.value_info
    assert y.shape == (1, 3) and np.all(np.isfinite(y))
    assert_proven(fg.check_case(model, (1, 3, 8, 8), [0, 1, 2]), 3)


def test_value_info_of_a_file_that_has_some_is_reinferred_after_the_cut():
    """The other side of the fix above: value_info present in the file is dropped and re-inferred."""
    case = next(c for c in map(fg.random_case, range(100))
                if "value_info" in c.description and len(c.model.graph.value_info) > 3)
    from aofp_onnx.surgery import cut

    cm = _analysis(case.model, case.input_shape)
    keep = fg.random_keep(cm, 0)
    pruned = cut(cm, keep).materialize()
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in pruned.graph.value_info}
    assert shapes
    for g in cm.prunable:
        for t in g.tensors:
            if t in shapes:
                assert shapes[t][cm.tensor_axis[t]] == len(cm.kept_indices(t, keep))
    assert_proven(fg.check_case(case.model, case.input_shape, [0], case.batch), 1)
