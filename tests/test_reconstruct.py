"""Least-squares reconstruction after the cut (`reconstruct.py`, `prune/apply --reconstruct`).

Checked with numbers: the im2col patches reproduce onnxruntime's Conv (strides, asymmetric pads,
dilations, auto_pad, 1-D); on a zoo ResNet with its BatchNormalizations kept (the intercept goes to the BN
mean), on a zoo MobileNetV2 (depthwise consumers skipped) and on the shipped MNIST CNN (real digits),
every re-fitted consumer's error does not grow and most fall, only initializer values change, the result
passes onnx.checker, and its outputs are closer to the original's than the plain cut's; the CLI writes
the `reconstruction` report key.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
from aofp_onnx.api import Pruner, choose_keep
from aofp_onnx.calib import Data
from aofp_onnx.lstsq import ConvGeometry, im2col
from aofp_onnx.reconstruct import reconstruct
from aofp_onnx.surgery import cut
from cliutil import run_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
MNIST = REPO / "models" / "mnist_cnn.onnx"
CALIB = REPO / "models" / "mnist_calib.npz"


# --- im2col against onnxruntime ----------------------------------------------------------------------

CONV_CASES = {
    "2d strided, asymmetric pads, dilated": dict(x=(2, 3, 9, 11), w=(4, 3, 3, 2), strides=[2, 1],
                                                 pads=[1, 0, 2, 1], dilations=[2, 1]),
    "2d auto_pad SAME_LOWER, stride 2": dict(x=(2, 3, 8, 7), w=(5, 3, 4, 3), strides=[2, 2], auto_pad="SAME_LOWER"),
    "1d SAME_UPPER, stride 3": dict(x=(3, 2, 17), w=(4, 2, 4), strides=[3], auto_pad="SAME_UPPER"),
    "1d pads, stride 2, dilation 3": dict(x=(3, 2, 19), w=(4, 2, 3), strides=[2], pads=[2, 1], dilations=[3]),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_im2col_matches_onnxruntime_conv(case):
    spec = dict(CONV_CASES[case])
    rng = np.random.default_rng(0)
    x = rng.standard_normal(spec.pop("x")).astype(np.float32)
    w = rng.standard_normal(spec.pop("w")).astype(np.float32)
    b = rng.standard_normal(w.shape[0]).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **spec)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    per = int(np.prod(y.shape[2:]))
    sample, flat = np.repeat(np.arange(len(x)), per), np.tile(np.arange(per), len(x))
    p = im2col(x, ConvGeometry.of(node, x.shape[2:], w.shape), y.shape[2:], sample, flat)
    assert p.shape == (len(x) * per, int(np.prod(w.shape[1:])))
    ours = (p.astype(np.float64) @ w.reshape(len(w), -1).T.astype(np.float64) + b).reshape(len(x), per, -1)
    theirs = y.reshape(len(x), len(w), per).transpose(0, 2, 1)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


# --- reconstruction on models --------------------------------------------------------------------------

def _outputs(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _relative(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    return sum(float(np.sum((g.astype(np.float64) - r) ** 2)) for g, r in zip(got, ref)) / \
        sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)


def _check_reconstruction(pruner: Pruner, keep, data: Data, held_out: dict) -> dict:
    """Reconstruct the cut and check every contract; returns the report entry's consumers by node."""
    pruned = cut(pruner.cmap, keep)
    cut_model = pruned.materialize()
    out, rec = reconstruct(pruner.cmap, keep, pruned, data, provider="cpu")
    result = out.materialize()
    assert cut_model.SerializeToString() == pruned.materialize().SerializeToString()  # the cut is left as it was
    # only initializer values change: same nodes, opset, initializer names/shapes/types, and some values do
    onnx.checker.check_model(result, full_check=True)
    assert [n.SerializeToString() for n in result.graph.node] == [n.SerializeToString() for n in cut_model.graph.node]
    assert result.opset_import == cut_model.opset_import
    assert [(i.name, list(i.dims), i.data_type) for i in result.graph.initializer] == \
           [(i.name, list(i.dims), i.data_type) for i in cut_model.graph.initializer]
    changed = [a.name for a, b in zip(result.graph.initializer, cut_model.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))]
    fitted = [c for c in rec.consumers if "skipped" not in c]
    assert fitted and len(changed) >= len(fitted)
    # per consumer: never worse, mostly much better
    for c in fitted:
        assert 0 <= c["error_after"] <= c["error_before"], c
    lowered = [c for c in fitted if c["error_after"] < 0.5 * c["error_before"]]
    assert len(lowered) >= 0.75 * len(fitted), fitted
    # the whole model: closer to the original than the cut, on calibration and on held-out inputs
    assert rec.output_error["reconstructed"] < 0.2 * rec.output_error["cut"], rec.output_error
    original = pruner.graph.data.materialize()
    ref = _outputs(original, held_out)
    err_cut, err_rec = _relative(_outputs(cut_model, held_out), ref), _relative(_outputs(result, held_out), ref)
    assert err_rec < 0.5 * err_cut, (err_cut, err_rec)
    assert rec.checks == {"onnx_checker": True, "ran": True}
    assert rec.to_json()["seconds"] >= 0 and "CUT model" in rec.to_json()["verification"]
    return {c["node"]: c for c in rec.consumers}


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reconstruct_zoo")


