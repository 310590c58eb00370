"""Trial graphs that read the damage downstream (`damage_at` 'block', 'output'; aofp_onnx.trial_downstream)
against a direct computation with the masked original (`masking.masked_model`) on onnxruntime.

For keep state K and trial row r, group g's trial keeps K_R = K with r's zeros on g's slots, and
- output: t_g = rel(Σ_o ‖y_o(K) − y_o(K_R)‖², Σ_o ‖y_o(K)‖²) over the model outputs, rel the ratio per
  sample averaged over the batch (`damage_ref`; over the whole batch with `damage_norm="batch"`: the
  oracle's measure);
- block: per read point Z (the first channel-mixing layer after g's consumers, or a model output),
  rel(‖(Z(K) − Z(K_R))·K‖², ‖Z(K)·K‖²), summed; on the hand-built chain below the read points are known:

    x → conv1 (3→8) → relu → depthwise (8) → relu → conv2 (8→6) → relu → conv3 (6→4)
      → GAP → Flatten → Gemm (4→2)

  group conv1 (8 channels, through the depthwise conv; consumer conv2): read at conv3's output;
  group conv2 (consumer conv3): read at the Gemm's output (the model output); group conv3 (consumer
  the Gemm): at the model output.
"""
from __future__ import annotations

import json
import pathlib
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
from cliutil import run_cli
from damage_ref import relative
from aofp_onnx import damage_point, search_run
from aofp_onnx.api import Pruner
from aofp_onnx.errors import InputError
from aofp_onnx.masking import KEEP_INPUT, masked_model
from aofp_onnx.modeldata import ModelData
from aofp_onnx.runtime import Runner
from aofp_onnx.trial import TrialEngine, build_trial_model

MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"
REL_TOL = 1e-4


