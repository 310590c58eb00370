"""End-to-end cuts on every zoo model: analyze → random plans → cut → verify, checked against
independent counts (tests/reference_macs.py) and against the masked original computed here.

For every zoo model and three seeded random plans (each prunable group keeps a random non-empty
30–70 % subset) the pruned model must be valid ONNX (full check), run in onnxruntime, equal the
masked original to float tolerance, have exactly the predicted MACs, fewer parameters, and every
channel tensor of every group must have the planned width. The only blocked groups in the zoo are
the model input's channels and the model outputs' channels.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import reference_macs
import zoo
from aofp_onnx.cost import TensorWidths
from aofp_onnx.graph import Graph, fold_constants, load_model
from aofp_onnx.groups import analyze
from aofp_onnx.masking import KEEP_INPUT, masked_model
from aofp_onnx.surgery import cut
from aofp_onnx.verify import verify

NAMES = zoo.names()
SEEDS = (0, 1, 2)
BATCH = 2
TOL = 1e-4

# Prunable group counts, derived by hand from each architecture's channel ties (residual Adds tie
# block outputs, depthwise convs tie in and out, C2f chunks tie the two halves, Concat keeps its
# inputs' groups apart). The blocked groups are always 1 (input) + one per model output.
PRUNABLE_GROUPS = {
    "vgg": 6,  # 5 convs + fc1
    "resnet_basic": 5,  # stem/block1 residual, b1.conv1, b2.conv1, b2/b3 residual, b3.conv1
    "resnet_bottleneck": 9,
    "mobilenet_v2": 8,
    "mobilenet_v3": 9,
    "yolov8_neck": 22,
    "unet": 12,  # 10 convs + 2 conv-transposes (the 1x1 out conv reaches the output)
    "densenet": 12,
    "shared_bias": 4,  # a, b (groups=4 ties across groups), c is depthwise (tied to b), d, e
    "conv1d": 2,  # c1; c2 tied with the depthwise conv through the residual
    "paddle_det_op11": 6,
    "paddle_cls_op17": 5,
}


def _arch(name: str) -> str:
    for suffix in ("_bn", "_direct"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class Case:
    """One zoo model: built file, the analysis, the original model's outputs on fixed feeds."""

    def __init__(self, zm: zoo.ZooModel):
        self.zm = zm
        self.original = load_model(zm.path)
        self.graph = Graph.from_model(_copy(self.original), zm.input_shapes)  # it may take over its argument
        self.cm = analyze(self.graph)
        self.feeds = zm.feeds(batch=BATCH, seed=7)
        self.output_names = [o.name for o in self.original.graph.output]
        self.original_outputs = _run(self.original, self.feeds)
        self._masked = None

    def masked_outputs(self, keep: np.ndarray) -> list[np.ndarray]:
        if self._masked is None:
            self._masked = _session(_proto(masked_model(self.cm)))
        return self._masked.run(self.output_names, {**self.feeds, KEEP_INPUT: keep.astype(np.float32)[None]})


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _proto(model) -> onnx.ModelProto:
    """A self-contained ModelProto (the core may hand back a light model with its large weights beside it)."""
    return model.materialize() if hasattr(model, "materialize") else model


def pruned_model(cm, keep) -> onnx.ModelProto:
    return _proto(cut(cm, keep))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, feeds, names=None) -> list[np.ndarray]:
    return _session(model).run(names, feeds)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    directory = tmp_path_factory.mktemp("prune_zoo")
    cache: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in cache:
            cache[name] = Case(zoo.build(name, directory))
        return cache[name]

    return get