def _zoo_consumers(name: str, zoo_dir) -> dict:
    """Reconstruct a zoo export cut by L1 to 0.5 MACs (96 calibration samples, 32 held out): its consumers."""
    m = zoo.build(name, zoo_dir)
    pruner = Pruner.load(m.path, input_shapes=m.input_shapes)
    keep = choose_keep(pruner, "l1", flops_target=0.5)[0]
    data = Data(m.feeds(batch=96, seed=1), None, "zoo", True)
    return _check_reconstruction(pruner, keep, data, m.feeds(batch=32, seed=2))


def test_zoo_resnet_with_batchnorm_intercept_in_bn_mean(zoo_dir):
    consumers = _zoo_consumers("resnet_basic_bn", zoo_dir)
    bias = [c["bias"] for c in consumers.values()]
    assert bias.count("BatchNormalization mean") >= 5 and "own" in bias  # convs have no bias here; fc has


def test_zoo_mobilenet_depthwise_consumers_are_skipped(zoo_dir):
    consumers = _zoo_consumers("mobilenet_v2", zoo_dir)
    skipped = [c for c in consumers.values() if "skipped" in c]
    assert skipped and all(c["skipped"].startswith("depthwise") for c in skipped)
    assert len(consumers) - len(skipped) >= 8


def test_mnist_cnn_real_digits():
    pruner = Pruner.load(MNIST, data=str(CALIB))
    keep = choose_keep(pruner, "l1", flops_target=0.5)[0]
    held_out = {"input": np.load(REPO / "models" / "mnist_test.npz")["input"][:200]}
    consumers = _check_reconstruction(pruner, keep, pruner.data, held_out)
    assert len(consumers) == 5 and all(c["bias"] == "own" for c in consumers.values())
    # each layer's output error falls at least 10x on the calibration digits
    assert all(c["error_after"] < 0.1 * c["error_before"] for c in consumers.values())


# --- CLI ------------------------------------------------------------------------------------------------


def test_cli_prune_and_apply_reconstruct_report(tmp_path):
    common = ("--calib", CALIB, "--criterion", "l1", "--flops-target", "0.5", "--round-to", "1")  # every group cut
    proc = run_cli("prune", MNIST, "-o", tmp_path / "p.onnx", *common, "--reconstruct", "--report",
                   tmp_path / "r.json", "--plan-out", tmp_path / "plan.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    rec = rep["reconstruction"]
    assert set(rec) >= {"consumers", "seconds", "output_error", "verification"}
    assert len(rec["consumers"]) == 5
    for c in rec["consumers"]:
        assert set(c) >= {"node", "error_before", "error_after"}
        if c["error_before"] < 1e-6:  # only dead channels went (the error is float noise): nothing to recover
            assert c["error_after"] == c["error_before"] and "did not lower" in c["note"]
        else:
            assert c["error_after"] < c["error_before"]
    assert sum(c["error_before"] >= 1e-6 for c in rec["consumers"]) >= 4
    assert rep["verification"]["passed"] and rep["verification"]["model"] == "cut (before reconstruction)"
    assert rec["output_error"]["reconstructed"] < 0.01 < rec["output_error"]["cut"]
    refit = next(line for line in proc.stdout.splitlines() if line.startswith("refit"))
    # a training error (the last layer can fit its samples exactly): the line says where it was measured
    assert f"on the {rec['samples']} fitting samples" in refit and "held out: see fidelity" in refit
    # apply with the same plan reconstructs the same way (seeded); without --calib it is refused
    proc = run_cli("apply", MNIST, "--plan", tmp_path / "plan.json", "-o", tmp_path / "a.onnx", "--calib", CALIB,
                   "--reconstruct", "--report", tmp_path / "ra.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "ra.json").read_text())["reconstruction"]["consumers"]
    assert [c["error_after"] for c in again] == pytest.approx([c["error_after"] for c in rec["consumers"]], rel=1e-3)
    proc = run_cli("apply", MNIST, "--plan", tmp_path / "plan.json", "-o", tmp_path / "b.onnx", "--reconstruct",
                   cwd=tmp_path)
    assert proc.returncode == 2 and "--calib" in proc.stderr and not (tmp_path / "b.onnx").exists()