def _chain_model(path: pathlib.Path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    w = {"w1": (8, 3, 3, 3), "wd": (8, 1, 3, 3), "w2": (6, 8, 1, 1), "w3": (4, 6, 3, 3)}
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), k) for k, s in w.items()]
    inits += [numpy_helper.from_array(rng.normal(size=(2, 4)).astype(np.float32), "wg"),
              numpy_helper.from_array(rng.normal(size=(2,)).astype(np.float32), "bg")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["conv1"], pads=[1] * 4),
             helper.make_node("Relu", ["conv1"], ["r1"]),
             helper.make_node("Conv", ["r1", "wd"], ["dw"], pads=[1] * 4, group=8),
             helper.make_node("Relu", ["dw"], ["rd"]),
             helper.make_node("Conv", ["rd", "w2"], ["conv2"]),
             helper.make_node("Relu", ["conv2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["conv3"], pads=[1] * 4),
             helper.make_node("GlobalAveragePool", ["conv3"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "wg", "bg"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _keep_and_rows(cm, seed: int, trials: int = 3):
    rng = np.random.default_rng(seed)
    keep = cm.full_keep()
    keep[:-1] = rng.random(cm.n_slots) > 0.2
    rows = np.ones((trials, cm.n_slots + 1), np.float32)
    rows[:, :-1] = rng.random((trials, cm.n_slots)) > 0.4
    for g in cm.prunable:
        keep[g.slots[0]] = True
    rows[-1] = 1.0  # a row that removes nothing: zero damage
    return keep, rows


def _removes(cm, keep, rows) -> np.ndarray:
    """[T, G]: does row t remove a kept channel of group g?"""
    return np.stack([[bool((keep[g.slots] & (row[g.slots] == 0)).any()) for g in cm.prunable] for row in rows])


def _direct(cm, keep, rows, feeds, reads):
    """[T, G] damage from masked-original runs; `reads(k)` -> [(tensor, slots of its channels or None)]."""
    proto = masked_model(cm).copy_proto()
    names = {t for k in range(len(cm.prunable)) for t, _ in reads(k)}
    proto.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                              for t in sorted(names) if t not in {o.name for o in proto.graph.output})
    runner = Runner(ModelData(proto, cm.graph.weights), "cpu")
    out_names = runner.output_names

    def run(k):
        return dict(zip(out_names, runner.run({**feeds, KEEP_INPUT: k.astype(np.float32)[None]})))

    base = run(keep)
    want = np.zeros((len(rows), len(cm.prunable)))
    for t, row in enumerate(rows):
        for k, g in enumerate(cm.prunable):
            trial = keep.copy()
            trial[g.slots] &= row[g.slots] > 0
            got = run(trial)
            terms = []
            for tensor, slots in reads(k):
                own = (1.0 if slots is None
                       else keep[slots].astype(np.float64).reshape(1, -1, *[1] * (base[tensor].ndim - 2)))
                terms.append(relative([((base[tensor] - got[tensor]) * own, base[tensor] * own)]))
            want[t, k] = sum(terms)
    return want


def test_block_damage_reads_the_first_mixing_layer_after_the_consumers(tmp_path):
    p = Pruner.load(_chain_model(tmp_path / "chain.onnx"), input_shapes={"x": (4, 3, 8, 8)})
    cm = p.cmap
    assert [g.width for g in cm.prunable] == [8, 6, 4]
    feeds = {"x": np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float32)}
    keep, rows = _keep_and_rows(cm, 2)
    conv3 = cm.prunable[2].slots
    want = _direct(cm, keep, rows, feeds, lambda k: [("conv3", conv3)] if k == 0 else [("logits", None)])
    got = TrialEngine(cm, "cpu", damage_at="block").damage(keep, rows, feeds)
    np.testing.assert_allclose(got, want, rtol=REL_TOL, atol=1e-9)
    removes = _removes(cm, keep, rows)
    assert np.all(got[~removes] < 1e-9) and got[removes].max() > 1e-3
    nxt = TrialEngine(cm, "cpu", damage_at="next").damage(keep, rows, feeds)
    assert not np.allclose(nxt[:-1, 0], got[:-1, 0])  # conv1's next layer is conv2, its block ends at conv3


@pytest.mark.parametrize("name,norm", [("resnet20_digits", "sample"), ("mobilenet_v3", "sample"),
                                       ("resnet20_digits", "batch")])
def test_output_damage_equals_masked_original_runs(name, norm, tmp_path):
    if name == "resnet20_digits":
        p = Pruner.load(MODELS / f"{name}.onnx", data=str(MODELS / "mnist_calib.npz"), limit=4)
        feeds = next(p.data.batches(4))
    else:
        m = zoo.build(name, tmp_path)
        p, feeds = Pruner.load(m.path), m.feeds(batch=2, seed=1)
    cm = p.cmap
    keep, rows = _keep_and_rows(cm, 0)
    outputs = [o.name for o in cm.graph.model.graph.output]
    got = TrialEngine(cm, "cpu", damage_at="output", damage_norm=norm).damage(keep, rows, feeds)
    proto = masked_model(cm)
    runner = Runner(proto, "cpu")
    base = runner.run({**feeds, KEEP_INPUT: keep.astype(np.float32)[None]})
    want = np.zeros_like(got)
    for t, row in enumerate(rows):
        for k, g in enumerate(cm.prunable):
            trial = keep.copy()
            trial[g.slots] &= row[g.slots] > 0
            ys = runner.run({**feeds, KEEP_INPUT: trial.astype(np.float32)[None]})
            want[t, k] = relative([(y - b, b) for y, b in zip(ys, base)], norm)
    assert len(outputs) >= 1
    np.testing.assert_allclose(got, want, rtol=REL_TOL, atol=1e-9)
    removes = _removes(cm, keep, rows)
    assert np.all(got[~removes] < 1e-9) and got[removes].max() > 1e-3


@pytest.mark.parametrize("damage_at", ["block", "output"])
def test_downstream_damage_of_a_float16_model_matches_its_float32_original(damage_at, tmp_path):
    """A float16 export (onnxconverter-common, float16 inputs too): the trial masks are cast to float16 and
    the damages summed in float32, so they match the float32 model's within float16 rounding."""
    from onnxconverter_common import float16

    src32 = _chain_model(tmp_path / "chain.onnx")
    onnx.save(float16.convert_float_to_float16(onnx.load(src32)), tmp_path / "half.onnx")
    x = np.random.default_rng(1).normal(size=(4, 3, 8, 8))
    damages = []
    for path, dtype in ((src32, np.float32), (tmp_path / "half.onnx", np.float16)):
        cm = Pruner.load(path, input_shapes={"x": (4, 3, 8, 8)}).cmap
        keep, rows = _keep_and_rows(cm, 2)
        damages.append(TrialEngine(cm, "cpu", damage_at=damage_at).damage(keep, rows, {"x": x.astype(dtype)}))
    np.testing.assert_allclose(damages[1], damages[0], rtol=2e-2, atol=1e-4)
    assert damages[0].max() > 1e-2


@pytest.mark.parametrize("damage_at", ["block", "output"])
def test_downstream_trial_graphs_are_valid_onnx(damage_at):
    p = Pruner.load(MODELS / "resnet20_digits.onnx", data=str(MODELS / "mnist_calib.npz"), limit=2)
    model = build_trial_model(p.cmap, [p.cmap.prunable[1].id, p.cmap.prunable[5].id], damage_at=damage_at)
    onnx.checker.check_model(model.materialize(), full_check=True)
    assert [o.name for o in model.proto.graph.output] == ["aofp_damage"]


def test_search_run_with_ridge_and_block_is_deterministic(tmp_path):
    p = Pruner.load(_chain_model(tmp_path / "chain.onnx"), data="random:16")
    runs = [search_run.run(p, "aofp", flops_target=0.6, trials_per_half=4, batch_size=8, provider="cpu",
                           estimator="ridge", damage_at="block", seed=3) for _ in range(2)]
    (k1, s1, i1), (k2, s2, i2) = runs
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(s1, s2)
    assert i1["estimator"] == "ridge" and i1["damage_at"] == "block" and i1["trials"] == i2["trials"] > 0
    assert p.cmap.macs(k1) <= 0.6 * p.cmap.total_macs


def test_auto_reads_the_outputs_where_they_cost_little_more_than_next(tmp_path, monkeypatch):
    """R = Σ_g M(downstream of g's sinks) / Σ_g M(g's sinks), by hand on the chain (MACs per sample at 8x8):
    conv1's group (sink conv2: 3,072; downstream conv2 + conv3 + Gemm: 16,904), conv2's (sink conv3: 13,824;
    13,832), conv3's (sink the Gemm: 8; 8). R = 30,744 / 16,904 = 1.82 ≤ 8: auto reads the outputs, and the
    search reports the choice; under a limit of 1.5 it reads the next layers."""
    pruner = Pruner.load(_chain_model(tmp_path / "chain.onnx"), data="random:8")
    ratio = 30744 / 16904
    assert damage_point.downstream_ratio(pruner.cmap) == pytest.approx(ratio)
    assert damage_point.resolve(pruner.cmap, "next") == ("next", None)
    assert damage_point.resolve(pruner.cmap, "auto") == \
        ("output", {"macs_ratio": round(ratio, 3), "limit": damage_point.AUTO_LIMIT, "chosen": "output"})
    _, _, info = search_run.run(pruner, "aofp", flops_target=0.7, batch_size=8, provider="cpu")
    assert info["damage_at"] == "output" and info["damage_at_auto"]["chosen"] == "output"
    monkeypatch.setattr(damage_point, "AUTO_LIMIT", 1.5)
    _, _, info = search_run.run(pruner, "aofp", flops_target=0.7, batch_size=8, provider="cpu")
    assert info["damage_at"] == "next" and info["damage_at_auto"] == {"macs_ratio": round(ratio, 3), "limit": 1.5,
                                                                     "chosen": "next"}


def test_downstream_damage_is_refused_on_a_pinned_batch_and_auto_reads_next_there(tmp_path):
    """A batch pinned beyond the Reshape targets: `--damage-at output|block` is refused with the reason,
    and `auto` reads the next layers and says why; a float16 model reads its outputs (through the CLI)."""
    from onnxconverter_common import float16

    cmap = Pruner.load(_chain_model(tmp_path / "chain.onnx")).cmap
    assert damage_point.resolve(cmap, "auto", pinned=True) == \
        ("next", {"macs_ratio": round(30744 / 16904, 3), "limit": damage_point.AUTO_LIMIT, "chosen": "next",
                  "because": "a batch pinned beyond the Reshape targets"})
    with pytest.raises(InputError, match="--damage-at block does not support a batch pinned beyond"):
        damage_point.resolve(cmap, "block", pinned=True)
    src = tmp_path / "half.onnx"
    onnx.save(float16.convert_float_to_float16(onnx.load(tmp_path / "chain.onnx")), src)
    report = tmp_path / "r.json"
    proc = run_cli("prune", src, "-o", tmp_path / "out.onnx", "--calib", "random:8", "--flops-target", "0.7",
                   "--no-progress", "--report", report)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(report.read_text())
    assert rep["search"]["damage_at"] == "output" and rep["verification"]["passed"]


def test_auto_reads_next_on_a_model_with_several_outputs(tmp_path):
    """Output damage pools the outputs (Σ_o ‖Δy_o‖² / Σ_o ‖y_o‖²): a large output would drown a small
    one, so `auto` keeps to the next layers when the model has more than one output, and says so."""
    model = onnx.load(_chain_model(tmp_path / "chain.onnx"))
    model.graph.output.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["N", 4]))
    onnx.save(model, tmp_path / "two.onnx")
    cmap = Pruner.load(tmp_path / "two.onnx").cmap
    point, auto = damage_point.resolve(cmap, "auto")
    assert point == "next" and auto["because"] == "2 outputs" and auto["macs_ratio"] <= damage_point.AUTO_LIMIT