def random_plan(cm, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = cm.full_keep()
    for g in cm.prunable:
        k = min(g.width, max(1, int(round(rng.uniform(0.3, 0.7) * g.width))))
        mask = np.zeros(g.width, bool)
        mask[rng.choice(g.width, size=k, replace=False)] = True
        keep[g.slots] = mask
    return keep


def heaviest_plan(cm) -> np.ndarray:
    keep = cm.full_keep()
    for g in cm.prunable:
        mask = np.zeros(g.width, bool)
        mask[(g.width - 1) // 2] = True  # one channel, not always the first
        keep[g.slots] = mask
    return keep


def _scale_close(expected: np.ndarray, got: np.ndarray, rtol: float = 1e-5) -> float:
    """max |expected − got| / max |expected| (asserted small); the shapes must be equal."""
    assert expected.shape == got.shape
    scale = float(np.max(np.abs(expected)))
    assert scale > 0, "an output is all zeros: the comparison would say nothing"
    diff = float(np.max(np.abs(expected.astype(np.float64) - got)))
    assert diff <= rtol * scale, f"max diff {diff:g} vs output scale {scale:g}"
    return diff / scale


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _check_widths(case: Case, keep: np.ndarray, pruned: onnx.ModelProto) -> int:
    """Every channel tensor has its kept width along its channel axis; every source weight too."""
    cm = case.cm
    names = [t for t in cm.tensor_axis if t not in case.zm.input_shapes]
    probe = onnx.ModelProto()
    probe.CopyFrom(pruned)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    values = dict(zip(names, _run(probe, case.feeds, names)))
    checked = 0
    for g in cm.prunable:
        for t in g.tensors:
            axis = cm.tensor_axis[t]
            assert values[t].shape[axis] == len(cm.kept_indices(t, keep)), (g.id, t)
            checked += 1
    inits = _initializers(pruned)
    nodes = list(pruned.graph.node)
    for g in cm.prunable:
        for s in g.sources:
            node = nodes[s.node_index]
            dim = inits[node.input[s.input_index]].dims[s.axis]
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if node.op_type == "ConvTranspose":
                dim *= group  # [Cin, Cout/group, k..]
            assert dim == len(cm.kept_indices(s.tensor, keep)), (g.id, node.name)
            if np.array_equal(np.sort(cm.positions(s.tensor)), g.slots):  # one filter per channel of g
                assert dim == int(keep[g.slots].sum()), (g.id, node.name)
                checked += 1
    return checked


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_analysis_of_zoo_model(cases, name):
    case = cases(name)
    cm, zm = case.cm, case.zm
    expected_macs = zm.torch_macs if zm.torch_macs is not None else zm.formula_macs
    assert cm.total_macs == expected_macs
    assert cm.macs(cm.full_keep()) == expected_macs
    assert cm.prunable_macs_fraction() == pytest.approx(1.0)
    # blocked: exactly the input's channels and each output's channels, with readable reasons
    blocked = [g for g in cm.groups if not g.prunable]
    expected_reasons = {f"comes from model input '{n}'" for n in zm.input_shapes}
    expected_reasons |= {f"reaches model output '{n}'" for n in case.output_names}
    assert {r for g in blocked for r in g.reasons} == expected_reasons
    assert all(len(g.reasons) == 1 for g in blocked), [(g.id, g.reasons) for g in blocked]
    assert len(blocked) == len(expected_reasons)
    widths = {g.reasons[0]: g.width for g in blocked}
    for inp, shape in zm.input_shapes.items():
        assert widths[f"comes from model input '{inp}'"] == shape[1]
    for out, value in zip(case.output_names, case.original_outputs):
        assert widths[f"reaches model output '{out}'"] == value.shape[1]
    assert len(cm.prunable) == PRUNABLE_GROUPS[_arch(name)]
    # slots: prunable groups tile the keep vector, the last slot is the always-kept one
    assert cm.n_slots == sum(g.width for g in cm.prunable)
    assert sorted(s for g in cm.prunable for s in g.slots.tolist()) == list(range(cm.n_slots))
    assert len(cm.full_keep()) == cm.n_slots + 1
    assert all(g.macs > 0 for g in cm.prunable)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", NAMES)
def test_random_plan_cut(cases, name, seed):
    case = cases(name)
    cm = case.cm
    keep = random_plan(cm, seed=1000 * NAMES.index(name) + seed)
    assert keep[-1] and (~keep).any()
    for g in cm.prunable:
        assert keep[g.slots].any()

    pruned = pruned_model(cm, keep)
    onnx.checker.check_model(pruned, full_check=True)
    outputs = _run(pruned, case.feeds, case.output_names)
    for out, ref in zip(outputs, case.original_outputs):
        assert out.shape == ref.shape and np.isfinite(out).all()

    v = verify(cm, keep, pruned, [case.feeds], "cpu")
    assert v.passed, v.detail
    assert v.max_rel_diff <= TOL
    assert v.samples == BATCH

    # the core invariant, computed here: pruned == original with removed channels zeroed at sinks
    for expected, got in zip(case.masked_outputs(keep), outputs):
        _scale_close(expected, got)

    # MACs: predicted == independently counted on the pruned file; strictly fewer than before
    assert cm.macs(keep) == reference_macs.count_macs(pruned, case.feeds)
    assert cm.macs(keep) < cm.total_macs
    # the searches' vectorized MACs ratio is the same count
    assert TensorWidths(cm).macs_ratio(keep) == pytest.approx(cm.macs(keep) / cm.total_macs, rel=1e-9)
    # params: strictly fewer (something was removed)
    assert reference_macs.count_params(pruned) < reference_macs.count_params(case.original)
    # widths: every channel tensor and every filter bank has the planned width
    assert _check_widths(case, keep, pruned) > 0


@pytest.mark.parametrize("name", NAMES)
def test_all_kept_plan_reproduces_original(cases, name):
    case = cases(name)
    cm = case.cm
    keep = cm.full_keep()
    pruned = pruned_model(cm, keep)
    onnx.checker.check_model(pruned, full_check=True)
    # nothing to remove: every weight is the (constant-folded) original's, same name, same value
    before, after = _initializers(fold_constants(_copy(case.original))), _initializers(pruned)
    assert set(after) <= set(before)
    for n, t in after.items():
        np.testing.assert_array_equal(numpy_helper.to_array(t), numpy_helper.to_array(before[n]))
    outputs = _run(pruned, case.feeds, case.output_names)
    for expected, got in zip(case.original_outputs, outputs):
        _scale_close(expected, got, rtol=1e-6)
    for expected, got in zip(case.masked_outputs(keep), outputs):
        _scale_close(expected, got, rtol=1e-6)
    assert cm.macs(keep) == cm.total_macs == reference_macs.count_macs(pruned, case.feeds)
    v = verify(cm, keep, pruned, [case.feeds], "cpu")
    assert v.passed and v.max_rel_diff <= 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_heaviest_cut_one_channel_per_group(cases, name):
    case = cases(name)
    cm = case.cm
    keep = heaviest_plan(cm)
    assert int((~keep).sum()) == sum(g.width - 1 for g in cm.prunable)
    pruned = pruned_model(cm, keep)
    v = verify(cm, keep, pruned, [case.feeds], "cpu")
    assert v.passed, v.detail
    assert v.max_rel_diff <= TOL
    assert cm.macs(keep) == reference_macs.count_macs(pruned, case.feeds)
    assert _check_widths(case, keep, pruned) > 0
    for g in cm.prunable:
        assert int(keep[g.slots].sum()) == 1
    # one channel per group: each source's filter bank holds as many filters as that channel has positions
    nodes, inits = list(pruned.graph.node), _initializers(pruned)
    for g in cm.prunable:
        for s in g.sources:
            if nodes[s.node_index].op_type == "Conv" and len(cm.positions(s.tensor)) == g.width:
                assert inits[nodes[s.node_index].input[s.input_index]].dims[s.axis] == 1
