"""Output checks run on each group's downstream part (`check.DownstreamParts`) measure what the whole masked
model measures, on every architecture and export convention the search meets: the same relative output error
for a half of every group on top of a cut, in fewer whole-model forwards; and a search checked that way makes
the same cut."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import exportstyles
import zoo
from aofp_onnx import check, oracle, search_run
from aofp_onnx.api import Pruner
from aofp_onnx.errors import InputError
from aofp_onnx.masking import masked_model
from aofp_onnx.runtime import Runner

float16 = pytest.importorskip("onnxconverter_common.float16", reason="the float16 tests need onnxconverter-common")


def _pinned(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    return model


STYLES = {
    "paddle (Constant weights, bias Reshapes, -1 dims)": lambda: exportstyles.paddle_cnn(),
    "keras (channels-last)": lambda: exportstyles.keras_cnn(),
    "float16": lambda: float16.convert_float_to_float16(exportstyles.paddle_cnn(), keep_io_types=False),
    "batch pinned to 1": lambda: _pinned(exportstyles.paddle_cnn()),
}


def _checked_both_ways(p: Pruner, batches: list[dict], seed: int = 0,
                       rel: float = 1e-5) -> tuple[check.DownstreamParts, int, int]:
    """A half of every group on a random cut, checked by parts and by the whole model: equal errors."""
    cm = p.cmap
    parts = check.DownstreamParts(cm, "cpu")
    fast, whole = parts.check(), check.OutputCheck(Runner(masked_model(cm), "cpu"))
    rng = np.random.default_rng(seed)
    keep = cm.full_keep()
    for g in cm.prunable:
        keep[rng.choice(g.slots, g.width // 4, replace=False)] = False
    for _ in range(2):  # the second time on the cut's cached boundary
        for g in cm.prunable:
            live = g.slots[keep[g.slots]]
            half = rng.choice(live, max(1, len(live) // 2), replace=False)
            want = whole(batches, keep, half)
            assert want > 0
            assert fast(batches, keep, half) == pytest.approx(want, rel=rel, abs=1e-12)
    return parts, fast.forwards, whole.forwards


@pytest.mark.parametrize("name", ["vgg", "resnet_bottleneck", "mobilenet_v3", "yolov8_neck", "densenet", "unet"])
def test_parts_measure_what_the_whole_model_measures(name, tmp_path):
    m = zoo.build(name, tmp_path)
    p = Pruner.load(m.path)
    parts, fast, whole = _checked_both_ways(p, [m.feeds(batch=3, seed=1)])
    assert set(parts.parts) == set(range(len(p.cmap.prunable)))
    assert fast < whole / 4  # one forward per cut and batch (plus the original's), not one per check


@pytest.mark.parametrize("style", list(STYLES))
def test_parts_of_exports_as_users_have_them(style, tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(STYLES[style](), path)
    p = Pruner.load(path, data="random:6")
    batches = search_run.check_batches(search_run.calibration_batches(p, 3))
    # float16: onnxruntime computes some float16 ops in float32 and drops the Casts between them inside a
    # model; a part's boundary tensors are float16 values, so the errors agree to float16 rounding there
    parts, fast, whole = _checked_both_ways(p, batches, rel=1e-2 if style == "float16" else 1e-5)
    assert parts.parts and fast < whole


def test_a_group_that_misses_an_output_takes_it_from_the_cut(tmp_path):
    """YOLOv8's neck: the p4 branch's groups do not reach p3, whose value comes from the cut's forward."""
    m = zoo.build("yolov8_neck", tmp_path)
    parts = check.DownstreamParts(Pruner.load(m.path).cmap, "cpu")
    reach = [len(part.outputs) for part in parts.parts.values()]
    assert min(reach) == 1 and max(reach) == 2


def test_without_the_memory_for_the_boundary_every_check_runs_the_whole_model(tmp_path):
    m = zoo.build("vgg", tmp_path)
    cm = Pruner.load(m.path).cmap
    parts = check.DownstreamParts(cm, "cpu", budget=0)
    assert not parts.parts and not parts.boundary and parts.part(cm.prunable[0].slots[:2]) is None
    assert parts.model.proto.graph.output[:] == masked_model(cm).proto.graph.output[:]


def test_a_search_checked_on_parts_makes_the_same_cut(tmp_path, monkeypatch):
    m = zoo.build("mobilenet_v3", tmp_path)

    def search():
        p = Pruner.load(m.path, data="random:12")
        return search_run.run(p, "aofp", flops_target=0.6, trials_per_half=4, batch_size=6, provider="cpu",
                              accept_by="output")

    keep, scores, info = search()
    monkeypatch.setattr(search_run, "DownstreamParts",
                        lambda cmap, provider, budget: check.DownstreamParts(cmap, provider, budget=0))
    keep_whole, scores_whole, info_whole = search()
    assert info["checks"] > 10 and info["checks"] == info_whole["checks"]
    assert np.array_equal(keep, keep_whole) and np.array_equal(scores, scores_whole)