def test_damage_norm_is_chosen_on_the_command_line_and_reported(tmp_path):
    """`--damage-norm batch` (the paper's ratio over the batch) reaches the trial graph and the report;
    without it `auto` reads it relative per sample (the chain is a classifier). Both cuts verify."""
    src = _chain_model(tmp_path / "chain.onnx")
    norms = {}
    for extra in ([], ["--damage-norm", "batch"]):
        report = tmp_path / f"r{len(extra)}.json"
        proc = run_cli("prune", src, "-o", tmp_path / f"out{len(extra)}.onnx", "--calib", "random:16",
                       "--flops-target", "0.7", "--damage-at", "next", "--no-progress", "--report", report, *extra)
        assert proc.returncode == 0, proc.stderr
        rep = json.loads(report.read_text())
        assert rep["verification"]["passed"]
        norms[rep["search"]["damage_norm"]] = rep["search"]["trials"]
    assert set(norms) == {"sample", "batch"} and min(norms.values()) > 0


@pytest.mark.parametrize("extra, accepted", [(["--accept-by", "output"], "output"),
                                             (["--damage-at", "next"], "estimate"),
                                             (["--accept-by", "auto", "--damage-at", "next"], "output"),
                                             (["--accept-by", "auto", "--damage-at", "next", "--reconstruct"],
                                              "estimate"),
                                             (["--accept-by", "auto", "--damage-at", "output"], "estimate")])
def test_accept_by_on_the_command_line(tmp_path, extra, accepted):
    """`--accept-by output` reaches the search and the report (its threshold, its checks); the default is the
    estimate; `auto` checks at the outputs where the trials read the next layers of a classifier, unless
    `--reconstruct` refits the cut or the trials read the outputs. Every cut verifies."""
    src = _chain_model(tmp_path / "chain.onnx")
    report = tmp_path / "r.json"
    proc = run_cli("prune", src, "-o", tmp_path / "out.onnx", "--calib", "random:16", "--flops-target", "0.7",
                   "--criterion", "aofp", *extra, "--no-progress", "--report", report)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(report.read_text())
    assert rep["verification"]["passed"]
    assert rep["search"]["accept_by"] == accepted and (rep["search"].get("checks", 0) > 0) == (accepted == "output")
    assert rep["search"]["threshold"] >= (0.001 if accepted == "output" else 0.01)


def _outputs(*shapes):
    """A stand-in ChannelMap whose model outputs have these shapes (what resolve_norm reads)."""
    names = [f"y{k}" for k in range(len(shapes))]
    return SimpleNamespace(graph=SimpleNamespace(outputs=names, shape=dict(zip(names, shapes)).get))


def test_accept_by_auto_resolves_by_the_damage_point_the_outputs_and_the_refit():
    """`auto` checks at the outputs on a classifier whose trials read before them and whose cut is not refitted;
    a detector's map, output trials or `--reconstruct` keep the estimate; an explicit choice stands."""
    classifier, detector = _outputs((1, 10)), _outputs((1, 1, 32, 32))
    assert [damage_point.resolve_accept(classifier, at, "auto") for at in ("next", "block", "output")] == \
        ["output", "output", "estimate"]
    assert damage_point.resolve_accept(classifier, "next", "auto", refit=True) == "estimate"
    assert damage_point.resolve_accept(detector, "next", "auto") == "estimate"
    assert damage_point.resolve_accept(detector, "next", "output", refit=True) == "output"