def test_a_fit_values_its_steps_on_parts_as_on_the_whole_model(tmp_path):
    """`CutErrors` (prune's fit by the output error): each step changes one group of the first keep, and runs
    that group's part; a keep changed in two groups runs the whole model; the same errors either way."""
    m = zoo.build("resnet_bottleneck", tmp_path)
    p = Pruner.load(m.path, data="random:8")
    batches = search_run.calibration_batches(p, 4)
    rng = np.random.default_rng(2)
    keep = p.cmap.full_keep()
    for g in p.cmap.prunable:
        keep[rng.choice(g.slots, g.width // 2, replace=False)] = False
    keeps = [keep]
    for g in p.cmap.prunable:
        down, up = keep.copy(), keep.copy()
        down[g.slots[keep[g.slots]][:1]] = False
        up[g.slots[~keep[g.slots]][:1]] = True
        keeps += [down, up]
    keeps.append(keeps[1] & keeps[-2])  # two groups changed
    fast = search_run.CutErrors(p.cmap, batches, "cpu")
    got = fast(keeps)
    whole = search_run.CutErrors(p.cmap, batches, "cpu", memory=0)  # no memory for any part's boundary
    np.testing.assert_allclose(got, whole(keeps), rtol=1e-5)
    assert fast.measure.parts is not None and whole.measure.parts is None
    assert fast.checks == whole.checks == len(keeps)
    runs = len(fast.batches)  # forwards count per batch
    assert whole.measure.forwards == (len(keeps) + 1) * runs
    assert fast.measure.forwards == 3 * runs  # the original, the first keep, the keep changed in two groups


def test_a_fit_holds_the_memory_budget_the_environment_sets(tmp_path, monkeypatch):
    """AOFP_ONNX_MEMORY_BUDGET bounds the fit's parts as it bounds the search's: too small for any part's
    boundary, every cut runs the whole model; a value that is not a positive number of bytes is refused."""
    m = zoo.build("resnet_bottleneck", tmp_path)
    p = Pruner.load(m.path, data="random:8")
    batches = search_run.calibration_batches(p, 4)
    keep = p.cmap.full_keep()
    keep[p.cmap.prunable[0].slots[:1]] = False
    monkeypatch.setenv("AOFP_ONNX_MEMORY_BUDGET", "1")
    small = search_run.CutErrors(p.cmap, batches, "cpu")
    assert small.memory == 1 and small([keep])[0] > 0 and small.measure.parts is None
    monkeypatch.setenv("AOFP_ONNX_MEMORY_BUDGET", "1GB")
    with pytest.raises(InputError, match="AOFP_ONNX_MEMORY_BUDGET must be a positive number of bytes"):
        search_run.CutErrors(p.cmap, batches, "cpu")


@pytest.mark.parametrize("name", ["yolov8_neck", "mobilenet_v3"])
def test_the_oracle_ranks_on_parts_as_on_the_whole_model(name, tmp_path):
    """The oracle's single-channel ablations, stacked per group on its part: the same damages (and the
    same cut) as stacked on the whole model."""
    m = zoo.build(name, tmp_path)
    cm = Pruner.load(m.path).cmap
    feeds = m.feeds(batch=3, seed=1)
    keep = cm.full_keep()
    keep[np.random.default_rng(3).choice(cm.n_slots, cm.n_slots // 5, replace=False)] = False
    slots = np.random.default_rng(4).permutation(np.flatnonzero(keep[:-1]))
    runner = Runner(masked_model(cm), "cpu")
    parts = check.DownstreamParts(cm, "cpu")
    num, den = oracle.squared_errors(runner, [feeds], keep, slots, 7)
    num_p, den_p = oracle.squared_errors(runner, [feeds], keep, slots, 7, parts)
    np.testing.assert_allclose(den_p, den, rtol=1e-6)
    np.testing.assert_allclose(num_p, num, rtol=1e-5, atol=1e-9 * den.max())
    assert (num.sum(axis=1) > 0).mean() > 0.9
    cut, _, _ = oracle.oracle(cm, runner, [feeds], flops_target=0.7, stack=16)
    cut_p, _, _ = oracle.oracle(cm, runner, [feeds], flops_target=0.7, stack=16, parts=parts)
    assert np.array_equal(cut, cut_p)
